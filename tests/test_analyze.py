"""Per-index metrics, the suggestion rule, and the analysis files."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import yaml
from snakemake_runner import demo_model_config, snakemake

from abliterate.analyze import auroc, layer_metrics, onset_auroc, suggest_recipe, write_analysis
from abliterate.measure import Measurements


def test_auroc_hand_cases():
    assert auroc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert auroc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5
    # pairs (pos, neg): (2,1) win, (2,3) loss, (4,1) win, (4,3) win -> 3/4
    assert auroc(torch.tensor([2.0, 4.0]), torch.tensor([1.0, 3.0])) == 0.75
    assert math.isnan(auroc(torch.tensor([]), torch.tensor([1.0])))


def synthetic() -> Measurements:
    """Index 0: equal means; 1: d=(0,1) orthogonal to benign (1,0); 2: d=(1,1)."""
    target = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 1.0]], dtype=torch.float64)
    benign = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    target_proj = torch.tensor([[0.0, 0.0], [2.0, 3.0], [1.0, 3.0]])
    benign_proj = torch.tensor([[0.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    return Measurements(target, benign, target_proj, benign_proj, meta={"num_layers": 2})


def test_layer_metrics_hand_computed():
    df = layer_metrics(synthetic()).set_index("measurement")
    assert math.isnan(df.loc[0, "snr"]) and math.isnan(df.loc[0, "auroc"])
    assert df.loc[0, "cos_means"] == pytest.approx(1.0)
    row = df.loc[1]
    assert row.direction_norm == pytest.approx(1.0)
    assert row.snr == pytest.approx(1.0 / math.sqrt(2))  # |d| / |target (1,1)|
    assert row.purity == pytest.approx(1.0)  # (0,1) is orthogonal to benign (1,0)
    assert row.quality == pytest.approx(row.snr * row.purity)
    assert row.cos_means == pytest.approx(1 / math.sqrt(2))
    assert row.auroc == 1.0
    row = df.loc[2]
    assert row.purity == pytest.approx(1 / math.sqrt(2))  # (1,1): half its energy along (1,0)
    assert row.cos_prev == pytest.approx(1 / math.sqrt(2))
    assert row.angle_deg == pytest.approx(45.0)
    assert row.auroc == 0.75


def metrics_frame(rows):
    return pd.DataFrame(rows, columns=["measurement", "auroc", "quality", "snr", "purity"])


def test_suggestion_prefers_best_separation_then_quality_and_respects_min_fraction():
    df = metrics_frame(
        [
            (0, float("nan"), float("nan"), float("nan"), float("nan")),
            (1, 0.99, 5.0, 5.0, 1.0),  # excluded by min_layer_fraction (start = 2 of 8)
            (2, 0.80, 0.2, 0.2, 1.0),
            (3, 0.97, 0.3, 0.3, 1.0),  # onset: first index with AUROC >= 0.95 ... is 1
            (4, 1.00, 0.4, 0.4, 1.0),
            (5, 0.998, 0.9, 0.9, 1.0),  # within tolerance of the best AUROC, best quality
            (6, 0.90, 2.0, 2.0, 1.0),
            (7, 1.00, 0.1, 0.1, 1.0),
            (8, 1.00, 0.5, 0.5, 1.0),
        ]
    )
    recipe, why = suggest_recipe(df, 8, min_layer_fraction=0.25)
    layers = [entry["layer"] for entry in recipe["ablate"]]
    assert {entry["measurement"] for entry in recipe["ablate"]} == {5}
    assert layers == list(range(0, 8))  # onset index 1 -> from layer 0
    assert all(entry["scale"] == 1.0 and entry["sparsity"] == 0.0 for entry in recipe["ablate"])
    assert "measurement 5" in why and "layers 0..7" in why


def test_onset_is_the_first_index_clearly_above_chance():
    # 400 prompts per class: chance-level standard error ~0.0204, so 0.6 is the bar
    assert onset_auroc(400, 400) == pytest.approx(0.6)
    assert onset_auroc(10, 10) == pytest.approx(0.5 + 4 * math.sqrt(21 / 1200))
    df = metrics_frame(
        [
            (0, float("nan"), float("nan"), float("nan"), float("nan")),
            (1, 0.55, 0.1, 0.1, 1.0),  # at chance level: layer 0 writes nothing
            (2, 0.73, 0.2, 0.2, 1.0),  # clearly separable: layer 1 writes part of it
            (3, 1.00, 0.9, 0.9, 1.0),
            (4, 1.00, 0.8, 0.8, 1.0),
        ]
    )
    recipe, why = suggest_recipe(df, 4, counts=(400, 400))
    assert [e["layer"] for e in recipe["ablate"]] == [1, 2, 3]
    assert recipe["ablate"][0]["measurement"] == 3
    assert "index 2" in why
    small, _ = suggest_recipe(df, 4, counts=(12, 12))  # bar 0.98: 0.73 is noise for 12 prompts
    assert [e["layer"] for e in small["ablate"]] == [2, 3]


def test_suggestion_without_projections_uses_quality():
    df = metrics_frame(
        [
            (0, float("nan"), float("nan"), float("nan"), float("nan")),
            (1, float("nan"), 0.05, 0.05, 1.0),
            (2, float("nan"), 0.08, 0.08, 1.0),
            (3, float("nan"), 0.6, 0.6, 1.0),  # >= 0.1 of the best quality: onset -> layer 2
            (4, float("nan"), 1.0, 1.0, 1.0),
        ]
    )
    recipe, why = suggest_recipe(df, 4)
    assert [e["layer"] for e in recipe["ablate"]] == [2, 3]
    assert recipe["ablate"][0]["measurement"] == 4
    assert "quality" in why


def test_write_analysis_files_and_moe_heatmap(tmp_path):
    meas = synthetic()
    meas.target_expert_counts = torch.tensor([[0, 0, 0], [5, 1, 0]])
    meas.benign_expert_counts = torch.tensor([[0, 0, 0], [1, 1, 4]])
    meas.target_router_tokens = torch.tensor([0, 3])
    meas.benign_router_tokens = torch.tensor([0, 3])
    write_analysis(meas, tmp_path, title="synthetic")
    table = pd.read_csv(tmp_path / "layers.tsv", sep="\t")
    assert list(table.measurement) == [0, 1, 2] and "auroc" in table.columns
    recipe = yaml.safe_load((tmp_path / "suggested.yaml").read_text())
    assert set(recipe["ablate"][0]) == {"layer", "measurement", "scale", "sparsity"}
    assert "picked by this rule" in (tmp_path / "suggested.txt").read_text()
    for name in ("layers.png", "rotation.png", "experts.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.slow
def test_workflow_measures_and_analyzes_the_demo_organism(demo_dense, tmp_path):
    """snakemake measure + analyze on the (already trained) demo organism, in a temp dir."""
    config = {**demo_model_config(demo_dense, "t"), "measure": {"batch_size": 64}}
    result = snakemake(tmp_path, "--cores", "2", "results/t/analysis/suggested.yaml", config=config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = tmp_path / "results" / "t"
    assert (results / "measurements.json").is_file()
    assert (results / "benchmarks" / "measure.tsv").is_file()
    assert "Wrote measurements" in (results / "logs" / "measure.log").read_text()
    table = pd.read_csv(results / "analysis" / "layers.tsv", sep="\t")
    assert table.auroc.max() >= 0.95
    recipe = yaml.safe_load((results / "analysis" / "suggested.yaml").read_text())
    assert recipe["ablate"], recipe
    # analyze.intervene (default): the candidates ranked on the validation split; the
    # suggestion is the winner's tested recipe (every writer, plain projection)
    ranked = pd.read_csv(results / "analysis" / "interventions.tsv", sep="\t")
    assert ranked.measurement.max() == 5  # the post-final-norm index is always tried
    assert ranked.score.is_monotonic_increasing
    assert ranked.refusal_rate.iloc[0] <= 0.1 and ranked.benign_kept.iloc[0] >= 0.9
    assert {e["measurement"] for e in recipe["ablate"]} == {int(ranked.measurement.iloc[0])}
    assert recipe["norm_preserve"] is False and "embed" in recipe["ablate"][0]["components"]
    assert "picked by intervention" in (results / "analysis" / "suggested.txt").read_text()
    assert (results / "prompts" / "target_validation.json").is_file()
