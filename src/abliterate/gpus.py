"""A job's compute devices: a GPU of its own on a shared machine, and its CPU threads.

Why: Snakemake's `resources: gpu=N` only caps how many GPU jobs run at once; it never
says *which* GPU a job should use, so two concurrent jobs would both land on cuda:0.
Each GPU job therefore claims free device ids itself, with one lock file per id
(`fcntl.flock`) under `.snakemake/gpu-slots/` of the working directory, and exports
`CUDA_VISIBLE_DEVICES` before CUDA is initialised. A flock belongs to the open file, so
the kernel drops it when the process ends in any way, SIGKILL included: a killed job
can never leave a slot taken. Under SLURM the scheduler already gave the job its own
GPUs (and set `CUDA_VISIBLE_DEVICES`), so nothing is locked there.

`ABLITERATE_GPUS=0,1,2` declares the ids to hand out instead of the detected ones (to
share out a subset of a node, and to test all this on a machine without GPUs).
`python -m abliterate.gpus --gpus 1 -- COMMAND ...` runs any command on a claimed GPU:
the lock stays open across `exec`, so it lives exactly as long as the command.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import socket
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path

from abliterate.errors import AbliterateError

logger = logging.getLogger("abliterate")

DECLARED_ENV = "ABLITERATE_GPUS"
LOCK_DIR_ENV = "ABLITERATE_GPU_LOCK_DIR"
DEFAULT_LOCK_DIR = ".snakemake/gpu-slots"


def _ids(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def detected_gpus() -> list[str]:
    """CUDA ordinals of the NVIDIA GPUs the driver exposes (no CUDA initialisation)."""
    driver = Path("/proc/driver/nvidia/gpus")
    count = len(list(driver.iterdir())) if driver.is_dir() else 0
    return [str(index) for index in range(count)]


def visible_gpus(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """The ids jobs may be given: declared, else CUDA_VISIBLE_DEVICES, else detected."""
    environ = os.environ if environ is None else environ
    if DECLARED_ENV in environ:
        return _ids(environ[DECLARED_ENV])
    if "CUDA_VISIBLE_DEVICES" in environ:
        return _ids(environ["CUDA_VISIBLE_DEVICES"])
    return detected_gpus()


def scheduler_assigned(environ: MutableMapping[str, str]) -> bool:
    """Whether a batch scheduler (SLURM) already gave this job its own devices."""
    return "SLURM_JOB_ID" in environ and DECLARED_ENV not in environ


class GpuClaim:
    """GPU ids held by this process through open, flock'ed files (closing releases)."""

    def __init__(self, ids: list[str], files: list):
        self.ids = ids
        self._files = files

    def release(self) -> None:
        for handle in self._files:
            handle.close()
        self._files = []

    def __enter__(self) -> GpuClaim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _try_lock(path: Path):
    handle = open(path, "a+")  # noqa: SIM115 (the open file *is* the lock)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def claim_gpus(
    count: int,
    *,
    environ: MutableMapping[str, str] | None = None,
    lock_dir: str | Path | None = None,
    timeout: float | None = None,
    poll_seconds: float = 0.25,
) -> GpuClaim:
    """Wait until `count` of the visible GPUs are free, lock them, return the claim.

    All `count` ids are taken at once or none (a job never sits on half its GPUs while
    waiting for the rest, so two multi-GPU jobs cannot deadlock).
    """
    environ = os.environ if environ is None else environ
    ids = visible_gpus(environ)
    if count > len(ids):
        source = DECLARED_ENV if DECLARED_ENV in environ else "CUDA_VISIBLE_DEVICES/driver"
        raise AbliterateError(
            f"the job asks for {count} GPU(s) but {len(ids)} are visible "
            f"({source}: {','.join(ids) or 'none'}); lower the rule's gpu resource "
            f"or set {DECLARED_ENV}"
        )
    directory = Path(lock_dir or environ.get(LOCK_DIR_ENV) or DEFAULT_LOCK_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    deadline = None if timeout is None else time.monotonic() + timeout
    announced = False
    while True:
        held, files = [], []
        for gpu in ids:
            handle = _try_lock(directory / f"{host}-gpu{gpu}.lock")
            if handle is not None:
                held.append(gpu)
                files.append(handle)
                if len(held) == count:
                    for handle in files:
                        handle.seek(0)
                        handle.truncate()
                        handle.write(f"{os.getpid()}\n")
                        handle.flush()
                    return GpuClaim(held, files)
        for handle in files:
            handle.close()
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"no {count} free GPU(s) among {','.join(ids)} in {timeout} s")
        if not announced:
            logger.info(f"Waiting for {count} free GPU(s) among {','.join(ids)}")
            announced = True
        time.sleep(poll_seconds)


_HELD: list[GpuClaim] = []  # claims that last as long as this process


def use_job_devices(
    gpus: int, threads: int | None = None, environ: MutableMapping[str, str] | None = None
) -> list[str]:
    """Give this job `gpus` GPUs of its own and `threads` CPU threads; return the GPU ids.

    Call before anything touches CUDA. The GPUs stay claimed until the process exits.
    A job that asks for no GPU is left as it is (its device setting decides), so a
    config that never declared GPUs behaves as before.
    """
    environ = os.environ if environ is None else environ
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, int(threads)))
    gpus = int(gpus)
    if scheduler_assigned(environ):
        return _ids(environ.get("CUDA_VISIBLE_DEVICES", ""))
    if gpus == 0:
        return []
    claim = claim_gpus(gpus, environ=environ)
    _HELD.append(claim)
    environ["CUDA_VISIBLE_DEVICES"] = ",".join(claim.ids)
    logger.info(f"GPU slot: CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']}")
    return claim.ids


def main(argv: list[str] | None = None) -> None:
    """`python -m abliterate.gpus --gpus N -- COMMAND ...`: exec COMMAND on claimed GPUs."""
    parser = argparse.ArgumentParser(prog="python -m abliterate.gpus", description=main.__doc__)
    parser.add_argument("--gpus", type=int, default=1, help="GPUs the command needs")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS ...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("a command to run is required after --")
    try:
        use_job_devices(args.gpus)
    except AbliterateError as error:
        sys.exit(f"error: {error}")
    for claim in _HELD:  # the command inherits the locked files, and with them the slots
        for handle in claim._files:
            os.set_inheritable(handle.fileno(), True)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
