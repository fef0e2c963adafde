"""Benchmark: the sharded export against `cp` of the same bytes, same run, warm and cold.

On a GLM-4.5-Air-shaped slice (bench/glm_slice.py: 2 MoE layers at real widths and key
names, one ~4.7 GB shard each, plus the 2.5 GB embedding/LM-head shard; 11.9 GB of real
random bf16), it times, interleaved so that load drift shows up in the baseline too:

- `cp -r` of the model directory + `sync` (the baseline; warm and cold page cache),
- the export (`export_model`) of o_proj + shared expert + all 128 routed experts'
  down_proj (norm-preserving, CPU) with 1 and 2 parallel shard jobs, without and with the
  manifest's SHA-256 of each shard, warm and cold,
- the export with each `export.link` mode (the unedited embedding shard is copied,
  reflinked where the file system can, or hard-linked),
- the user's whole command, `abliterate ablate recipe.yml` (default verification: by
  digest), the same with `--full-verify` (every edit recomputed) and with `--no-verify`,
- one shard job alone in a fresh process, with the guide's default recipe and with all
  128 experts: its peak RSS (VmHWM) and where its time goes (thread-seconds per phase:
  read, edit, write, kernel copy of untouched ranges, fsync, hash),

and prints a JSON summary. Cold runs drop the source (and earlier outputs) from the page
cache with `posix_fadvise(DONTNEED)` after a `sync`; `cached_source` says how much of the
source was in the cache when each run started.

    .venv/bin/python bench/ablate_bench.py [--dir /big/tmp] [--keep] [--experts 8] [--slice DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import glm_slice  # noqa: E402

LAYERS = 2

SHARD_JOB = """
import json, sys, time
from abliterate.export import PhaseTimes, ablate_shard
from abliterate.recipe import Plan
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) / 1024
plan = Plan.load(sys.argv[1])
base = hwm()
times = PhaseTimes()
start = time.perf_counter()
ablate_shard(sys.argv[2], sys.argv[3], plan, sys.argv[4], digest=True, times=times)
wall = time.perf_counter() - start
print(json.dumps({"wall_s": wall, "peak_rss_MiB": hwm(), "rss_before_MiB": base,
                  "phases_thread_s": times.seconds}))
"""


# `abliterate` itself, reporting its peak RSS (VmHWM: all its threads, nothing inherited)
CLI_WITH_PEAK = """
import atexit, sys
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) / 1024
atexit.register(lambda: print('peak_rss_MiB', hwm(), file=sys.stderr))
sys.argv = ['abliterate', *sys.argv[1:]]
from abliterate.cli import main
sys.exit(main())
"""


def shard_job(plan_path: Path, model: Path, shard: str, out: Path) -> dict:
    """One shard job in a fresh process: wall, peak RSS (its own VmHWM: getrusage's
    RUSAGE_CHILDREN would report the parent's size, inherited across fork), phases."""
    result = subprocess.run(
        [sys.executable, "-c", SHARD_JOB, str(plan_path), str(model), shard, str(out)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    shutil.rmtree(out.parent)
    data = json.loads(result.stdout.strip().splitlines()[-1])
    data["phases_thread_s"] = {k: round(v, 2) for k, v in data["phases_thread_s"].items()}
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in data.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where to put the ~40 GB of temp files")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    parser.add_argument("--experts", type=int, default=128, help="fewer for a smoke run")
    parser.add_argument(
        "--slice",
        default=None,
        help="an existing slice directory (bench/glm_slice.py, same --experts) to reuse; kept",
    )
    args = parser.parse_args()
    from abliterate.export import export_model
    from abliterate.logs import setup_logging
    from abliterate.recipe import build_plan

    setup_logging(level=30)
    root = Path(tempfile.mkdtemp(prefix="ablate-bench-", dir=args.dir))
    try:
        start = time.perf_counter()
        if args.slice:
            model = Path(args.slice)
        else:
            model = glm_slice.build_slice(root, LAYERS, args.experts)
        build_s = time.perf_counter() - start
        size = sum(p.stat().st_size for p in model.iterdir())
        measurements = glm_slice.write_measurements(root / "measurements.safetensors", LAYERS)
        plans = {}
        for name, all_experts in (("guide_default", False), ("all_experts", True)):
            plans[name] = build_plan(
                glm_slice.recipe(LAYERS, all_experts), model=model, measurements=measurements
            )
            plans[name].save(root / f"plan-{name}.json")
        plan = plans["all_experts"]
        edited_shards = sorted({e.shard for e in plan.entries})
        runs: dict[str, list[dict]] = {}

        def record(name: str, seconds: float, cached: float) -> None:
            runs.setdefault(name, []).append({"s": round(seconds, 2), "cached_source": cached})

        def prepare(cold: bool) -> float:
            if cold:
                glm_slice.evict(root)
                glm_slice.evict(model)  # also when --slice put it outside root
            else:
                glm_slice.warm(model)
            return round(glm_slice.cached_fraction(model), 2)

        def run_cp(cold: bool = False) -> None:
            cached = prepare(cold)
            seconds = glm_slice.timed(lambda: glm_slice.copy_tree(model, root / "cp"))
            record("cp_cold" if cold else "cp", seconds, cached)
            shutil.rmtree(root / "cp")

        def run_export(name: str, cold: bool = False, **kwargs) -> None:
            out = root / "export"
            cached = prepare(cold)
            seconds = glm_slice.timed(lambda: export_model(plan, out, **kwargs))
            record(name, seconds, cached)
            shutil.rmtree(out)

        def run_cli(name: str, *flags: str) -> None:
            recipe_path = root / "recipe.yml"
            recipe_data = {
                **glm_slice.recipe(LAYERS, all_experts=True),
                "model": str(model),
                "measurements": str(measurements),
                "output": str(root / "cli-out"),
            }
            recipe_path.write_text(json.dumps(recipe_data))
            cached = prepare(False)
            command = [sys.executable, "-c", CLI_WITH_PEAK, "-q", "ablate", str(recipe_path)]
            done = {}
            seconds = glm_slice.timed(
                lambda: done.update(
                    run=subprocess.run(
                        [*command, *flags],
                        check=True,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                )
            )
            record(name, seconds, cached)
            peak = [line for line in done["run"].stderr.splitlines() if "peak_rss_MiB" in line]
            runs[name][-1]["peak_rss_MiB"] = round(float(peak[-1].split()[1])) if peak else None
            shutil.rmtree(root / "cli-out")
            for leftover in root.glob("cli-out.*"):
                leftover.unlink() if leftover.is_file() else shutil.rmtree(leftover)

        run_cp()
        for jobs in (1, 2):
            run_export(f"export_j{jobs}", jobs=jobs, hash_shards=False)
            run_export(f"export_j{jobs}_sha256", jobs=jobs, hash_shards=True)
            run_cp()
        for jobs in (1, 2):
            run_cp(cold=True)
            run_export(f"export_j{jobs}_cold", cold=True, jobs=jobs, hash_shards=False)
        for mode in ("copy", "hardlink", "auto"):
            run_export(f"export_j1_link_{mode}", jobs=1, hash_shards=False, link_mode=mode)
        embedding_shard = sorted(set(p.name for p in model.glob("*.safetensors")) -
                                 set(edited_shards))[0]  # fmt: skip
        glm_slice.warm(model)
        copy_one = glm_slice.timed(
            lambda: shutil.copyfile(model / embedding_shard, root / "one-shard")
        )
        (root / "one-shard").unlink()
        run_cli("cli_ablate_j1")
        run_cli("cli_ablate_j1_no_verify", "--no-verify")
        run_cli("cli_ablate_j1_full_verify", "--full-verify")
        run_cli("cli_ablate_j2", "-j", "2")
        run_cp()
        jobs_alone = {
            name: shard_job(
                root / f"plan-{name}.json", model, edited_shards[0], root / "job" / "out"
            )
            for name in plans
        }
        best = {name: min(r["s"] for r in rs) for name, rs in runs.items()}
        cp_s, cp_cold_s = best["cp"], best["cp_cold"]
        ratios = {
            name: round((cp_cold_s if name.endswith("_cold") else cp_s) / s, 3)
            for name, s in best.items()
            if not name.startswith("cp")
        }
        result = {
            "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f} at the end",
            "model_GB": round(size / 1e9, 2),
            "shards": {p.name: round(p.stat().st_size / 1e9, 2) for p in sorted(model.glob("*.safetensors"))},
            "edited_tensors": len(plan.entries),
            "edited_GB": round(sum(torch.Size(e.shape).numel() * 2 for e in plan.entries) / 1e9, 2),
            "build_s": round(build_s, 1),
            "best_s": best,
            "throughput_vs_cp": ratios,
            "copy_of_the_unedited_shard_s": round(copy_one, 2),
            "runs": runs,
            "shard_job_alone": jobs_alone,
        }  # fmt: skip
        print(json.dumps(result, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
