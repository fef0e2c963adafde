"""The whole workflow on the demo organisms: config -> sweep -> selected recipe -> verified export.

Runs Snakemake in a temporary directory with `model.path` pointing at the cached organism
(so nothing is retrained) and a small sweep, then checks what a user would look at.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from snakemake_runner import demo_model_config, snakemake
from test_gguf import NO_CONVERTER, needs_converter

_RUNS: dict[str, Path] = {}


def demo_config(model_dir: Path, name: str, gguf: bool = False, **sweep) -> dict:
    return {
        **demo_model_config(model_dir, name),
        "measure": {"device": "cpu"},
        "sweep": {  # the default config's grid lists (config/config.yaml), run as a grid
            "method": "grid",
            "scale": [1.0, 0.95, 0.9],
            "layers": ["suggested", "all"],
            "norm_preserve": [True, False],
            "chunk_size": 12,  # one evaluation job (one model load) per run
            **sweep,
        },
        # all ~100 held-out prompts per class: the refusal target is judged at 0.1
        "evaluate": {"device": "cpu", "max_new_tokens": 10, "kl_tokens": 4},
        "select": {"max_refusal_rate": 0.1},
        "export": {"device": "cpu", "gguf": gguf},
    }


def run_workflow(tmp_path_factory, model_dir: Path, name: str, gguf: bool = False, **sweep) -> Path:
    """Run the default target once per config and test session; return the work dir.

    Runs are keyed by the whole config, not the name: a second grid for the same organism
    is a second run, never the first one's results.
    """
    config = yaml.safe_dump(demo_config(model_dir, name, gguf, **sweep), sort_keys=True)
    if config not in _RUNS:
        workdir = tmp_path_factory.mktemp(f"workflow-{name}")
        (workdir / "config.yaml").write_text(config)
        result = snakemake(workdir, "--cores", "2")
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
        _RUNS[config] = workdir
    return _RUNS[config]


@pytest.fixture(scope="session")
def dense_run(tmp_path_factory, demo_dense) -> Path:
    """The default workflow on the dense organism, with `export.gguf` when it can."""
    return run_workflow(tmp_path_factory, demo_dense, "demo", gguf=not NO_CONVERTER)


def selected_row(results: Path) -> pd.Series:
    table = pd.read_csv(results / "sweep.tsv", sep="\t")
    assert table["selected"].sum() == 1
    return table[table["selected"].astype(bool)].iloc[0]


@pytest.mark.slow
def test_dry_run_lists_the_whole_dag(tmp_path, demo_dense):
    config = demo_config(demo_dense, "demo", chunk_size=2)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "-n", "--cores", "2")
    assert result.returncode == 0, result.stderr[-4000:]
    output = result.stdout + result.stderr
    for rule in (
        "inspect_model",
        "measure",
        "analyze",
        "evaluate_variants",
        "aggregate_sweep",
        "verify_model",
    ):
        assert rule in output, rule
    # 12 variants in chunks of 2 -> six evaluation jobs, each loading the model once
    assert "chunk-5.tsv" in output and "chunk-6.tsv" not in output


@pytest.mark.slow
def test_dense_workflow_ends_with_a_verified_export_of_the_selected_recipe(dense_run):
    results = dense_run / "results" / "demo"
    table = pd.read_csv(results / "sweep.tsv", sep="\t")
    assert list(table["variant"])[0] == "base"
    assert len(table) == 1 + 12
    assert table["selected"].sum() == 1
    base = table.iloc[0]
    assert base["kl_first_token"] == 0 and base["benign_kept"] == 1
    plain = table[
        (table["variant"] != "base")
        & (table["layers"] == "all")
        & (~table["norm_preserve"].astype(bool))
    ]
    plain = plain[plain["scale"] == 1.0]
    assert len(plain) == 1  # the plain full-strength variant is in the table to compare with
    best = selected_row(results)
    assert base["refusal_rate"] >= 0.9
    assert best["refusal_rate"] <= 0.1 and best["benign_kept"] >= 0.9
    assert best["kl_first_token"] < plain.iloc[0]["kl_first_token"]
    best_recipe = yaml.safe_load((results / "best.yaml").read_text())
    assert best_recipe["ablate"] and {"layer", "measurement", "scale", "sparsity"} <= set(
        best_recipe["ablate"][0]
    )
    selected = table[table["selected"].astype(bool)].iloc[0]
    assert selected["variant"] in (results / "best.txt").read_text()
    for figure in ("pareto.png", "heatmap.png"):
        assert (results / figure).stat().st_size > 10_000
    assert "<table>" in (results / "samples.html").read_text()
    verify = json.loads((results / "verify.json").read_text())
    assert verify["ok"] is True
    exported = results / "abliterated"
    assert (exported / "config.json").is_file()
    # what a folder upload publishes: no tool files, a card the Hub parses
    assert not [p.name for p in exported.iterdir() if p.name.startswith(".")]
    from huggingface_hub import ModelCard

    card = ModelCard.load(exported / "README.md")
    assert card.data.library_name == "transformers" and card.data.tags[0] == "abliterated"
    assert f"`{selected['variant']}`, measured on the test split" in card.text
    assert "| refusal rate on harmful prompts |" in card.text and "**Passed**" in card.text


@pytest.mark.slow
@needs_converter
def test_dense_workflow_writes_a_checked_gguf_beside_the_export(dense_run):
    results = dense_run / "results" / "demo"
    report = json.loads((results / "gguf.json").read_text())
    assert report["ok"] and report["block_count"] == report["num_hidden_layers"]
    plan = json.loads((results / "export" / "plan.json").read_text())
    assert {c["key"] for c in report["checked"]} == {e["key"] for e in plan["entries"]}
    assert (results / "abliterated.gguf").stat().st_size == report["bytes"]
    assert not list(results.glob(".*partial"))  # no half-written GGUF left behind
    assert not [p for p in (results / "abliterated").iterdir() if p.suffix == ".gguf"]
    assert "edited tensors equal to the export" in (results / "gguf.txt").read_text()


@pytest.mark.slow
def test_schema_violation_names_the_key(tmp_path, demo_dense):
    config = demo_config(demo_dense, "demo")
    config["evaluate"]["max_new_tokens"] = 0
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "-n", "--cores", "1")
    assert result.returncode != 0
    assert "max_new_tokens" in result.stdout + result.stderr


@pytest.mark.slow
def test_bad_sweep_value_names_the_key(tmp_path, demo_dense):
    config = demo_config(demo_dense, "demo", layers=["5-2"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "-n", "--cores", "1")
    assert result.returncode != 0
    assert "sweep.layers: expected 'suggested', 'all' or a range" in result.stdout + result.stderr


@pytest.mark.slow
def test_moe_workflow_sweeps_expert_strategies_and_exports_the_best(tmp_path_factory, demo_moe):
    workdir = run_workflow(
        tmp_path_factory,
        demo_moe,
        "demo-moe",
        scale=[1.0],
        layers=["all"],
        norm_preserve=[False],
        experts=["none", "all"],
    )
    results = workdir / "results" / "demo-moe"
    table = pd.read_csv(results / "sweep.tsv", sep="\t")
    assert sorted(table["experts"].dropna().unique()) == ["all", "none"]
    best = selected_row(results)
    assert best["refusal_rate"] <= 0.1 and best["benign_kept"] >= 0.9
    assert table.iloc[0]["refusal_rate"] >= 0.9  # the base model refuses
    recipe = yaml.safe_load((results / "best.yaml").read_text())
    assert recipe["ablate_individual_experts"] is (best["experts"] == "all")
    assert json.loads((results / "verify.json").read_text())["ok"] is True
    assert (results / "analysis" / "experts.png").is_file()
    attribution = pd.read_csv(results / "analysis" / "experts.tsv", sep="\t")
    assert sorted(attribution.layer.unique()) == [1, 2, 3]  # layer 0 is dense
    assert (results / "analysis" / "expert_share.png").is_file()
    # routing shift: zero for the base model, measured for every variant, per layer on the side
    routing = [
        "routing_kl_benign",
        "routing_kl_target",
        "topk_changed_benign",
        "topk_changed_target",
    ]
    assert (table.iloc[0][routing] == 0).all() and table[routing].notna().all().all()
    per_layer = json.loads((results / "sweep_routing.json").read_text())
    assert set(per_layer) == set(table["variant"])
    assert (results / "routing.png").stat().st_size > 10_000
