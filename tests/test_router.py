"""Router edits (read side at gate_scale, expert suppression) and the routing-shift metric."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from test_recipe import fake_measurements
from tiny_models import StubTokenizer, build_tiny

from abliterate.edit import suppress_rows
from abliterate.errors import AbliterateError
from abliterate.evaluate import ROUTING_COLUMNS, EvalSettings, Evaluator, PromptSet
from abliterate.layout import inspect_checkpoint
from abliterate.recipe import Plan, edit_tensor, load_recipe, resolve
from abliterate.routing import layer_shift, log_distribution
from abliterate.shards import read_weight_map

ROUTER = "model.layers.1.mlp.gate.weight"
BIAS = "model.layers.1.mlp.gate.e_score_correction_bias"


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    model = build_tiny(tmp_path_factory.mktemp("glm") / "model", "glm4_moe", max_shard_size=None)
    return model, inspect_checkpoint(model), fake_measurements(3, 32)


def _router(model_dir) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))[ROUTER]


def _edited(plan: Plan, key: str, weight: torch.Tensor) -> torch.Tensor:
    return edit_tensor(weight, plan.edits()[key])


def _unit(plan: Plan, key: str) -> torch.Tensor:
    r = next(e for e in plan.entries if e.key == key).direction
    return r / r.norm()


# ---- read-side router edit ---------------------------------------------------------------


@pytest.mark.parametrize("norm_preserve", [True, False])
def test_router_rows_are_orthogonal_to_the_direction_at_scale_one(glm, norm_preserve):
    model, layout, meas = glm
    recipe = {"ablate": [{"layer": 1, "measurement": 2}], "gate_scale": 1.0}
    recipe["norm_preserve"] = norm_preserve
    plan = resolve(recipe, layout, meas)
    router = next(e for e in plan.entries if e.component == "router")
    assert router.key == ROUTER and router.scale == 1.0 and router.hidden_axis == 1
    weight = _router(model)
    edited = _edited(plan, ROUTER, weight)
    r = _unit(plan, ROUTER)
    assert (weight @ r).abs().max() > 1e-3  # there was something to remove
    assert (edited @ r).abs().max() < 1e-5
    norms_kept = torch.allclose(edited.norm(dim=1), weight.norm(dim=1), atol=1e-5)
    assert norms_kept is norm_preserve


def test_default_gate_scale_removes_half_the_component(glm):
    model, layout, meas = glm
    recipe = load_recipe({"ablate": [{"layer": 1, "measurement": 2}], "norm_preserve": False})
    assert recipe.gate_scale == 0.5  # the seed's default
    plan = resolve(recipe, layout, meas)
    router = next(e for e in plan.entries if e.component == "router")
    assert router.scale == 0.5
    weight = _router(model)
    r = _unit(plan, ROUTER)
    edited = _edited(plan, ROUTER, weight)
    assert torch.allclose(edited @ r, 0.5 * (weight @ r), atol=1e-6)
    # what is orthogonal to r is untouched
    rest = weight - torch.outer(weight @ r, r)
    assert torch.allclose(edited - torch.outer(edited @ r, r), rest, atol=1e-6)


# ---- router suppression ------------------------------------------------------------------


def _weight_with_signs(r: torch.Tensor) -> torch.Tensor:
    """A router of 6 experts whose rows 0-2 lean towards r and rows 3-5 away from it."""
    torch.manual_seed(3)
    weight = torch.randn(6, r.numel())
    weight -= torch.outer(weight @ r, r)
    signs = torch.tensor([1.0, 2.0, 0.5, -1.0, -2.0, -0.5])
    return weight + torch.outer(signs, r)


@pytest.mark.parametrize("norm_preserve", [True, False])
def test_suppression_removes_the_chosen_rows_positive_component_only(norm_preserve):
    r = torch.nn.functional.normalize(torch.randn(32), dim=0)
    weight = _weight_with_signs(r)
    edited = suppress_rows(weight, r, 1.0, (0, 1, 3), norm_preserve=norm_preserve)
    along = edited @ r
    assert along[0].abs() < 1e-5 and along[1].abs() < 1e-5  # chosen, leaning to r: gone
    assert torch.equal(edited[3], weight[3])  # chosen, but already routed less on target
    assert torch.equal(edited[[2, 4, 5]], weight[[2, 4, 5]])  # not chosen
    kept = torch.allclose(edited.norm(dim=1), weight.norm(dim=1), atol=1e-5)
    assert kept is norm_preserve


def test_suppression_strength_scales_the_removed_component():
    r = torch.nn.functional.normalize(torch.randn(32), dim=0)
    weight = _weight_with_signs(r)
    half = suppress_rows(weight, r, 0.5, (1,), norm_preserve=False)
    double = suppress_rows(weight, r, 2.0, (1,), norm_preserve=False)
    assert float(half[1] @ r) == pytest.approx(0.5 * float(weight[1] @ r), abs=1e-5)
    # strength 2: the expert now prefers benign-like inputs as much as it preferred target
    assert float(double[1] @ r) == pytest.approx(-float(weight[1] @ r), abs=1e-5)
    # the expert's logit gap between target-like and benign-like inputs closes at strength 1
    x = torch.randn(32)
    gap = lambda w: float(w[1] @ (x + 3.0 * r) - w[1] @ x)  # noqa: E731
    assert gap(weight) > 1.0
    assert abs(gap(suppress_rows(weight, r, 1.0, (1,), norm_preserve=False))) < 1e-4


def test_router_suppress_resolves_to_row_edits_of_the_edited_layers(glm, tmp_path):
    model, layout, meas = glm
    recipe = {
        "ablate": [{"layer": 0, "measurement": 1}, {"layer": 2, "measurement": 2}],
        "router_suppress": {"experts": [1, 6], "strength": 0.75},
        "scale": 0.5,
    }
    plan = resolve(recipe, layout, meas)
    suppress = [e for e in plan.entries if e.component == "router_suppress"]
    # layer 0 is GLM's dense first layer: no router, so only layer 2
    assert [(e.key, e.rows, e.scale) for e in suppress] == [
        ("model.layers.2.mlp.gate.weight", (1, 6), 0.375)
    ]
    # applied after the layer's read-side router edit, on the same tensor
    keys = [e.component for e in plan.edits()["model.layers.2.mlp.gate.weight"] for e in [e[0]]]
    assert keys == ["router", "router_suppress"]
    assert "rows=1,6" in plan.describe()
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert [e.rows for e in loaded.entries] == [e.rows for e in plan.entries]
    assert loaded.sha256() == plan.sha256()
    again = load_recipe(load_recipe(recipe).to_dict())
    assert again.router_suppress == load_recipe(recipe).router_suppress


def test_router_suppress_per_layer_and_top_routed_experts(glm):
    model, layout, meas = glm
    ablate = [{"layer": 1, "measurement": 2}, {"layer": 2, "measurement": 2}]
    plan = resolve({"ablate": ablate, "router_suppress": {"experts": {2: [0, 3]}}}, layout, meas)
    assert [(e.layer, e.rows) for e in plan.entries if e.rows] == [(2, (0, 3))]
    # top:K reads the measurements' router statistics: expert 5 of layer 1 and experts
    # 2 and 7 of layer 2 are chosen more often on target prompts
    counts = torch.zeros(3, 8, dtype=torch.int64)
    benign = counts.clone() + 10
    counts += 10
    counts[1, 5], counts[1, 4], counts[2, 2], counts[2, 7] = 40, 12, 30, 35
    meas.target_expert_counts, meas.benign_expert_counts = counts, benign
    meas.target_router_tokens = meas.benign_router_tokens = torch.full((3,), 40)
    try:
        plan = resolve({"ablate": ablate, "router_suppress": {"experts": "top:2"}}, layout, meas)
        assert [(e.layer, e.rows) for e in plan.entries if e.rows] == [(1, (4, 5)), (2, (2, 7))]
    finally:
        meas.target_expert_counts = meas.benign_expert_counts = None
    with pytest.raises(AbliterateError, match="no router statistics"):
        resolve({"ablate": ablate, "router_suppress": {"experts": "top:2"}}, layout, meas)


@pytest.mark.parametrize(
    ("suppress", "message"),
    [
        ({"experts": [9]}, r"Expert 9 not found \(layer 1 has 8 experts, indices 0-7\)\."),
        ({"experts": {0: [1]}}, "names layer 0, which has no router"),
        ({"experts": {2: [1]}}, "names layer 2, which no ablate entry edits"),
        ({"experts": {7: [1]}}, "names layer 7, but the model has 3 decoder layers"),
        ({"experts": "top:0"}, "router_suppress.experts' must be 'top:K'"),
        ({"experts": []}, "router_suppress.experts' must be a non-empty list"),
        ({"strength": 1.0}, "router_suppress.experts' is required"),
        ({"experts": [1], "scale": 1}, "router_suppress.scale' is not a router_suppress key"),
        ({"experts": [1], "strength": "x"}, "router_suppress.strength' must be a number"),
        ([1, 2], "recipe key 'router_suppress' must be a mapping"),
    ],
)
def test_bad_router_suppress_is_one_sentence_naming_the_key(glm, suppress, message):
    _, layout, meas = glm
    with pytest.raises(AbliterateError, match=message):
        resolve(
            {"ablate": [{"layer": 1, "measurement": 2}], "router_suppress": suppress}, layout, meas
        )


def test_correction_bias_is_left_untouched_and_the_plan_says_so(glm):
    from abliterate.evaluate import InMemoryEditor

    model_dir, layout, meas = glm
    recipe = {
        "ablate": [{"layer": 1, "measurement": 2}],
        "gate_scale": 1.0,
        "router_suppress": {"experts": [0, 1, 2, 3]},
    }
    plan = resolve(recipe, layout, meas, weight_map=read_weight_map(model_dir))
    assert BIAS in read_weight_map(model_dir)
    assert BIAS not in plan.keys()
    assert plan.info["untouched_correction_biases"] == [BIAS]
    assert "untouched: 1 router e_score_correction_bias" in plan.describe()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():  # a non-zero bias, so an edit could not hide behind zeros
        model.get_buffer(BIAS).copy_(torch.linspace(-0.1, 0.1, 8))
    bias = model.get_buffer(BIAS).clone()
    router = model.get_parameter(ROUTER).detach().clone()
    with InMemoryEditor(model).applied(plan):
        assert torch.equal(model.get_buffer(BIAS), bias)
        assert not torch.equal(model.get_parameter(ROUTER), router)
    assert torch.equal(model.get_buffer(BIAS), bias)


# ---- routing shift ---------------------------------------------------------------------


def test_layer_shift_of_identical_routing_is_zero_and_counts_changed_choices():
    logits = torch.randn(5, 8)
    chosen = logits.topk(2).indices
    assert layer_shift(log_distribution(logits, False), log_distribution(logits, False),
                       chosen, chosen) == (0.0, 0.0)  # fmt: skip
    moved = chosen.clone()
    moved[0] = torch.tensor([c for c in range(8) if c not in chosen[0]][:2])  # both changed
    moved[1, 1] = next(c for c in range(8) if c not in chosen[1])  # one of two changed
    kl, changed = layer_shift(
        log_distribution(logits, True), log_distribution(logits * 1.5, True), chosen, moved
    )
    assert kl > 0 and changed == pytest.approx((1.0 + 0.5) / 5)
    # sigmoid routers: normalised sigmoid scores, a proper distribution
    assert torch.allclose(log_distribution(logits, True).exp().sum(-1), torch.ones(5))


def _evaluator(model_dir, batch_size=2):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    target_ids = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15]]
    benign_ids = [[20, 21, 22], [23, 24], [25, 26, 27, 28]]
    settings = EvalSettings(max_new_tokens=3, kl_tokens=2, batch_size=batch_size, samples=0)
    return Evaluator(
        model,
        StubTokenizer(),
        PromptSet([str(p) for p in target_ids], target_ids),
        PromptSet([str(p) for p in benign_ids], benign_ids),
        settings,
        model_dir=model_dir,
    )


@pytest.mark.parametrize("family", ["glm4_moe", "mixtral", "gpt_oss", "qwen3_moe", "deepseek_v3"])
def test_routing_shift_is_zero_unedited_and_positive_after_a_router_edit(tmp_path, family):
    model_dir = build_tiny(tmp_path / family, family, max_shard_size=None)
    layout = inspect_checkpoint(model_dir)
    meas = fake_measurements(3, 32)
    moe_layers = [
        i for i in range(3) if any(t.component == "router" for t in layout.layer(i).targets)
    ]
    # the tiny DeepSeek-V3 attention rejects left-padded batches; one prompt per batch there
    evaluator = _evaluator(model_dir, batch_size=1 if family == "deepseek_v3" else 2)
    base = evaluator.evaluate_base().row()
    assert all(base[c] == 0.0 for c in ROUTING_COLUMNS)
    # only the prefill is recorded: one row per non-padding prompt token, never a decoding
    # step (those differ between variants)
    for cls, prompts in (("target", evaluator.target), ("benign", evaluator.benign)):
        logp, chosen = evaluator._base_routing[cls].layer(moe_layers[0])
        assert logp.shape == (sum(len(p) for p in prompts.ids), layout.num_experts)
        assert chosen.shape[0] == logp.shape[0]
    ablate = [{"layer": i, "measurement": 2} for i in moe_layers]
    same = evaluator.evaluate("zero", resolve({"ablate": ablate, "scale": 0.0}, layout, meas))
    assert all(same.row()[c] == 0.0 for c in ROUTING_COLUMNS)
    recipe = {"ablate": ablate, "components": ["router"], "gate_scale": 1.0}
    edited = evaluator.evaluate("router", resolve(recipe, layout, meas))
    row = edited.row()
    assert row["routing_kl_benign"] > 0 and row["routing_kl_target"] > 0
    assert set(edited.routing["benign"]) == set(moe_layers)
    assert all(v["kl"] > 0 for v in edited.routing["target"].values())
    assert 0 <= row["topk_changed_target"] <= 1
    # suppressing experts through their rows moves routing too
    recipe = {"ablate": ablate, "components": ["attn_out"], "router_suppress": {
        "experts": list(range(4)), "strength": 2.0}}  # fmt: skip
    suppressed = evaluator.evaluate("suppress", resolve(recipe, layout, meas)).row()
    assert suppressed["routing_kl_target"] > 0


def test_dense_models_have_no_routing_columns(tiny_llama):
    evaluator = _evaluator(tiny_llama)
    assert not set(ROUTING_COLUMNS) & set(evaluator.evaluate_base().row())


def test_aggregate_writes_the_per_layer_routing_and_its_figure(tmp_path):
    import pandas as pd

    from abliterate.sweep import aggregate

    rows = [
        {"variant": "base", "refusal_rate": 1.0, "benign_kept": 1.0, "kl_first_token": 0.0,
         "kl_multi_token": 0.0, "routing_kl_target": 0.0, "topk_changed_target": 0.0},
        {"variant": "a", "refusal_rate": 0.0, "benign_kept": 1.0, "kl_first_token": 0.1,
         "kl_multi_token": 0.1, "routing_kl_target": 0.02, "topk_changed_target": 0.3},
    ]  # fmt: skip
    pd.DataFrame(rows).to_csv(tmp_path / "chunk-0.tsv", sep="\t", index=False)
    shift = {"benign": {"1": {"kl": 0.01, "topk_changed": 0.1}, "2": {"kl": 0.03,
             "topk_changed": 0.2}}, "target": {"1": {"kl": 0.02, "topk_changed": 0.3}}}  # fmt: skip
    details = {
        "recipes": {"a": {"ablate": [{"layer": 1, "measurement": 2}]}},
        "samples": {},
        "routing": {"base": {"benign": {}, "target": {}}, "a": shift},
    }
    (tmp_path / "chunk-0.json").write_text(json.dumps(details))
    out = {k: tmp_path / f"out.{k}" for k in ("tsv", "yaml", "txt", "json", "png")}
    chunks = ([tmp_path / "chunk-0.tsv"], [tmp_path / "chunk-0.json"])
    outputs = {"table_out": out["tsv"], "best_yaml": out["yaml"], "best_txt": out["txt"]}
    aggregate(*chunks, **outputs, routing_json=out["json"], routing_png=out["png"])
    assert json.loads(out["json"].read_text())["a"]["benign"]["2"]["kl"] == 0.03
    assert out["png"].stat().st_size > 10_000
    del details["routing"]
    (tmp_path / "chunk-0.json").write_text(json.dumps(details))
    with pytest.raises(AbliterateError, match="need an MoE model"):
        aggregate(*chunks, **outputs, routing_png=out["png"])


# ---- the grid ----------------------------------------------------------------------------


def test_grid_sweeps_gate_scale_and_router_suppression(glm):
    from abliterate.grid import Variant, variant_recipe, variants

    _, layout, meas = glm
    grid = variants({"gate_scale": [0.5, 1.0], "router_suppress": ["none", "top:2", "1,6@1.5"]})
    assert len(grid) == 6
    ids = [v.id for v in grid]
    assert ids[0].endswith("_e-none_g0.5") and "_g1.0_rs-1+6x1.5" in ids[-1]
    assert Variant().id == "s1.0_p0.00_msug_Lsug_np1_c-default_e-none"  # old ids unchanged
    dense = variants({"gate_scale": [0.5, 1.0], "router_suppress": ["none", "top:2"]}, moe=False)
    assert [(v.gate_scale, v.router_suppress) for v in dense] == [(None, "none")]
    suggested = {"ablate": [{"layer": 1, "measurement": 2}, {"layer": 2, "measurement": 2}]}
    recipe = variant_recipe(grid[-1], num_layers=3, suggested=suggested)
    assert recipe["gate_scale"] == 1.0
    assert recipe["router_suppress"] == {"experts": [1, 6], "strength": 1.5}
    plan = resolve(recipe, layout, meas)
    assert {(e.layer, e.rows, e.scale) for e in plan.entries if e.rows} == {
        (1, (1, 6), 1.5),
        (2, (1, 6), 1.5),
    }
    assert variant_recipe(grid[1], num_layers=3, suggested=suggested)["router_suppress"] == {
        "experts": "top:2",
        "strength": 1.0,
    }
    assert "router_suppress" not in variant_recipe(grid[0], num_layers=3, suggested=suggested)


@pytest.mark.parametrize(
    ("sweep", "base", "message"),
    [
        ({"router_suppress": ["top:0"]}, None, "sweep.router_suppress: expected 'none', 'top:K'"),
        ({"router_suppress": ["1,2@x"]}, None, "sweep.router_suppress"),
        ({"gate_scale": ["half"]}, None, "sweep.gate_scale: expected numbers"),
        ({"gate_scale": [1.0]}, {"gate_scale": 0.3}, "recipe.gate_scale is 0.3"),
        ({}, {"router_suppress": {"experts": [1]}}, "sweep.router_suppress"),
    ],
)
def test_bad_router_grid_values_name_the_key(sweep, base, message):
    from abliterate.grid import variant_recipe, variants

    with pytest.raises(AbliterateError, match=re.escape(message)):
        for variant in variants(sweep):
            variant_recipe(variant, num_layers=3, suggested={"ablate": [{"layer": 1,
                           "measurement": 2}]}, base=base)  # fmt: skip


# ---- the search --------------------------------------------------------------------------


def test_search_can_pick_router_suppression(glm):
    from optuna.trial import FixedTrial

    from abliterate.search import SearchSpace, params_recipe, resolve_space, suggest_params

    _, layout, meas = glm
    plain = resolve_space({}, num_layers=3, num_indices=4, is_moe=True)
    assert plain.suppress_top is None and "suppress_top" not in plain.to_json()
    space = resolve_space(
        {"router_suppress": {"top": [1, 3], "strength": [0.5, 2.0]}},
        num_layers=3,
        num_indices=4,
        is_moe=True,
    )
    assert SearchSpace.from_json(json.loads(json.dumps(space.to_json()))) == space
    fixed = {"direction": 2.0, "projection": "none", "norm_preserve": True, "sparsity": 0.0}
    fixed.update({f"{g}.on": False for g in space.groups if g != "attn_out"})
    fixed.update({"experts": "none", "attn_out.on": True, "attn_out.strength": 1.0})
    fixed.update({"attn_out.peak": 1.0, "attn_out.width": 3.0, "attn_out.floor": 1.0})
    fixed.update({"router_suppress.on": True, "router_suppress.top": 2})
    fixed["router_suppress.strength"] = 1.5
    params = suggest_params(FixedTrial(fixed), space)
    recipe = params_recipe(params, space, {"router_suppress": {"experts": [0]}})
    assert recipe["router_suppress"] == {"experts": "top:2", "strength": 1.5}
    off = params_recipe({**params, "router_suppress.on": False}, space, {"router_suppress": 1})
    assert "router_suppress" not in off  # the search owns the key when it searches it
    counts = torch.full((3, 8), 10, dtype=torch.int64)
    counts[1, 6], counts[2, 0] = 50, 30
    meas.target_expert_counts, meas.benign_expert_counts = counts, torch.full((3, 8), 10)
    meas.target_router_tokens = meas.benign_router_tokens = torch.full((3,), 40)
    try:
        plan = resolve(recipe, layout, meas)
    finally:
        meas.target_expert_counts = meas.benign_expert_counts = None
    assert {(e.layer, e.rows) for e in plan.entries if e.rows} == {(1, (6,)), (2, (0,))}
    with pytest.raises(AbliterateError, match="sweep.search.router_suppress: router suppression"):
        resolve_space({"router_suppress": {}}, num_layers=3, num_indices=4, is_moe=False)
    with pytest.raises(AbliterateError, match=r"sweep.search.router_suppress.top: expected"):
        resolve_space(
            {"router_suppress": {"top": [0.5, 2]}}, num_layers=3, num_indices=4, is_moe=True
        )


def test_export_of_router_edits_verifies_and_keeps_the_correction_bias(tmp_path):
    """bf16 export of read-side + suppression edits: equal to the in-memory edit, verified,
    and the correction bias bit-identical to the source."""
    from safetensors.torch import load_file

    from abliterate.evaluate import InMemoryEditor
    from abliterate.export import export_model
    from abliterate.verify import verify

    model_dir = build_tiny(tmp_path / "glm", "glm4_moe", dtype=torch.bfloat16)
    layout = inspect_checkpoint(model_dir)
    recipe = {
        "ablate": [{"layer": n, "measurement": 2} for n in (1, 2)],
        "router_suppress": {"experts": {1: [0, 1, 2, 3], 2: [5]}, "strength": 1.0},
    }
    plan = resolve(recipe, layout, fake_measurements(3, 32), weight_map=read_weight_map(model_dir))
    plan.model_dir = str(model_dir)
    output = export_model(plan, tmp_path / "out", jobs=1)
    report = verify(model_dir, output, plan)
    assert report["ok"], report["failures"]

    def tensors(root):
        found = {}
        for shard in sorted(root.glob("*.safetensors")):
            found.update(load_file(str(shard)))
        return found

    source, exported = tensors(model_dir), tensors(output)
    for layer in (1, 2):
        bias = f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
        assert torch.equal(exported[bias], source[bias])
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval()
    with InMemoryEditor(model, model_dir).applied(plan):
        for key in ("model.layers.1.mlp.gate.weight", "model.layers.2.mlp.gate.weight"):
            # the router is kept in float32 in memory: the bf16 edit upcast, as loading gives
            assert torch.equal(model.get_parameter(key).to(torch.bfloat16), exported[key])
            assert not torch.equal(exported[key], source[key])
