"""The README's own-model and command-line blocks, run exactly as printed.

Why parse README.md: a command that is only copied into a test drifts from the one users
read. Each block runs with bash in a fresh checkout as `make demo` leaves it, with the
venv *not* on PATH, so a rule or command that relies on an activated venv fails here
(tests/checkout.py).
"""

from __future__ import annotations

import json

import pytest
from checkout import first_bash_block, make_checkout, run_block


@pytest.mark.slow
def test_readme_command_line_block_runs_as_printed(tmp_path, demo_dense):
    block = first_bash_block("Command line")
    assert ".venv/bin/abliterate ablate" in block
    checkout = make_checkout(tmp_path, demo_dense)
    result = run_block(checkout, block)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "Detected layer prefix: model" in output
    assert "PASSED" in output
    assert (checkout / "legacy.refuse").is_file()
    assert (checkout / "analysis" / "layers.png").is_file()
    assert (checkout / "demo-abliterated" / "manifest.json").is_file()


@pytest.mark.slow
def test_readme_own_model_block_runs_as_printed(own_model_run):
    assert first_bash_block("Your own model").startswith(".venv/bin/snakemake ")
    checkout, result = own_model_run
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    results = checkout / "results" / "local-model"
    assert json.loads((results / "verify.json").read_text())["ok"] is True
    assert (results / "abliterated" / "config.json").is_file()
