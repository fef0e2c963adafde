"""Writing output files so that a partial one never exists.

Why: Snakemake (and a user) takes a file that exists as complete, so every output is
written to a temporary name beside it and renamed into place; an interrupted job leaves
no file rather than a truncated one.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path


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
