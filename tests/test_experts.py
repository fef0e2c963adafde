"""Expert attribution and adaptive expert selection on a tiny MoE with planted experts.

The planted model is a tiny glm4_moe whose weights are set by hand so that the answer is
known: target prompts are made of "trigger" words (their embedding is one residual
dimension A), the dense first layer's attention spreads A to every later token of the
prompt, and in each MoE layer the router sends tokens carrying A to two known experts,
whose down_proj writes along another dimension C. Nothing else writes C, so the refusal
direction at each MoE layer's output is C and those two experts carry its whole signal.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from test_prompts import chat_tokenizer
from tiny_models import COMMON, TINY_CONFIGS, build_tiny

from abliterate import experts
from abliterate.analyze import write_analysis
from abliterate.errors import AbliterateError
from abliterate.layout import inspect_checkpoint
from abliterate.measure import MeasureOptions, load_measurements, measure, save_measurements
from abliterate.model import LoadOptions, load_model
from abliterate.recipe import (
    Plan,
    edit_tensor,
    expert_columns,
    load_recipe,
    resolve,
    tensor_chunks,
)
from abliterate.shards import TensorInfo

A, C = 0, 7  # the trigger dimension the router reads, the dimension planted experts write
PLANTED = {1: [1, 6], 2: [2, 5]}  # MoE layer -> the experts that write C for target prompts
QUIET = MeasureOptions(progress=False)


def word_prompts(words: range, n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    picks = [torch.randint(words.start, words.stop, (int(torch.randint(2, 7, (1,), generator=g)),),
                           generator=g) for _ in range(n)]  # fmt: skip
    return [" ".join(f"w{int(w)}" for w in p) for p in picks]


TARGET = word_prompts(range(0, 10), 16, seed=1)  # trigger words
BENIGN = word_prompts(range(20, 40), 16, seed=2)


@torch.no_grad()
def plant(model) -> None:
    """Set the weights described in the module docstring (in place)."""
    tokenizer = chat_tokenizer()
    trigger = [tokenizer.convert_tokens_to_ids(f"w{i}") for i in range(10)]
    embed = model.model.embed_tokens.weight
    embed[:, A] = 0.0
    embed[:, C] = 0.0
    embed[trigger, A] = 1.0
    layers = model.model.layers
    attention = layers[0].self_attn  # uniform causal attention copying A forward
    attention.q_proj.weight.zero_()
    attention.k_proj.weight.zero_()
    attention.v_proj.weight.zero_()
    attention.v_proj.weight[0, A] = 1.0
    attention.o_proj.weight.zero_()
    attention.o_proj.weight[A, 0] = 1.0
    for layer, chosen in PLANTED.items():
        mlp = layers[layer].mlp
        mlp.gate.weight.zero_()
        mlp.gate.e_score_correction_bias.zero_()
        inter = mlp.experts.down_proj.shape[-1]
        for e in chosen:
            mlp.gate.weight[e, A] = 8.0
            mlp.gate.e_score_correction_bias[e] = -0.3  # never chosen without A
            mlp.experts.gate_up_proj[e].zero_()
            mlp.experts.gate_up_proj[e, :, A] = 1.0  # gate and up both read A
            mlp.experts.down_proj[e].zero_()
            mlp.experts.down_proj[e, C, :] = 0.05
        others = [e for e in range(mlp.experts.down_proj.shape[0]) if e not in chosen]
        mlp.experts.down_proj[others, C, :] = 0.0
        # no other writer touches A or C: benign tokens carry exactly no A (the norm would
        # blow small noise up to router-visible size) and only planted experts write C
        mlp.experts.down_proj[:, A, :] = 0.0
        mlp.shared_experts.down_proj.weight[[A, C]] = 0.0
        layers[layer].self_attn.o_proj.weight[[A, C]] = 0.0
        assert inter > 0
    layers[0].mlp.down_proj.weight[[A, C]] = 0.0
    layers[0].self_attn.o_proj.weight[C] = 0.0


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The planted glm4_moe on disk (with its tokenizer), its layout and measurements."""
    path = tmp_path_factory.mktemp("planted") / "model"
    class_name, extra = TINY_CONFIGS["glm4_moe"]
    config = getattr(transformers, class_name)(**{**COMMON, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    plant(model)
    model.save_pretrained(path)
    chat_tokenizer().save_pretrained(path)
    model, tokenizer, _ = load_model(path, LoadOptions(device="cpu"))
    meas = measure(model, tokenizer, TARGET, BENIGN, QUIET)
    return path, inspect_checkpoint(path), meas


def test_attribution_ranks_the_planted_experts_first(planted, tmp_path):
    _, _, meas = planted
    assert meas.has_attribution
    # the selections the writes are averaged over are the router's own top-k counts
    assert torch.equal(meas.target_expert_selections, meas.target_expert_counts)
    write_analysis(meas, tmp_path, charts=True, title="planted")
    import pandas as pd

    table = pd.read_csv(tmp_path / "experts.tsv", sep="\t")
    assert sorted(table.layer.unique()) == [1, 2]  # layer 0 is dense
    for layer, chosen in PLANTED.items():
        rows = table[table.layer == layer]
        top = rows[rows["rank"] <= 2]
        assert sorted(top.expert) == chosen
        assert top.share.sum() > 0.99  # nothing else writes C
        assert (top.target_freq > 0.3).all() and (top.benign_freq == 0).all()
        assert (top.target_gate > 0.45).all() and top.benign_gate.isna().all()
        assert (top.signal > 0).all() and (top.signal == top.target_proj - top.benign_proj).all()
    assert (tmp_path / "expert_share.png").stat().st_size > 0


def test_attribution_survives_the_file_round_trip(planted, tmp_path):
    _, _, meas = planted
    loaded = load_measurements(save_measurements(meas, tmp_path / "m.safetensors"))
    assert loaded.has_attribution
    for cls in ("target", "benign"):
        for name in ("expert_write", "expert_gate", "expert_selections"):
            assert torch.equal(getattr(loaded, f"{cls}_{name}"), getattr(meas, f"{cls}_{name}"))


def test_auto_and_coverage_select_exactly_the_planted_experts(planted):
    _, layout, meas = planted
    ablate = [{"layer": 1, "measurement": 2}, {"layer": 2, "measurement": 3}]

    def chosen(subset):
        plan = resolve({"ablate": ablate, "expert_subset": subset}, layout, meas)
        picked = {}
        for e in plan.entries:
            if e.component == "expert_down":
                picked.setdefault(e.layer, []).append(e.expert)
        return {layer: sorted(v) for layer, v in picked.items()}, plan

    picked, plan = chosen("auto:2")
    assert picked == PLANTED
    assert plan.info["expert_selection"] == PLANTED
    assert chosen("coverage:0.95")[0] == PLANTED
    half, _ = chosen("coverage:0.4")  # one of the two (near-equal) planted experts
    assert all(len(v) == 1 and v[0] in PLANTED[k] for k, v in half.items())
    # more than the planted experts asked for: only experts with positive signal count
    assert all(set(PLANTED[k]) <= set(v) for k, v in chosen("auto:4")[0].items())


def test_attribution_in_bfloat16_on_cpu_finds_the_same_experts(planted):
    path, _, _ = planted
    model, tokenizer, _ = load_model(path, LoadOptions(device="cpu", dtype="bfloat16"))
    meas = measure(model, tokenizer, TARGET, BENIGN, QUIET)
    table = experts.attribution_table(meas)
    assert torch.isfinite(torch.tensor(table.signal.to_numpy())).all()
    for layer, chosen in PLANTED.items():
        rows = table[table.layer == layer]
        assert sorted(rows[rows["rank"] <= 2].expert) == chosen


def test_attribution_does_not_change_the_measured_means(planted):
    path, _, with_writes = planted
    model, tokenizer, _ = load_model(path, LoadOptions(device="cpu"))
    plain = measure(
        model, tokenizer, TARGET, BENIGN, MeasureOptions(progress=False, attribution=False)
    )
    assert not plain.has_attribution
    for cls in ("target", "benign"):
        a, b = getattr(with_writes, f"{cls}_mean"), getattr(plain, f"{cls}_mean")
        assert torch.allclose(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))
    assert torch.equal(with_writes.target_expert_counts, plain.target_expert_counts)


def test_old_measurements_without_attribution_still_load(planted, tmp_path, caplog):
    _, layout, meas = planted
    path = save_measurements(meas, tmp_path / "new.safetensors")
    tensors = load_file(str(path))
    old = {k: v for k, v in tensors.items() if "expert_write" not in k and "expert_gate" not in k
           and "expert_selections" not in k}  # fmt: skip
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(old, str(tmp_path / "old.safetensors"), metadata=metadata)
    loaded = load_measurements(tmp_path / "old.safetensors")
    assert loaded.has_router_stats and not loaded.has_attribution
    with caplog.at_level("INFO", logger="abliterate"):
        write_analysis(loaded, tmp_path / "analysis", charts=False)
    assert not (tmp_path / "analysis" / "experts.tsv").exists()
    assert "Expert attribution skipped" in caplog.text
    with pytest.raises(AbliterateError, match="needs expert attribution"):
        resolve(
            {"ablate": [{"layer": 1, "measurement": 2}], "expert_subset": "auto:2"},
            layout,
            loaded,
        )
    with pytest.raises(AbliterateError, match="needs expert attribution"):
        write_analysis(loaded, tmp_path / "analysis", charts=False, require_attribution=True)


def test_per_layer_subsets_and_their_errors(planted):
    _, layout, meas = planted
    ablate = [{"layer": 1, "measurement": 2}, {"layer": 2, "measurement": 3}]
    plan = resolve({"ablate": ablate, "expert_subset": {2: [3, 7]}}, layout, meas)
    assert {(e.layer, e.expert) for e in plan.entries if e.component == "expert_down"} == {
        (2, 3),
        (2, 7),
    }  # layer 1 is edited, but its routed experts are not listed
    with pytest.raises(AbliterateError) as error:
        resolve({"ablate": ablate, "expert_subset": {2: [9]}}, layout, meas)
    assert str(error.value) == "Expert 9 not found (layer 2 has 8 experts, indices 0-7)."
    with pytest.raises(AbliterateError) as error:
        resolve({"ablate": [{"layer": 0, "measurement": 1}, *ablate],
                 "expert_subset": {0: [1]}}, layout, meas)  # fmt: skip
    assert "names layer 0, which is a dense layer without routed experts" in str(error.value)
    assert "expected one of the MoE layers 1-2" in str(error.value)
    with pytest.raises(AbliterateError, match="names layer 2, which no ablate entry edits"):
        resolve({"ablate": ablate[:1], "expert_subset": {2: [1]}}, layout, meas)


@pytest.mark.parametrize(
    "value,message",
    [
        ("auto", "'auto:K' needs a whole number K >= 1"),
        ("auto:0", "'auto:K' needs a whole number K >= 1"),
        ("coverage:1.5", "'coverage:F' needs a fraction F in \\(0, 1\\]"),
        ({"x": [1]}, "must map layer indices"),
        ({3: ["a"]}, "'expert_subset.3' must be an integer"),
    ],
)
def test_malformed_subsets_are_one_sentence(value, message):
    with pytest.raises(AbliterateError, match=message):
        load_recipe({"ablate": [{"layer": 1, "measurement": 1}], "expert_subset": value})


def test_subset_forms_round_trip_through_the_recipe():
    base = {"ablate": [{"layer": 1, "measurement": 1}]}
    assert load_recipe({**base, "expert_subset": "Auto:2"}).to_dict()["expert_subset"] == "auto:2"
    assert load_recipe({**base, "expert_subset": "coverage:0.80"}).expert_subset == "coverage:0.8"
    layers = load_recipe({**base, "expert_subset": {"21": "5", 20: [17, 3]}})
    assert layers.to_dict()["expert_subset"] == {20: [3, 17], 21: [5]}
    assert load_recipe(layers.to_dict()).expert_subset == layers.expert_subset
    flat = load_recipe(base, {"expert_subset": "3,1"})
    assert flat.expert_subset == (1, 3) and flat.to_dict()["expert_subset"] == [1, 3]


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    path = build_tiny(tmp_path_factory.mktemp("gptoss") / "model", "gpt_oss")
    chat_tokenizer().save_pretrained(path)
    return path


def test_fused_gpt_oss_attribution_is_finite(gpt_oss):
    model, tokenizer, _ = load_model(gpt_oss, LoadOptions(device="cpu", dtype="bfloat16"))
    meas = measure(model, tokenizer, TARGET, BENIGN, QUIET)
    assert meas.has_attribution
    table = experts.attribution_table(meas)
    assert sorted(table.layer.unique()) == [0, 1, 2]  # every gpt-oss layer routes
    assert len(table) == 3 * 4
    values = torch.tensor(table[["target_proj", "benign_proj", "signal", "share"]].to_numpy())
    assert torch.isfinite(values).all()
    assert torch.equal(meas.benign_expert_selections, meas.benign_expert_counts)


def test_fused_subset_edits_only_those_experts_slices(gpt_oss):
    layout = inspect_checkpoint(gpt_oss)
    g = torch.Generator().manual_seed(3)
    from abliterate.measure import Measurements

    target = torch.randn(4, 32, generator=g, dtype=torch.float64)
    benign = torch.randn(4, 32, generator=g, dtype=torch.float64)
    empty = torch.zeros(4, 0)
    meas = Measurements(target, benign, empty, empty, meta={"num_layers": 3})
    plan = resolve(
        {"ablate": [{"layer": 1, "measurement": 2}], "expert_subset": [1, 3]}, layout, meas
    )
    fused = [e for e in plan.entries if e.component == "expert_down"]
    assert len(fused) == 1 and fused[0].experts == (1, 3) and fused[0].bias
    # the sweep/search columns count the slices, and a whole fused tensor as every expert
    assert expert_columns(plan, layout) == {"experts_edited": 2, "expert_selection": "1:1,3"}
    every = resolve({"ablate": [{"layer": 1, "measurement": 2}], "expert_subset": [0, 1, 2, 3]},
                    layout, meas)  # fmt: skip
    assert expert_columns(every, layout) == {"experts_edited": 4, "expert_selection": "1:all"}
    entry = fused[0]
    weight = torch.randn(entry.shape, generator=g).to(torch.bfloat16)
    edited = edit_tensor(weight, [(entry, False)])
    r = entry.direction / entry.direction.norm()
    for e in range(4):
        if e in (1, 3):
            assert (edited[e].float() @ r).abs().max() < 0.05 * (weight[e].float() @ r).abs().max()
        else:
            assert torch.equal(edited[e], weight[e])
    bias = torch.randn(4, 32, generator=g)
    edited_bias = edit_tensor(bias, [(entry, True)])
    assert torch.equal(edited_bias[0], bias[0]) and torch.equal(edited_bias[2], bias[2])
    assert abs(float(edited_bias[1] @ r)) < 1e-5
    # the exporter streams a fused tensor one expert at a time: same bits
    info = TensorInfo(name=entry.key, shard=entry.shard, dtype="BF16", shape=tuple(entry.shape),
                      begin=0, end=weight.numel() * 2)  # fmt: skip
    pieces = [edit_tensor(weight[i], chunk) for i, (_, _, chunk) in
              enumerate(tensor_chunks(info, [(entry, False)]))]  # fmt: skip
    assert torch.equal(torch.stack(pieces), edited)
    # and the plan keeps the slices through its files
    assert "experts=1,3" in plan.describe()


def test_fused_subset_survives_plan_save_and_load(gpt_oss, tmp_path):
    layout = inspect_checkpoint(gpt_oss)
    from test_recipe import fake_measurements

    plan = resolve(
        {"ablate": [{"layer": 2, "measurement": 3}], "expert_subset": {2: [0]}},
        layout,
        fake_measurements(3, 32),
    )
    loaded = Plan.load(plan.save(tmp_path / "plan.json"))
    assert [e.experts for e in loaded.entries] == [e.experts for e in plan.entries]
    assert loaded.sha256() == plan.sha256()


def test_fused_subset_in_memory_equals_the_reloaded_export(gpt_oss, tmp_path):
    """What the sweep evaluates with a fused subset is what the export holds."""
    from test_recipe import fake_measurements

    from abliterate.evaluate import InMemoryEditor
    from abliterate.export import export_model

    layout = inspect_checkpoint(gpt_oss)
    recipe = {"ablate": [{"layer": n, "measurement": n + 1} for n in range(3)],
              "expert_subset": {0: [2], 1: [0, 3], 2: [1]}}  # fmt: skip
    plan = resolve(recipe, layout, fake_measurements(3, 32))
    plan.model_dir = str(gpt_oss)
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt_oss, dtype="auto").eval()
    base = {k: t.detach().clone() for k, t in model.state_dict().items()}
    with InMemoryEditor(model, gpt_oss).applied(plan):
        edited = {k: t.detach().clone() for k, t in model.state_dict().items()}
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        export_model(plan, tmp_path / "export"), dtype="auto"
    ).state_dict()
    for key, tensor in edited.items():
        assert torch.equal(tensor, reloaded[key]), key
    down = "model.layers.1.mlp.experts.down_proj"
    assert torch.equal(edited[down][1], base[down][1]) and torch.equal(
        edited[down][2], base[down][2]
    )
    assert not torch.equal(edited[down][0], base[down][0])
    assert not torch.equal(edited[down][3], base[down][3])


@pytest.mark.parametrize(
    "family,overrides",
    [("qwen3_moe", {}), ("mixtral", {}), ("deepseek_v3", {"num_key_value_heads": 4})],
)
def test_the_recorded_writes_add_up_to_the_experts_output(tmp_path, family, overrides):
    """Per-expert writes of Qwen3-MoE, Mixtral and DeepSeek-V3 decompose exactly what their
    experts module returned (equal-length prompts: no padding to leave out)."""
    path = build_tiny(tmp_path / family, family, **overrides)
    chat_tokenizer().save_pretrained(path)
    model, tokenizer, _ = load_model(path, LoadOptions(device="cpu"))
    totals = {}

    def summing(index):
        def hook(module, args, output):
            totals[index] = totals.get(index, 0) + output.detach().double().sum(0)

        return hook

    from abliterate.measure import expert_modules

    modules = expert_modules(model.model.layers)
    assert modules  # every MoE layer keeps its experts in one fused module
    handles = [m.register_forward_hook(summing(i)) for i, m in modules.items()]
    prompts = ["w1 w2 w3", "w4 w5 w6", "w7 w8 w9"]
    try:
        meas = measure(model, tokenizer, prompts, ["w20 w21 w22"], QUIET)
    finally:
        for handle in handles:
            handle.remove()
    assert meas.has_attribution
    assert torch.equal(meas.target_expert_selections, meas.target_expert_counts)
    for index in modules:
        recorded = (
            meas.target_expert_write[index].double()
            * meas.target_expert_selections[index].double().unsqueeze(-1)
            + meas.benign_expert_write[index].double()
            * meas.benign_expert_selections[index].double().unsqueeze(-1)
        ).sum(0)
        assert torch.allclose(recorded, totals[index], rtol=1e-5, atol=1e-6), family
