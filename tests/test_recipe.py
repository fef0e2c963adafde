"""Recipes resolve to exactly the tensors the seed lists, with clear errors for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from abliterate.errors import AbliterateError
from abliterate.layout import inspect_checkpoint
from abliterate.measure import Measurements, save_measurements
from abliterate.recipe import Plan, load_recipe, resolve

BIN = Path(sys.executable).parent


def fake_measurements(num_layers: int, hidden: int, seed: int = 0) -> Measurements:
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(num_layers + 1, hidden, generator=g, dtype=torch.float64)
    benign = torch.randn(num_layers + 1, hidden, generator=g, dtype=torch.float64)
    empty = torch.zeros(num_layers + 1, 0)
    return Measurements(target, benign, empty, empty, meta={"num_layers": num_layers})


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    from tiny_models import build_tiny

    model = build_tiny(tmp_path_factory.mktemp("glm") / "model", "glm4_moe")
    return model, inspect_checkpoint(model), fake_measurements(3, 32)


def keys(plan: Plan) -> set[str]:
    return {e.key for e in plan.entries}


def layer_keys(layer: int, *suffixes: str) -> set[str]:
    return {f"model.layers.{layer}.{s}" for s in suffixes}


SEED_DEFAULT = ("self_attn.o_proj.weight", "mlp.shared_experts.down_proj.weight", "mlp.gate.weight")


def test_moe_default_is_attention_shared_experts_and_router(glm):
    _, layout, meas = glm
    plan = resolve({"ablate": [{"layer": 1, "measurement": 2}]}, layout, meas)
    assert keys(plan) == layer_keys(1, *SEED_DEFAULT)
    scales = {e.component: e.scale for e in plan.entries}
    assert scales == {"attn_out": 1.0, "shared_down": 1.0, "router": 0.5}  # seed: gate at 50 %
    assert {e.mode for e in plan.entries} == {"hidden"}


def test_individual_experts_adds_every_experts_down_proj(glm):
    _, layout, meas = glm
    recipe = load_recipe(
        {"ablate": [{"layer": 2, "measurement": 2}]}, {"ablate_individual_experts": True}
    )
    plan = resolve(recipe, layout, meas)
    experts = {f"mlp.experts.{e}.down_proj.weight" for e in range(8)}
    assert keys(plan) == layer_keys(2, *SEED_DEFAULT, *experts)


def test_expert_subset_restricts_the_experts(glm):
    _, layout, meas = glm
    recipe = load_recipe({"ablate": [{"layer": 2, "measurement": 2}]}, {"expert_subset": "0,1,2,3"})
    plan = resolve(recipe, layout, meas)
    experts = {f"mlp.experts.{e}.down_proj.weight" for e in range(4)}
    assert keys(plan) == layer_keys(2, *SEED_DEFAULT, *experts)
    assert recipe.ablate_individual_experts is False and recipe.expert_subset == (0, 1, 2, 3)


def test_dense_first_layer_of_an_moe_model_edits_its_mlp_down(glm):
    _, layout, meas = glm
    plan = resolve({"ablate": [{"layer": 0, "measurement": 1}]}, layout, meas)
    assert keys(plan) == layer_keys(0, "self_attn.o_proj.weight", "mlp.down_proj.weight")


def test_read_side_expert_components_and_gate_scale(glm):
    _, layout, meas = glm
    recipe = {
        "ablate": [{"layer": 1, "measurement": 2, "scale": 0.8}],
        "components": ["router", "expert_gate", "expert_up"],
        "expert_subset": [5],
        "gate_scale": 0.25,
        "scale": 0.5,
        "norm_preserve": False,
    }
    plan = resolve(recipe, layout, meas)
    assert keys(plan) == layer_keys(
        1, "mlp.gate.weight", "mlp.experts.5.gate_proj.weight", "mlp.experts.5.up_proj.weight"
    )
    by = {e.component: e for e in plan.entries}
    assert by["router"].scale == pytest.approx(0.8 * 0.5 * 0.25)
    assert by["expert_up"].scale == pytest.approx(0.4)
    assert by["expert_up"].side == "read" and by["expert_up"].hidden_axis == 1
    assert {e.mode for e in plan.entries} == {"plain"}


def test_dense_default_is_attention_and_mlp_down(tiny_llama):
    plan = resolve(
        {"ablate": [{"layer": 1, "measurement": 1}, {"layer": 2, "measurement": 1}]},
        inspect_checkpoint(tiny_llama),
        fake_measurements(3, 32),
    )
    assert keys(plan) == layer_keys(1, "self_attn.o_proj.weight", "mlp.down_proj.weight") | (
        layer_keys(2, "self_attn.o_proj.weight", "mlp.down_proj.weight")
    )
    assert {e.hidden_axis for e in plan.entries} == {0}


def test_direction_is_the_normalised_difference_of_means(glm):
    _, layout, meas = glm
    plan = resolve({"ablate": [{"layer": 1, "measurement": 2}]}, layout, meas)
    expected = meas.target_mean[2] - meas.benign_mean[2]
    expected = (expected / expected.norm()).to(torch.float32)
    for entry in plan.entries:
        torch.testing.assert_close(entry.direction, expected)


def test_sparsity_zeroes_the_smallest_fraction(glm):
    _, layout, meas = glm
    plan = resolve({"ablate": [{"layer": 1, "measurement": 2, "sparsity": 0.75}]}, layout, meas)
    r = plan.entries[0].direction
    assert int((r != 0).sum()) == 8 and float(r.norm()) == pytest.approx(1.0)


def test_ensemble_averages_neighbouring_unit_directions(glm):
    _, layout, meas = glm
    plan = resolve({"ablate": [{"layer": 1, "measurement": 1}], "ensemble": 1}, layout, meas)
    units = [(meas.target_mean[i] - meas.benign_mean[i]) for i in (0, 1, 2)]
    mean = sum(u / u.norm() for u in units)
    torch.testing.assert_close(plan.entries[0].direction, (mean / mean.norm()).float())


def test_projected_directions_are_orthogonal_to_the_benign_means(glm):
    _, layout, meas = glm

    def cosine(options, index):
        plan = resolve({"ablate": [{"layer": 1, "measurement": 2}], **options}, layout, meas)
        r, benign = plan.entries[0].direction.double(), meas.benign_mean[index]
        return abs(float(r @ benign / benign.norm()))

    assert cosine({}, 2) > 1e-2
    assert cosine({"projected": True}, 2) < 1e-6  # the measurement's index
    assert cosine({"biprojected": True}, 1) < 1e-6  # and last, the edited layer's index


def test_plan_round_trips_through_json_and_safetensors(glm, tmp_path):
    _, layout, meas = glm
    plan = resolve(
        {"ablate": [{"layer": 1, "measurement": 2}, {"layer": 2, "measurement": 3}]}, layout, meas
    )
    loaded = Plan.load(plan.save(tmp_path / "plan.json"))
    assert [e.to_json() for e in loaded.entries] == [e.to_json() for e in plan.entries]
    for a, b in zip(loaded.entries, plan.entries, strict=True):
        assert torch.equal(a.direction, b.direction)
    assert loaded.sha256() == plan.sha256()
    assert (tmp_path / "plan.safetensors").is_file()


# ---- bad input: one sentence naming the key and what was expected


def test_layer_out_of_range_names_the_key(glm):
    _, layout, meas = glm
    with pytest.raises(
        AbliterateError, match=r"ablate\[0\]\.layer' is 3.*3 decoder layers \(0-2\)"
    ):
        resolve({"ablate": [{"layer": 3, "measurement": 1}]}, layout, meas)


def test_measurement_out_of_range_names_the_key(glm):
    _, layout, meas = glm
    with pytest.raises(AbliterateError, match=r"ablate\[1\]\.measurement' is 9.*indices 0-3"):
        resolve(
            {"ablate": [{"layer": 1, "measurement": 1}, {"layer": 1, "measurement": 9}]},
            layout,
            meas,
        )


def test_expert_beyond_the_real_count_is_not_found(glm):
    _, layout, meas = glm
    recipe = load_recipe({"ablate": [{"layer": 1, "measurement": 1}], "expert_subset": [2, 9]})
    with pytest.raises(AbliterateError) as error:
        resolve(recipe, layout, meas)
    assert str(error.value) == "Expert 9 not found (layer 1 has 8 experts, indices 0-7)."
    per_layer = {"ablate": [{"layer": 1, "measurement": 1}, {"layer": 2, "measurement": 2}]}
    with pytest.raises(AbliterateError) as error:
        resolve({**per_layer, "expert_subset": {1: [0], 2: [3, 9]}}, layout, meas)
    assert str(error.value) == "Expert 9 not found (layer 2 has 8 experts, indices 0-7)."


def test_direction_hidden_size_mismatch(glm):
    _, layout, _ = glm
    with pytest.raises(AbliterateError, match="64 components but the model's hidden_size is 32"):
        resolve({"ablate": [{"layer": 1, "measurement": 1}]}, layout, fake_measurements(3, 64))


@pytest.mark.parametrize(
    "recipe,message",
    [
        ({"ablate": []}, "'ablate' must be a non-empty list"),
        ({"ablate": [{"layer": 1}]}, "must be a mapping with 'layer' and 'measurement'"),
        ({"ablate": [{"layer": 1, "measurement": 1, "sparsity": 1.0}]}, "sparsity' must be in"),
        ({"ablate": [{"layer": 1, "measurement": 1, "scael": 1}]}, "scael' is not an entry key"),
        ({"ablate": [{"layer": 1, "measurement": 1}], "norm_preserv": True}, "unknown recipe key"),
        ({"ablate": [{"layer": 1, "measurement": 1}], "components": ["mlp"]}, "unknown component"),
        ({"ablate": [{"layer": 1, "measurement": 1}], "expert_subset": "a,b"}, "expert_subset"),
        ({"ablate": [{"layer": 1, "measurement": 1}], "preserve": "rows"}, "'preserve'"),
    ],
)
def test_malformed_recipes_are_refused_with_the_key(recipe, message):
    with pytest.raises(AbliterateError, match=message):
        load_recipe(recipe)


def test_seed_yaml_is_accepted_as_is(tmp_path):
    path = tmp_path / "glm4-conservative.yml"
    path.write_text(
        'model: "/path/to/GLM-4.5-Air"\nmeasurements: measurements.refuse\n'
        "output: glm4-conservative\nablate_individual_experts: false\nexpert_subset: null\n"
        "ablate:\n  - layer: 30\n    measurement: 40\n    scale: 0.8  # Reduced intensity\n"
        "    sparsity: 0.1\n"
    )
    recipe = load_recipe(path)
    assert recipe.model == "/path/to/GLM-4.5-Air" and recipe.output == "glm4-conservative"
    assert recipe.ablate[0].layer == 30 and recipe.ablate[0].scale == 0.8
    assert recipe.norm_preserve is True and recipe.gate_scale == 0.5


def test_examples_are_valid_configs_and_recipes():
    from snakemake.utils import validate

    root = Path(__file__).parent.parent
    configs = sorted((root / "config" / "examples").glob("*.yaml"))
    recipes = sorted((root / "config" / "examples").glob("*.yml"))
    assert len(configs) >= 5 and len(recipes) >= 2
    for path in configs:
        config = yaml.safe_load(path.read_text())
        validate(config, str(root / "workflow" / "schemas" / "config.schema.yaml"))
        if config["recipe"]["ablate"]:
            load_recipe(config["recipe"])
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.model and recipe.measurements and recipe.output


def test_plan_command_prints_each_edit_and_the_totals(glm, tmp_path):
    model, _, meas = glm
    save_measurements(meas, tmp_path / "m.safetensors")
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": str(model),
                "measurements": str(tmp_path / "m.safetensors"),
                "ablate": [{"layer": 1, "measurement": 2}],
            }
        )
    )
    result = subprocess.run(
        [str(BIN / "abliterate"), "plan", str(recipe), "--expert-subset", "0,1"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "model.layers.1.mlp.gate.weight  router  scale=0.5  mode=hidden" in result.stdout
    assert "model.layers.1.mlp.experts.1.down_proj.weight  expert_down" in result.stdout
    assert "total: 5 tensor edits" in result.stdout
    assert "MoE architecture: True" in result.stderr
    assert "Detected 8 experts per layer" in result.stderr
    bad = subprocess.run(
        [str(BIN / "abliterate"), "plan", str(recipe), "--expert-subset", "9"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert "Expert 9 not found (layer 1 has 8 experts, indices 0-7)." in bad.stderr


def test_embedding_is_edited_once_with_the_lowest_layers_direction(glm):
    _, layout, meas = glm
    recipe = {
        "ablate": [{"layer": 2, "measurement": 3}, {"layer": 1, "measurement": 1}],
        "components": ["embed"],
    }
    plan = resolve(recipe, layout, meas)
    assert [e.key for e in plan.entries] == ["model.embed_tokens.weight"]
    assert plan.entries[0].hidden_axis == 1 and plan.entries[0].layer is None
    expected = meas.target_mean[1] - meas.benign_mean[1]
    torch.testing.assert_close(plan.entries[0].direction, (expected / expected.norm()).float())


def test_non_finite_scale_is_refused(glm):
    _, layout, meas = glm
    for value in (float("nan"), float("inf")):
        with pytest.raises(AbliterateError, match="'ablate\\[0\\].scale' must be a finite"):
            resolve({"ablate": [{"layer": 1, "measurement": 2, "scale": value}]}, layout, meas)


def test_measurements_of_a_model_with_another_depth_are_refused(glm):
    _, layout, _ = glm
    deeper = fake_measurements(9, 32)  # same width, 10 indices: another model
    with pytest.raises(AbliterateError, match="measured on a model with 9 decoder layers"):
        resolve({"ablate": [{"layer": 1, "measurement": 2}]}, layout, deeper)
    deeper.meta.clear()
    with pytest.raises(AbliterateError, match="holds 10 measurement indices"):
        resolve({"ablate": [{"layer": 1, "measurement": 2}]}, layout, deeper)


def test_fractional_measurement_mixes_the_neighbouring_directions(glm):
    from abliterate.directions import direction, normalize

    _, layout, meas = glm
    plan = resolve({"ablate": [{"layer": 1, "measurement": 1.25}]}, layout, meas)
    expected = normalize(0.75 * direction(meas, 1) + 0.25 * direction(meas, 2))
    assert torch.allclose(plan.entries[0].direction.double(), expected, atol=1e-6)
    whole = resolve({"ablate": [{"layer": 1, "measurement": 2.0}]}, layout, meas)
    assert torch.allclose(whole.entries[0].direction.double(), direction(meas, 2), atol=1e-7)


def test_index_after_the_last_layer_is_the_final_norm_direction(glm):
    from abliterate.directions import normalize

    _, layout, meas = glm
    with pytest.raises(AbliterateError, match=r"ablate\[0\]\.measurement.*indices 0-3"):
        resolve({"ablate": [{"layer": 1, "measurement": 4}]}, layout, meas)
    g = torch.Generator().manual_seed(5)
    final = Measurements(
        meas.target_mean, meas.benign_mean, meas.target_proj, meas.benign_proj, meas.meta,
        target_final_norm_mean=torch.randn(32, generator=g, dtype=torch.float64),
        benign_final_norm_mean=torch.randn(32, generator=g, dtype=torch.float64),
    )  # fmt: skip
    plan = resolve({"ablate": [{"layer": 1, "measurement": 4}]}, layout, final)
    expected = normalize(final.target_final_norm_mean - final.benign_final_norm_mean)
    assert torch.allclose(plan.entries[0].direction.double(), expected, atol=1e-6)


def test_entry_components_edit_one_layer_per_component_at_its_own_scale(glm):
    _, layout, meas = glm
    recipe = {
        "gate_scale": 1.0,
        "ablate": [
            {"layer": 1, "measurement": 2, "scale": 0.5, "components": ["attn_out"]},
            {"layer": 1, "measurement": 2, "scale": 1.5, "components": ["router"]},
        ],
    }
    plan = resolve(recipe, layout, meas)
    assert {(e.component, e.scale) for e in plan.entries} == {("attn_out", 0.5), ("router", 1.5)}
    assert load_recipe(recipe).to_dict()["ablate"][0]["components"] == ["attn_out"]
    assert (
        "components"
        not in load_recipe({"ablate": [{"layer": 1, "measurement": 2}]}).to_dict()["ablate"][0]
    )


def test_norm_scaled_direction_is_seen_through_the_reading_norm(glm):
    from abliterate.directions import direction, normalize

    _, layout, meas = glm
    recipe = {"norm_scaled": True, "ablate": [{"layer": 1, "measurement": 2}]}
    with pytest.raises(AbliterateError, match="holds no norm weights"):
        resolve(recipe, layout, meas)
    weights = torch.rand(4, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    scaled = Measurements(
        meas.target_mean, meas.benign_mean, meas.target_proj, meas.benign_proj, meas.meta,
        norm_weights=weights,
    )  # fmt: skip
    plan = resolve(recipe, layout, scaled)
    expected = normalize(direction(meas, 2) * weights[2])
    assert torch.allclose(plan.entries[0].direction.double(), expected, atol=1e-6)
