"""Where a shard job's time goes: thread-seconds per phase, by wrapping the exporter's
I/O and edit calls (so it also profiles an older checkout that has no `times=`).

    .venv/bin/python bench/profile_shard.py MODEL_DIR SHARD PLAN_JSON [--workers 2]

Run with `PYTHONPATH=<checkout>/src` to profile that checkout's exporter; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("shard")
    parser.add_argument("plan")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    from abliterate import export
    from abliterate.recipe import Plan

    seconds: dict[str, float] = {}
    lock = threading.Lock()

    def timed(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                with lock:
                    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    phases = {"read_tensor": "read", "edit_tensor": "edit", "write_at": "write",
              "copy_range_at": "copy", "file_sha256": "hash"}  # fmt: skip
    for attribute, phase in phases.items():
        setattr(export, attribute, timed(phase, getattr(export, attribute)))
    export.os.fsync = timed("fsync", export.os.fsync)
    plan = Plan.load(args.plan)
    with tempfile.TemporaryDirectory(dir=Path(args.model).parent.parent) as out:
        start = time.perf_counter()
        export.ablate_shard(args.model, args.shard, plan, Path(out) / args.shard,
                            digest=True, workers=args.workers)  # fmt: skip
        wall = time.perf_counter() - start
    print(json.dumps({"wall_s": round(wall, 2),
                      "phases_thread_s": {k: round(v, 2) for k, v in seconds.items()}}))  # fmt: skip


if __name__ == "__main__":
    main()
