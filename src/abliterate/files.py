"""Writing output files so that a partial one never exists.

Why: Snakemake (and a user) takes a file that exists as complete, so every output is
written to a temporary name beside it and renamed into place; an interrupted job leaves
no file rather than a truncated one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from .errors import AbliterateError


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it is renamed to `path`, else removed.

    The temp name keeps the suffix (`.x.123.tmp.png`) for writers that pick the format
    from it (matplotlib).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # honours the umask
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` through a temp file + rename; returns the path."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(data, path: str | Path) -> Path:
    """`data` as indented JSON, atomically (manifests, indexes, reports)."""
    return write_text_atomic(path, json.dumps(data, indent=1) + "\n")


# --------------------------------------------------------------------------------------
# Source files that may be symlinks (the Hugging Face cache layout)
# --------------------------------------------------------------------------------------


def link_root(model_dir: str | Path) -> Path:
    """The directory a model's symlinks may point into.

    A Hugging Face cache snapshot (`models--org--name/snapshots/<rev>/`) holds relative
    links into the repository's `blobs/`, so there the root is the repository folder;
    anywhere else it is the model directory itself.
    """
    model_dir = Path(model_dir).absolute()
    if model_dir.parent.name == "snapshots" and (model_dir.parent.parent / "blobs").is_dir():
        return model_dir.parent.parent.resolve()
    return model_dir.resolve()


def resolve_source(model_dir: str | Path, name: str, *, allow_external: bool = False) -> Path:
    """The real file behind `model_dir/name`, following links only where they may go.

    Why: copying or hard-linking the link itself leaves a dangling link in the output (a
    relative link means something else there), and following a link out of the model
    would copy an unrelated file into it, so links are resolved here, once, and a link
    leaving the model (or its cache repository) is refused unless the user allows it.
    """
    path = Path(model_dir) / name
    real = path.resolve()
    if not real.is_file():
        raise AbliterateError(
            f"{path}: {'a dangling link' if path.is_symlink() else 'missing'}; "
            "expected a file of the model."
        )
    root = link_root(model_dir)
    if path.is_symlink() and not allow_external and root != real and root not in real.parents:
        raise AbliterateError(
            f"{path}: a link to {real}, outside the model directory {root}; copy the file into "
            "the model or allow it (CLI --allow-external-links, config export.allow_external_links)."
        )
    return real


LINK_MODES = ("auto", "reflink", "copy", "hardlink")
_FICLONE = 0x40049409  # linux/fs.h: share the source's blocks copy-on-write


def place_copy(source: str | Path, destination: str | Path, mode: str = "auto") -> str:
    """Put an unedited copy of `source` (a real file) at `destination`; returns how.

    `auto` and `reflink` clone the blocks copy-on-write where the file system can (btrfs,
    XFS, ...), which costs no space and no time and shares nothing writable with the
    source, else copy the bytes; `copy` always copies; `hardlink` shares the inode, so a
    later in-place write to the output would change the source: only on request.
    Written to a temporary name and renamed, so an interrupted copy leaves nothing.
    """
    if mode not in LINK_MODES:
        raise AbliterateError(f"export.link is {mode!r}; expected one of {', '.join(LINK_MODES)}.")
    source, destination = Path(source), Path(destination)
    if destination.is_symlink() or destination.exists():
        destination.unlink()
    tmp = destination.with_name(f".{destination.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        if mode == "hardlink":
            try:
                os.link(source, tmp, follow_symlinks=True)
                os.replace(tmp, destination)
                return "hardlinked"
            except OSError:
                pass  # another file system: copy instead
        if mode in ("auto", "reflink") and _reflink(source, tmp):
            os.replace(tmp, destination)
            return "reflinked"
        shutil.copyfile(source, tmp)
        os.replace(tmp, destination)
        return "copied"
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _reflink(source: Path, destination: Path) -> bool:
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return False
    with open(source, "rb") as src, open(destination, "wb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
            return True
        except OSError:
            pass
    destination.unlink(missing_ok=True)
    return False


# --------------------------------------------------------------------------------------
# One writer per output
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def exclusive_lock(target: str | Path):
    """Hold `<target>.lock` for the whole write of `target`, or refuse naming the holder.

    Why: two exports into one output interleave their shards and leave a manifest that
    describes only one of them. The lock is a kernel `flock`, so a holder that dies (even
    by SIGKILL) releases it and the next run takes it over; the file records pid and host
    only to name the holder in the refusal.
    """
    import fcntl
    import socket

    target = Path(target)
    lock_path = target.with_name(target.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown process"
            raise AbliterateError(
                f"{target}: another abliterate run ({holder}) is writing this output; wait "
                f"for it to finish or stop it (its lock is {lock_path})."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield lock_path
    finally:
        handle.close()


# --------------------------------------------------------------------------------------
# Snakemake's lock after a kill
# --------------------------------------------------------------------------------------


def claim_workdir(workdir: str | Path = "."):
    """Hold `.snakemake/abliterate.lock` while this Snakemake process lives, and clear
    Snakemake's own locks when they are provably stale.

    Why: Snakemake locks the working directory with plain files, so after `kill -9` or a
    power loss every rerun fails with `LockException` until `--unlock`. This `flock` is
    held by each running workflow's main process (the kernel drops it when that process
    dies, however it dies); a process that gets it therefore knows no other run of this
    workflow is alive here, and any Snakemake lock files left are stale. Returns the open
    handle (keep it referenced for the life of the process) or None when another run holds
    it (then nothing is touched and Snakemake's own check applies).
    """
    import fcntl

    state = Path(workdir) / ".snakemake"
    state.mkdir(parents=True, exist_ok=True)
    handle = open(state / "abliterate.lock", "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    stale = sorted((state / "locks").glob("*.lock")) if (state / "locks").is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        print(
            f"Removed {len(stale)} stale Snakemake lock file(s) of a run that was killed; "
            "its unfinished jobs are redone (rerun-incomplete).",
            file=sys.stderr,
        )
    return handle
