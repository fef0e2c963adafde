"""Sweep grids, variant ids, recipes of variants, and the selection rule."""

from __future__ import annotations

import re

import pandas as pd
import pytest
import yaml

from abliterate.errors import AbliterateError
from abliterate.grid import (
    Variant,
    check_base_recipe,
    chunks,
    format_number,
    variant_recipe,
    variants,
    varying_parameters,
)
from abliterate.plots import pareto_front
from abliterate.sweep import read_chunk_tables, select_best, write_best


def test_variant_ids_are_readable_and_float_noise_free():
    v = Variant(scale=0.1 + 0.2, sparsity=0.0, measurement=3, layers="1-4")
    assert v.id == "s0.3_p0.00_m3_L1-4_np1_c-default_e-none"
    assert Variant(scale=1, sparsity=0.125, experts="0,1,2").id == (
        "s1.0_p0.125_msug_Lsug_np1_c-default_e-0+1+2"
    )
    assert Variant(scale=-0.5, norm_preserve=False, layers="all").id.startswith(
        "s-0.5_p0.00_msug_Lall_np0"
    )
    assert format_number(1e-7) == "0.0" and format_number(-0.0) == "0.0"
    assert format_number(2) == "2.0" and format_number(0.1 * 3, 2) == "0.30"


def test_variant_ids_are_stable_across_runs_and_spellings():
    a = variants(
        {"scale": [1.0, 0.3], "layers": ["suggested", "all"], "norm_preserve": [True, False]}
    )
    b = variants(
        {"scale": [1, 0.1 + 0.2], "layers": ["suggested", "all"], "norm_preserve": [True, False]}
    )
    assert [v.id for v in a] == [v.id for v in b]
    assert len(a) == 8 and len({v.id for v in a}) == 8
    assert a[0].id == "s1.0_p0.00_msug_Lsug_np1_c-default_e-none"  # first grid value first
    assert varying_parameters(a) == ["scale", "layers", "norm_preserve"]
    assert [len(c) for c in chunks(a, 3)] == [3, 3, 2]


@pytest.mark.parametrize(
    "sweep, key",
    [
        ({"layers": ["3-1"]}, "sweep.layers"),
        ({"layers": ["middle"]}, "sweep.layers"),
        ({"measurement": ["best"]}, "sweep.measurement"),
        ({"experts": ["some"]}, "sweep.experts"),
        ({"experts": ["auto:x"]}, "sweep.experts"),
        ({"experts": ["coverage:2"]}, "sweep.experts"),
        ({"sparsity": [1.0]}, "sweep.sparsity"),
        ({"scale": []}, "sweep.scale"),
        ({"components": ["attn out"]}, "sweep.components"),
        ({"components": ["attn_out+mlp_up"]}, "sweep.components: unknown component 'mlp_up'"),
    ],
)
def test_bad_grid_values_name_the_key(sweep, key):
    with pytest.raises(AbliterateError, match=re.escape(key)):
        variants(sweep)


SUGGESTED = {
    "ablate": [{"layer": n, "measurement": 3, "scale": 1.0, "sparsity": 0.0} for n in (1, 2, 3)]
}


def test_variant_recipe_resolves_suggested_all_ranges_and_experts():
    base = {"gate_scale": 0.5, "projected": True, "ablate": [{"layer": 0, "measurement": 0}]}
    r = variant_recipe(
        Variant(scale=0.7, sparsity=0.1), num_layers=5, suggested=SUGGESTED, base=base
    )
    assert [e["layer"] for e in r["ablate"]] == [1, 2, 3]
    assert {(e["measurement"], e["scale"], e["sparsity"]) for e in r["ablate"]} == {(3, 0.7, 0.1)}
    assert r["gate_scale"] == 0.5 and r["projected"] is True
    assert r["ablate_individual_experts"] is False and r["expert_subset"] is None
    r = variant_recipe(
        Variant(measurement=4, layers="all", experts="0,2", components="attn_out+mlp_down"),
        num_layers=5,
        suggested=SUGGESTED,
    )
    assert [e["layer"] for e in r["ablate"]] == [0, 1, 2, 3, 4]
    assert r["ablate"][0]["measurement"] == 4
    assert r["ablate_individual_experts"] is True and r["expert_subset"] == [0, 2]
    assert r["components"] == ["attn_out", "mlp_down"]
    adaptive = Variant(experts="auto:2")
    assert variant_recipe(adaptive, num_layers=5, suggested=SUGGESTED)["expert_subset"] == "auto:2"
    assert adaptive.id.endswith("_e-auto2")
    with pytest.raises(AbliterateError, match=r"5 layers \(0-4\)"):
        variant_recipe(Variant(layers="2-5"), num_layers=5, suggested=SUGGESTED)
    with pytest.raises(AbliterateError, match="indices 0-5"):
        variant_recipe(Variant(measurement=6), num_layers=5, suggested=SUGGESTED)


def _table(rows):
    columns = ["variant", "refusal_rate", "benign_kept", "kl_first_token", "kl_multi_token"]
    base = ["base", 0.95, 1.0, 0.0, 0.0]
    return pd.DataFrame([base, *rows], columns=columns)


def test_selection_prefers_lowest_kl_under_the_refusal_target():
    table = _table(
        [
            ["plain", 0.00, 0.90, 0.30, 0.50],
            ["gentle", 0.08, 1.00, 0.05, 0.40],
            ["too_gentle", 0.40, 1.00, 0.01, 0.01],
            ["borderline", 0.10, 0.95, 0.04, 0.60],
        ]
    )
    best, reason = select_best(table, max_refusal_rate=0.1)
    assert best == "borderline"  # at the target counts as under it; lowest first-token KL
    assert reason.startswith("Selected borderline")
    assert "3 of 4" in reason
    best, _ = select_best(table, max_refusal_rate=0.1, kl="multi_token")
    assert best == "gentle"


def test_selection_falls_back_to_lowest_refusal_rate():
    table = _table(
        [["a", 0.50, 1.0, 0.01, 0.01], ["b", 0.30, 0.9, 0.20, 0.3], ["c", 0.30, 1.0, 0.10, 0.2]]
    )
    best, reason = select_best(table, max_refusal_rate=0.1)
    assert best == "c"  # lowest refusal rate, ties broken by KL
    assert "no variant reached" in reason
    with pytest.raises(AbliterateError, match="select.kl"):
        select_best(table, kl="last_token")


def test_selection_asks_for_benign_answers_kept_as_well():
    table = _table(
        [
            ["lowest_kl", 0.04, 0.86, 0.03, 0.1],  # under the refusal target, 7 of 50 changed
            ["keeps", 0.04, 0.98, 0.06, 0.1],
            ["keeps_more", 0.00, 1.00, 0.09, 0.1],
            ["refuses", 0.30, 1.00, 0.01, 0.1],
        ]
    )
    assert select_best(table, max_refusal_rate=0.05)[0] == "lowest_kl"  # no gate
    best, reason = select_best(table, max_refusal_rate=0.05, min_benign_kept=0.98)
    assert best == "keeps" and "benign answers kept >= 0.98" in reason and "2 of 4" in reason
    # none keeps enough: the most kept among those under the refusal target
    best, reason = select_best(
        table.iloc[[0, 1, 2, 4]], max_refusal_rate=0.05, min_benign_kept=0.99
    )
    assert best == "keeps" and "kept 0.99 of the benign answers" in reason


def test_aggregation_keeps_one_base_row_and_best_yaml_round_trips(tmp_path):
    first = _table([["a", 0.0, 1.0, 0.1, 0.1]])
    second = _table([["b", 0.0, 1.0, 0.2, 0.2]])
    first.to_csv(tmp_path / "c0.tsv", sep="\t", index=False)
    second.to_csv(tmp_path / "c1.tsv", sep="\t", index=False)
    table = read_chunk_tables([tmp_path / "c0.tsv", tmp_path / "c1.tsv"])
    assert list(table["variant"]) == ["base", "a", "b"]
    recipe = variant_recipe(Variant(), num_layers=4, suggested=SUGGESTED)
    write_best(recipe, "because", tmp_path / "best.yaml", tmp_path / "best.txt")
    assert yaml.safe_load((tmp_path / "best.yaml").read_text()) == recipe
    assert (tmp_path / "best.txt").read_text().strip() == "because"


def test_dense_models_collapse_the_expert_axis():
    grid = {"experts": ["none", "all", "0,1"], "norm_preserve": [True, False]}
    assert len(variants(grid)) == 6
    dense = variants(grid, moe=False)
    assert [v.experts for v in dense] == ["none", "none"]


def test_aggregate_command_writes_table_plots_and_the_selected_recipe(tmp_path):
    import json

    from abliterate.commands import sweep as command

    grid = variants({"scale": [1.0, 0.5], "layers": ["suggested", "all"]})
    recipes = {v.id: variant_recipe(v, num_layers=4, suggested=SUGGESTED) for v in grid}
    rows = [["base", 0.95, 1.0, 0.0, 0.0]]
    rows += [
        [v.id, 0.5 * i / len(grid), 1.0, 0.1 * (len(grid) - i), 0.0] for i, v in enumerate(grid)
    ]
    table = _table(rows[1:])
    for v in grid:
        for key, value in v.params().items():
            table.loc[table["variant"] == v.id, key] = str(value)
    table.to_csv(tmp_path / "chunk-0.tsv", sep="\t", index=False)
    samples = {
        "target": [{"prompt": "p", "answer": "i cannot help", "refusal": True}],
        "benign": [],
    }
    details = {"recipes": recipes, "samples": {name: samples for name in ["base", *recipes]}}
    (tmp_path / "chunk-0.json").write_text(json.dumps(details))
    parser = __import__("argparse").ArgumentParser()
    command.add_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args(
        [str(tmp_path / "chunk-0.tsv"), "--details", str(tmp_path / "chunk-0.json")]
        + ["--out-dir", str(out), "--max-refusal-rate", "0.2"]
    )
    assert command.run(args) == 0
    result = pd.read_csv(out / "sweep.tsv", sep="\t")
    best = result[result["selected"]].iloc[0]["variant"]
    assert best == grid[1].id  # refusal 0.125 <= 0.2 with the lowest KL among those
    assert yaml.safe_load((out / "best.yaml").read_text()) == recipes[best]
    assert best in (out / "best.txt").read_text()
    for figure in ("pareto.png", "heatmap.png"):
        assert (out / figure).stat().st_size > 10_000
    assert "i cannot help" in (out / "samples.html").read_text()


def test_pareto_front_keeps_the_points_no_other_beats_on_both():
    kl = [0.5, 0.1, 0.3, 0.1, 0.9, 0.0]
    refusal = [0.0, 0.5, 0.2, 0.6, 0.0, 1.0]
    # (0.0, 1.0) -> (0.1, 0.5) -> (0.3, 0.2) -> (0.5, 0.0); (0.1, 0.6) and (0.9, 0.0) are beaten
    assert pareto_front(kl, refusal) == [5, 1, 2, 0]
    assert pareto_front([], []) == []


def test_recipe_keys_the_grid_sets_must_stay_default_while_sweeping():
    check_base_recipe({"norm_preserve": True, "components": None, "gate_scale": 0.3})
    for key, value, grid_key in [
        ("norm_preserve", False, "sweep.norm_preserve"),
        ("components", ["attn_out"], "sweep.components"),
        ("expert_subset", [1], "sweep.experts"),
    ]:
        with pytest.raises(AbliterateError, match=f"recipe.{key} .* {grid_key}"):
            variant_recipe(Variant(layers="all", measurement=1), num_layers=2, base={key: value})
