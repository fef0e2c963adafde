"""The project's own style gates run as part of the suite, so a red lint fails CI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PY_PATHS = ["src", "tests", "bench", "workflow/scripts"]


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def existing(paths):
    return [p for p in paths if (ROOT / p).exists()]


def test_ruff_check_is_clean():
    result = run(str(BIN / "ruff"), "check", *existing(PY_PATHS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean():
    result = run(str(BIN / "ruff"), "format", "--check", *existing(PY_PATHS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_snakefmt_is_clean():
    result = run(str(BIN / "snakefmt"), "--check", "Snakefile", "workflow/rules")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_snakemake_lint_is_clean():
    result = run(str(BIN / "snakemake"), "--lint", "--cores", "1")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Congratulations, your workflow is in a good condition!" in output, output
