"""Search throughput: trials per minute on the demo organism with 1 and 2 workers.

Each worker is a separate process (as a search_worker job is) that loads the model, scores
the base model once, then asks the shared journal study for trials. Reported per worker
count: the wall time from starting the processes to the last one finishing, and trials per
minute both over that wall time (what a user waits for, model loads included) and over the
trials' own span (first trial started to last trial finished: the search loop alone).

Usage: .venv/bin/python bench/search_bench.py [--model DIR] [--trials 12] [--prompts 50]
Numbers go to docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from search_fixtures import search_inputs, start_study, worker_process  # noqa: E402

EVALUATE = {"device": "cpu", "max_new_tokens": 16, "kl_tokens": 8}


def run(common: dict, work: Path, workers: int, trials: int) -> dict:
    from abliterate.search import open_study, parse_settings

    sweep = {"n_trials": trials, "n_startup_trials": 4, "workers": workers}
    directory = work / f"workers-{workers}"
    directory.mkdir()
    study_json = start_study(common, directory, sweep)
    start = time.perf_counter()
    processes = [
        worker_process(common, study_json, sweep, index, output=False) for index in range(workers)
    ]
    for process in processes:
        _, err = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"a worker failed (exit {process.returncode}): {err[-2000:]}")
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
        common = search_inputs(args.model, work, args.prompts, EVALUATE)
        for workers in (1, 2):
            print(json.dumps(run(common, work, workers, args.trials)))


if __name__ == "__main__":
    main()
