"""Ranking refusal directions by intervention (abliterate.intervene, analyze --model)."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch
import yaml

DARK = 4  # residual dimensions added to the organism (attention needs a multiple of the heads)


def test_rank_table_rule_sums_refusals_and_changed_answers_then_kl():
    from abliterate.intervene import rank_table

    table = pd.DataFrame(
        {
            "measurement": [2, 3, 4, 5],
            # 3 stops refusing but breaks benign answers; 2 keeps them but refuses
            "refusal_rate": [0.75, 0.0, 0.0625, 0.0],
            "benign_kept": [1.0, 0.25, 1.0, 1.0],
            "kl_first_token": [0.01, 0.9, 0.02, 0.05],
        }
    )
    ranked = rank_table(table)
    assert ranked.measurement.tolist() == [5, 4, 2, 3]
    assert ranked.score.tolist() == pytest.approx([0.0, 0.0625, 0.75, 0.75])
    tied = rank_table(table.assign(refusal_rate=0.0, benign_kept=1.0))
    assert tied.measurement.tolist() == [2, 4, 5, 3]  # equal scores: the lower KL first


def test_candidates_are_top_by_separability_plus_the_last_index():
    from abliterate.intervene import candidate_indices

    metrics = pd.DataFrame(
        {
            "measurement": [0, 1, 2, 3, 4],
            "auroc": [float("nan"), 0.7, 1.0, 1.0, 0.99],
            "quality": [float("nan"), 0.3, 0.5, 0.9, 0.8],
        }
    )
    assert candidate_indices(metrics, 4, last_index=5, k=2) == [2, 3, 5]
    assert candidate_indices(metrics, 4, last_index=4, k=1) == [3, 4]


def test_intervention_recipe_edits_every_writer_on_dense_and_moe_layouts(tiny_llama, tiny_glm4_moe):
    from abliterate.intervene import intervention_recipe
    from abliterate.layout import inspect_checkpoint
    from abliterate.recipe import resolve

    for model, moe in ((tiny_llama, False), (tiny_glm4_moe, True)):
        layout = inspect_checkpoint(model)
        recipe = intervention_recipe(layout.num_layers + 1, layout.num_layers, moe)
        assert [e["layer"] for e in recipe["ablate"]] == list(range(layout.num_layers))
        assert "embed" in recipe["ablate"][0]["components"]
        assert all("embed" not in e["components"] for e in recipe["ablate"][1:])
        d = layout.hidden_size
        means = type(
            "Means",
            (),
            {
                "target_mean": torch.randn(layout.num_layers + 1, d, dtype=torch.float64),
                "benign_mean": torch.randn(layout.num_layers + 1, d, dtype=torch.float64),
                "target_final_norm_mean": torch.randn(d, dtype=torch.float64),
                "benign_final_norm_mean": torch.randn(d, dtype=torch.float64),
                "meta": {},
            },
        )()
        plan = resolve(recipe, layout, means)
        writers = {t.key for t in layout.globals} | {
            t.key for layer in layout.layers for t in layer.targets if t.side == "write"
        }
        assert set(plan.keys()) == writers  # every writer, no reader (router, gate/up)


def _rms_inputs(model, encoded) -> dict[str, torch.Tensor]:
    """The RMS of every norm's input over all tokens of the encoded prompts."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [
        module.register_forward_hook(
            lambda _m, args, _o, name=name: seen.setdefault(name, []).append(
                args[0][0].pow(2).mean(-1).sqrt()
            )
        )
        for name, module in model.named_modules()
        if name.endswith("norm")
    ]
    with torch.no_grad():
        for e in encoded:
            model(input_ids=torch.tensor([e.ids]))
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(values) for name, values in seen.items()}


def derive_post_norm_organism(demo, out, *, delta: float = 4.0, layer: int = 1):
    """The trained dense demo plus a class-coded residual dimension only the head's norm sees.

    Construction (how gpt-oss-style massive activations mislead the pre-norm directions):
    the residual stream gets `DARK` new dimensions that nothing reads (zero columns in
    every reader and the head, zero weight in every intermediate norm, 1e-3 in the final
    norm). Layer `layer`'s MLP down projection writes into the first of them a readout of
    its own activations, fitted by least squares on the training prompts to be +1 at the
    last prompt token of a target prompt, -1 of a benign one and 0 at every other token,
    times `delta`. So from index `layer + 1` on, the difference of class means is
    dominated by that dimension (|2 delta| against |d| of 2..6), which no layer uses:
    projecting it out leaves the refusal in place. The final norm (index L + 1) nearly
    zeroes it, so the post-norm difference of means is the direction the head reads.
    The only change the model sees is the larger RMS its norms divide by at the last
    prompt token; every norm's weight is rescaled so its median output matches the
    original's, and the test checks the derived model still refuses and answers as before.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from abliterate.prompts import PromptOptions

    model = AutoModelForCausalLM.from_pretrained(demo, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(demo)
    prompts = {
        cls: (demo / "prompts" / f"{cls}_train.txt").read_text().splitlines()[:200]
        for cls in ("target", "benign")
    }
    encoded = {
        cls: PromptOptions().encode(tokenizer, p, model.config) for cls, p in prompts.items()
    }
    captured: list[torch.Tensor] = []
    hook = model.model.layers[layer].mlp.down_proj.register_forward_hook(
        lambda _m, args, _o: captured.append(args[0][0])
    )
    goals, weights = [], []
    with torch.no_grad():
        for cls, sign in (("target", 1.0), ("benign", -1.0)):
            for e in encoded[cls]:
                model(input_ids=torch.tensor([e.ids]))
                goal = torch.zeros(len(e.ids))
                goal[-1] = sign
                weight = torch.ones(len(e.ids))
                weight[-1] = 4.0
                goals.append(goal)
                weights.append(weight)
    hook.remove()
    acts, goal, w = torch.cat(captured), torch.cat(goals), torch.cat(weights).sqrt()
    readout = torch.linalg.lstsq(acts * w[:, None], goal * w).solution

    d = model.config.hidden_size
    state = {}
    for key, tensor in model.state_dict().items():
        if key.endswith("norm.weight"):
            tensor = torch.cat([tensor, torch.zeros(DARK)])
        elif key.endswith(("o_proj.weight", "down_proj.weight")):  # writers: new rows
            rows = torch.zeros(DARK, tensor.shape[1])
            if key == f"model.layers.{layer}.mlp.down_proj.weight":
                rows[0] = delta * readout
            tensor = torch.cat([tensor, rows])
        else:  # embedding, readers, head: new columns, all zero
            tensor = torch.cat([tensor, torch.zeros(tensor.shape[0], DARK)], 1)
        state[key] = tensor
    config = model.config
    config.hidden_size = d + DARK
    derived = AutoModelForCausalLM.from_config(config).eval()
    derived.load_state_dict(state)
    original = _rms_inputs(model, encoded["benign"][:40] + encoded["target"][:40])
    for name, module in derived.named_modules():  # in order: each fix changes later inputs
        if name.endswith("norm"):
            now = _rms_inputs(derived, encoded["benign"][:40] + encoded["target"][:40])
            with torch.no_grad():
                module.weight[:d] *= float((now[name] / original[name]).median())
    with torch.no_grad():
        derived.model.norm.weight[d] = 1e-3
    derived.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.copytree(demo / "prompts", out / "prompts")
    return out


@pytest.fixture(scope="module")
def post_norm_organism(demo_dense, tmp_path_factory):
    return derive_post_norm_organism(demo_dense, tmp_path_factory.mktemp("post-norm") / "model")


def test_intervention_finds_the_post_norm_direction_the_separability_rule_misses(
    post_norm_organism, tmp_path
):
    from abliterate.analyze import layer_metrics, suggest_recipe
    from abliterate.cli import main
    from abliterate.evaluate import EvalSettings
    from abliterate.layout import inspect_checkpoint
    from abliterate.measure import MeasureOptions, measure_to_file
    from abliterate.model import LoadOptions
    from abliterate.sweep import evaluate_recipes

    model = post_norm_organism
    prompts = model / "prompts"
    meas_path = tmp_path / "measurements.safetensors"
    cpu = LoadOptions(device="cpu")
    meas = measure_to_file(
        model,
        str(prompts / "target_train.txt"),
        str(prompts / "benign_train.txt"),
        meas_path,
        MeasureOptions(progress=False, load=cpu),
    )
    L = meas.num_layers
    separability, _ = suggest_recipe(layer_metrics(meas), L)
    old_pick = separability["ablate"][0]["measurement"]
    assert old_pick <= L  # separability never sees index L + 1

    out = tmp_path / "analysis"
    args = ["analyze", str(meas_path), "-o", str(out), "--device", "cpu", "--model", str(model)]
    args += [
        "--target",
        str(prompts / "target_test.txt"),
        "--benign",
        str(prompts / "benign_test.txt"),
    ]
    assert main(args) == 0
    table = pd.read_csv(out / "interventions.tsv", sep="\t")
    assert table.measurement.iloc[0] == L + 1
    assert set(range(2, L + 2)) <= set(table.measurement)  # every separating index tried
    by_index = table.set_index("measurement")
    assert (by_index.loc[list(range(2, L + 1)), "score"] >= 0.5).all()  # only L + 1 works
    assert by_index.loc[old_pick, "refusal_rate"] >= 0.5
    assert by_index.loc[L + 1, "base_refusal_rate"] >= 0.95  # the organism refuses
    suggested = yaml.safe_load((out / "suggested.yaml").read_text())
    assert {e["measurement"] for e in suggested["ablate"]} == {L + 1}
    text = (out / "suggested.txt").read_text()
    assert "intervention" in text and f"would pick measurement {old_pick}" in text

    # the suggestion, exported with the CLI, does what the ranking measured, on every
    # held-out prompt (not only the subset), and the separability pick does not
    exported = tmp_path / "abliterated"
    recipe = out / "suggested.yaml"
    ablate = ["ablate", str(recipe), "--model", str(model), "--measurements", str(meas_path)]
    assert main([*ablate, "--output", str(exported)]) == 0
    settings = EvalSettings(load=cpu, max_new_tokens=8)
    result = evaluate_recipes(
        model,
        {"suggested": suggested, "separability": separability},
        layout=inspect_checkpoint(model),
        measurements=meas,
        target_prompts=prompts / "target_test.txt",
        benign_prompts=prompts / "benign_test.txt",
        settings=settings,
    ).set_index("variant")
    assert result.loc["base", "refusal_rate"] >= 0.95
    assert result.loc["base", "benign_refusal_rate"] <= 0.05
    assert result.loc["suggested", "refusal_rate"] <= 0.05
    assert result.loc["suggested", "benign_kept"] >= 0.9
    separability_row = result.loc["separability"]  # refuses on, or breaks benign answers
    assert separability_row.refusal_rate + (1 - separability_row.benign_kept) >= 0.5

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from abliterate.demo import greedy_responses, opens_with_refusal

    edited = AutoModelForCausalLM.from_pretrained(exported).eval()
    answers = greedy_responses(
        edited,
        AutoTokenizer.from_pretrained(exported),
        (prompts / "target_test.txt").read_text().splitlines()[:32],
    )
    assert sum(map(opens_with_refusal, answers)) <= 1


def test_analyze_cli_with_a_model_rejects_missing_inputs(demo_dense, tmp_path, capfd):
    from abliterate.cli import main

    prompts = demo_dense / "prompts"
    meas = tmp_path / "m.safetensors"
    from abliterate.measure import MeasureOptions, measure_to_file
    from abliterate.model import LoadOptions

    measure_to_file(
        demo_dense,
        str(prompts / "target_test.txt"),
        str(prompts / "benign_test.txt"),
        meas,
        MeasureOptions(progress=False, load=LoadOptions(device="cpu")),
    )
    base = ["analyze", str(meas), "-o", str(tmp_path / "a")]
    target, benign = str(prompts / "target_test.txt"), str(prompts / "benign_test.txt")
    cases = {
        "not a model directory": ["--model", str(tmp_path / "nope"), "--target", target,
                                  "--benign", benign],
        "prompt file not found": ["--model", str(demo_dense), "--target", str(tmp_path / "x.txt"),
                                  "--benign", benign],
        "needs --target and --benign": ["--model", str(demo_dense)],
    }  # fmt: skip
    for message, extra in cases.items():
        capfd.readouterr()
        assert main([*base, *extra]) == 1
        assert message in capfd.readouterr().err
    assert not (tmp_path / "a").exists()
