"""A copy of the repository as a user has it after `make demo`, and the README's commands.

Why: the README's commands must work exactly as printed, from a fresh clone, with the venv
not activated. A checkout here is the repository's files (git ls-files), `.venv` (a link
to the venv running the tests) and the dense demo organism at `resources/demo/llama-seed0`,
the two things `make demo` leaves behind.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from snakemake_runner import ROOT

README = ROOT / "README.md"
CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"  # when PATH had nothing but the venv


def first_bash_block(section: str) -> str:
    """The first ```bash block under the README heading `## section`."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {section}' section"
    block = re.search(r"```bash\n(.*?)```", match.group(1), re.S)
    assert block, f"README.md section '{section}' has no bash block"
    return block.group(1)


def make_checkout(destination: Path, demo_dense: Path) -> Path:
    """The repository's files, `.venv` and the demo organism, under `destination`."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    (destination / ".venv").symlink_to(Path(sys.prefix))
    shutil.copytree(demo_dense, destination / "resources" / "demo" / "llama-seed0")
    return destination


def clean_env(base: dict | None = None) -> dict:
    """`base` (default: this process's environment) with the venv taken off PATH."""
    env = {
        key: value
        for key, value in (os.environ if base is None else base).items()
        if key not in ("VIRTUAL_ENV", "CONDA_PREFIX")
    }
    venv = str(Path(sys.prefix))
    kept = [part for part in env.get("PATH", "").split(":") if part and not part.startswith(venv)]
    env["PATH"] = ":".join(kept) or CLEAN_PATH
    env["OMP_NUM_THREADS"] = "1"  # tiny models, shared cores
    assert shutil.which("abliterate", path=env["PATH"]) is None
    return env


def run_block(checkout: Path, block: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a README block with bash, as printed, in `checkout`."""
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=checkout, env=clean_env(env), capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
