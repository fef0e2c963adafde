"""Inputs of a search on a demo organism, and a search worker in its own process.

Shared by tests/test_search.py and bench/search_bench.py: both need the layout, the
measurements and validation prompts of a demo organism, and workers that run as separate
processes on one journal, the way Snakemake runs search_worker jobs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = {"field": None, "seed": 0, "system": None, "fallback_template": False}


def search_inputs(model_dir: Path, work: Path, n_prompts: int, evaluate: dict) -> dict:
    """Layout, measurements and the first `n_prompts` held-out prompts per class (as
    validation), as keyword arguments of `abliterate.search_steps` steps."""
    from abliterate.layout import inspect_checkpoint
    from abliterate.measure import MeasureOptions, measure_to_file
    from abliterate.model import LoadOptions

    inspect_checkpoint(model_dir).save(work / "layout.json")
    prompts = Path(model_dir) / "prompts"
    measure_to_file(
        model_dir,
        str(prompts / "target_train.txt"),
        str(prompts / "benign_train.txt"),
        work / "measurements.safetensors",
        MeasureOptions(progress=False, load=LoadOptions(device="cpu")),
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
        "evaluate_config": evaluate,
        "prompts_config": PROMPTS,
    }


def start_study(inputs: dict, directory: Path, sweep: dict) -> Path:
    """Create the study in `directory` (search_init); returns its study.json."""
    from abliterate.search_steps import init_study

    study_json = directory / "study.json"
    init_study(
        journal=directory / "study.journal",
        study_json=study_json,
        suggested_path=None,
        sweep_config=sweep,
        **inputs,
    )
    return study_json


def worker_process(
    inputs: dict, study_json: Path, sweep: dict, index: int, output: bool = True
) -> subprocess.Popen:
    """A search worker in its own process; it writes worker-{index}.json when `output`."""
    args = dict(inputs, study_json=str(study_json), worker_index=index, sweep_config=sweep)
    args["output"] = str(study_json.parent / f"worker-{index}.json") if output else None
    code = (
        "import json, sys; from abliterate.search_steps import worker; "
        "worker(**json.loads(sys.argv[1]))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(args)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
