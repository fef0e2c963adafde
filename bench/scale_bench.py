"""Benchmark: how the export scales with parallel shard jobs, and a model of the full size.

On a GLM-4.5-Air-shaped slice (bench/glm_slice.py; `--layers` MoE layers of ~4.7 GB,
plus the 2.5 GB embedding shard), it measures in one run:

- `cp -r` + `sync` of the slice: the disk's copy throughput W (bytes / second),
- `abliterate ablate RECIPE -j N --no-verify` (all 128 experts' down_proj, o_proj and
  the shared expert, norm-preserving, CPU) for N = 1, 2: wall seconds,
- one shard job's edit throughput e (edited bytes per thread-second of the edit phase)
  and hash throughput h (shard bytes per thread-second of its SHA-256 thread),

and states the model

    T(N) = max( B / W,  (E / e + H / h) / min(3 N, cores) ) + shard_overhead * ceil(S / N)

(B: bytes of the model, E: bytes edited, H: bytes of the shards with edits, which are
hashed as they are written, S: those shards; each shard job runs two edit workers and a
hash thread; the overhead is fsync and start-up per shard), checks it against the
measured 1- and 2-job times, and prints the predicted time of the full 46-layer model
(45 MoE layers + 1 dense, about 220 GB) for several disk speeds and job counts.

    .venv/bin/python bench/scale_bench.py [--dir /big/tmp] [--layers 3] [--keep] [--slice DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import glm_slice  # noqa: E402

GB = 1e9
# GLM-4.5-Air in bf16: 45 MoE layers of ~4.68 GB (at the slice's widths), one dense layer
# (~0.6 GB), embeddings + LM head (2.5 GB); default export edits o_proj + shared expert
# + all routed experts' down_proj of each MoE layer (1.59 GB per layer).
FULL = {
    "bytes": 45 * 4.68 * GB + 0.6 * GB + 2.5 * GB,
    "edited": 45 * 1.59 * GB,
    "hashed": 45 * 4.68 * GB,  # the shards with edits, hashed as they are written
    "shards": 45,
}


def predict(bytes_total, edited, hashed, shards, jobs, disk, edit_rate, hash_rate, overhead,
            cores) -> float:  # fmt: skip
    """Seconds for an export of `bytes_total` (of which `edited` are edited and `hashed`
    in shards with edits) in `shards`."""
    io = bytes_total / disk
    cpu = (edited / edit_rate + hashed / hash_rate) / min(3 * jobs, cores)
    return max(io, cpu) + overhead * math.ceil(shards / jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where to put ~3 x the slice's size")
    parser.add_argument("--layers", type=int, default=3, help="MoE layers in the slice")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    parser.add_argument(
        "--slice", default=None, help="an existing slice of --layers layers to reuse; kept"
    )
    args = parser.parse_args()
    from abliterate.recipe import build_plan

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ablate_bench import shard_job

    root = Path(tempfile.mkdtemp(prefix="scale-bench-", dir=args.dir))
    try:
        model = Path(args.slice) if args.slice else glm_slice.build_slice(root, args.layers)
        size = sum(p.stat().st_size for p in model.iterdir())
        measurements = glm_slice.write_measurements(root / "m.safetensors", args.layers)
        recipe = {**glm_slice.recipe(args.layers, all_experts=True), "model": str(model),
                  "measurements": str(measurements), "output": str(root / "out")}  # fmt: skip
        recipe_path = root / "recipe.yml"
        recipe_path.write_text(json.dumps(recipe))
        plan = build_plan(recipe)
        plan.save(root / "plan.json")
        edited = sum(math.prod(e.shape) * 2 for e in plan.entries)
        shards = sorted({e.shard for e in plan.entries})

        def run_cp() -> float:
            glm_slice.warm(model)
            seconds = glm_slice.timed(lambda: glm_slice.copy_tree(model, root / "cp"))
            shutil.rmtree(root / "cp")
            return seconds

        def run_export(jobs: int) -> float:
            glm_slice.warm(model)
            command = [sys.executable, "-m", "abliterate", "-q", "ablate", str(recipe_path),
                       "-j", str(jobs), "--no-verify"]  # fmt: skip
            seconds = glm_slice.timed(
                lambda: subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            )
            shutil.rmtree(root / "out")
            return seconds

        cp_runs = [run_cp()]
        measured = {}
        for jobs in (1, 2):
            measured[jobs] = run_export(jobs)
            cp_runs.append(run_cp())
        job = shard_job(root / "plan.json", model, shards[0], root / "job" / "out")
        shard_edited = sum(math.prod(e.shape) * 2 for e in plan.entries if e.shard == shards[0])
        edit_rate = shard_edited / job["phases_thread_s"]["edit"]
        disk = size / min(cp_runs)
        overhead = job["phases_thread_s"]["fsync"]
        hash_rate = (model / shards[0]).stat().st_size / job["phases_thread_s"]["hash"]
        hashed = sum((model / shard).stat().st_size for shard in shards)
        cores = os.cpu_count() or 1
        predicted = {
            jobs: predict(
                size, edited, hashed, len(shards), jobs, disk, edit_rate, hash_rate, overhead, cores
            )  # fmt: skip
            for jobs in measured
        }
        full = {
            f"{w:g} GB/s": {
                f"{j} jobs": round(
                    predict(
                        FULL["bytes"],
                        FULL["edited"],
                        FULL["hashed"],
                        FULL["shards"],
                        j,
                        w * GB,
                        edit_rate,
                        hash_rate,
                        overhead,
                        3 * j,
                    )
                    / 60,
                    1,
                )  # fmt: skip
                for j in (1, 2, 4, 8, 16)
            }
            for w in (0.5, 1, 2, 4, 8)
        }
        result = {
            "machine": f"{cores} CPUs, load {os.getloadavg()[0]:.1f} at the end",
            "slice_GB": round(size / GB, 2),
            "edited_GB": round(edited / GB, 2),
            "shards_edited": len(shards),
            "cp_s": [round(t, 2) for t in cp_runs],
            "disk_copy_GB_per_s": round(disk / GB, 2),
            "edit_GB_per_thread_s": round(edit_rate / GB, 2),
            "hash_GB_per_thread_s": round(hash_rate / GB, 2),
            "fsync_s_per_shard": round(overhead, 2),
            "export_s": {f"{j} jobs": round(t, 2) for j, t in measured.items()},
            "vs_cp": {f"{j} jobs": round(min(cp_runs) / t, 3) for j, t in measured.items()},
            "model_s": {f"{j} jobs": round(t, 2) for j, t in predicted.items()},
            "shard_job": job,
            "full_46_layer_model_minutes (cores = 3 x jobs)": full,
            "cp_of_the_full_model_minutes": {
                f"{w:g} GB/s": round(FULL["bytes"] / (w * GB) / 60, 1) for w in (0.5, 1, 2, 4, 8)
            },
        }
        print(json.dumps(result, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
