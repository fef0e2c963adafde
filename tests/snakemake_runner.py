"""Run the real workflow in a temporary directory on a cached demo organism.

Why one helper: every workflow test needs the same two things, a config whose model and
prompt sets point at an already trained organism (so nothing is retrained), and a
Snakemake run that finds the venv's `abliterate` command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def demo_model_config(model_dir: Path, name: str, validation: bool = False) -> dict:
    """The `model` and `prompts` config sections for a demo organism directory.

    `validation`: also name the organism's validation files (what the workflow does with
    its own demo organism, and what bench/quality_table.py measures with). The tests leave
    it off: the workflow then halves the test file into validation and test as for a
    user's model, which halves the search's prompts and keeps the suite within its time.
    """
    prompts = Path(model_dir) / "prompts"
    splits = ("train", "validation", "test") if validation else ("train", "test")
    return {
        "model": {"name": name, "path": str(model_dir)},
        "prompts": {
            cls: {split: str(prompts / f"{cls}_{split}.txt") for split in splits}
            for cls in ("target", "benign")
        },
    }


def snakemake(
    workdir: Path, *args: str, config: dict | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run Snakemake on the project's Snakefile in `workdir` (writing `config` first)."""
    if config is not None:
        (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ if env is None else env)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"  # tiny models, shared cores: one thread per job is fastest
    command = [str(BIN / "snakemake"), *args, "--snakefile", str(ROOT / "Snakefile")]
    command += ["--configfile", str(workdir / "config.yaml")]
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
