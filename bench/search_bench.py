"""Search throughput: trials per minute on the demo organism with 1 and 2 workers.

Each worker is a separate process (as a search_worker job is) that loads the model, scores
the base model once, then asks the shared journal study for trials. Reported per worker
count: the wall time from starting the processes to the last one finishing, and trials per
minute both over that wall time (what a user waits for, model loads included) and over the
trials' own span (first trial started to last trial finished: the search loop alone).

Usage: python bench/search_bench.py [--model DIR] [--trials 12] [--prompts 50]
Numbers go to docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

EVALUATE = {"device": "cpu", "max_new_tokens": 16, "kl_tokens": 8}
PROMPTS = {"field": None, "seed": 0, "system": None, "fallback_template": False}


def setup(model_dir: Path, work: Path, n_prompts: int) -> dict:
    from abliterate.layout import inspect_checkpoint
    from abliterate.measure import measure_to_file

    inspect_checkpoint(model_dir).save(work / "layout.json")
    prompts = model_dir / "prompts"
    measure_to_file(
        model_dir,
        str(prompts / "target_train.txt"),
        str(prompts / "benign_train.txt"),
        work / "measurements.safetensors",
        device="cpu",
        progress=False,
    )
    validation = {}
    for cls in ("target", "benign"):
        lines = (prompts / f"{cls}_test.txt").read_text().splitlines()[:n_prompts]
        validation[cls] = str(work / f"{cls}_validation.txt")
        Path(validation[cls]).write_text("\n".join(lines) + "\n")
    return {
        "model_dir": str(model_dir),
        "layout_path": str(work / "layout.json"),
        "measurements_path": str(work / "measurements.safetensors"),
        "validation": validation,
        "recipe_config": {},
        "evaluate_config": EVALUATE,
        "prompts_config": PROMPTS,
    }


def run(common: dict, work: Path, workers: int, trials: int) -> dict:
    from abliterate.search import open_study, parse_settings
    from abliterate.search_steps import init_study

    sweep = {"n_trials": trials, "n_startup_trials": 4, "workers": workers}
    directory = work / f"workers-{workers}"
    directory.mkdir()
    study_json = directory / "study.json"
    init_study(
        journal=directory / "study.journal",
        study_json=study_json,
        suggested_path=None,
        sweep_config=sweep,
        **common,
    )
    code = (
        "import json, sys; from abliterate.search_steps import worker; "
        "worker(**json.loads(sys.argv[1]))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    start = time.perf_counter()
    processes = []
    for index in range(workers):
        args = dict(common, study_json=str(study_json), worker_index=index, sweep_config=sweep)
        args["output"] = None
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", code, json.dumps(args)],
                env=env,
                stderr=subprocess.DEVNULL,
            )
        )
    for process in processes:
        if process.wait() != 0:
            raise SystemExit(f"a worker failed (exit {process.returncode})")
    wall = time.perf_counter() - start
    data = json.loads(study_json.read_text())
    study = open_study(data["journal"], data["fingerprint"], parse_settings(sweep))
    done = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    span = (
        max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)
    ).total_seconds()
    return {
        "workers": workers,
        "trials": len(done),
        "wall_s": round(wall, 1),
        "trials_per_min_wall": round(60 * len(done) / wall, 1),
        "trials_per_min_loop": round(60 * len(done) / span, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="demo organism directory")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=50, help="validation prompts per class")
    args = parser.parse_args()
    if args.model is None:
        from conftest import _demo

        args.model = _demo("llama")
    print(f"{os.cpu_count()} CPUs; demo {args.model.name}; {args.prompts} prompts per class")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        common = setup(args.model, work, args.prompts)
        for workers in (1, 2):
            print(json.dumps(run(common, work, workers, args.trials)))


if __name__ == "__main__":
    main()
