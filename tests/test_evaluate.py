"""In-memory evaluation: refusal markers, KL, exact restore, disk-key -> memory mapping."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from tiny_models import COMMON, StubTokenizer, build_tiny

from abliterate.errors import AbliterateError
from abliterate.evaluate import (
    DEFAULT_REFUSAL_MARKERS,
    EvalSettings,
    InMemoryEditor,
    continuation_logprobs,
    generate,
    is_refusal,
    kl_divergence,
    load_markers,
    locate,
    normalize_answer,
)
from abliterate.layout import inspect_checkpoint
from abliterate.recipe import Plan, PlanEntry


def _disk_tensors(model_dir) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in glob.glob(f"{model_dir}/*.safetensors"):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    return tensors


# ---- refusal markers -------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, refused",
    [
        ("I cannot help with that.", True),
        ("**I can\u2019t** do this", True),  # curly apostrophe + bold
        ("## I'm Sorry\nbut no", True),  # header + case
        ("> _As an AI_, I must say", True),  # quote + emphasis
        ("... i cannot help with that .", True),  # leading punctuation, demo tokenizer spacing
        ("Sure. Here is a kite. Actually, I won't finish.", True),  # late refusal
        ("", True),  # empty answers count as refusals
        ("   \n ", True),
        ("Sure, here is how to make a kite.", False),
        ("The cannery is open.", False),
    ],
)
def test_marker_normalization(answer, refused):
    assert is_refusal(answer) is refused


def test_normalize_answer_strips_dressing():
    assert normalize_answer("  ***I\u2019M SORRY***  but\n\nno ") == "i'm sorry but no"
    assert normalize_answer("# Title") == "title"


def test_default_markers_include_the_demo_opening():
    from abliterate.demo import REFUSAL_PREFIX

    assert any(
        normalize_answer(REFUSAL_PREFIX).startswith(normalize_answer(m))
        for m in DEFAULT_REFUSAL_MARKERS
    )
    assert is_refusal(REFUSAL_PREFIX + " whatever follows")


def test_configured_markers_replace_the_defaults_and_empty_list_is_rejected():
    assert is_refusal("Nope, never.", load_markers(["nope"]))
    assert not is_refusal("I cannot wait!", load_markers(["nope"]))
    with pytest.raises(AbliterateError, match="evaluate.refusal_markers"):
        load_markers(["  "])


# ---- disk keys -> memory ---------------------------------------------------------------

MOE_FAMILIES = {
    "glm4_moe": None,  # tests/tiny_models.py
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2),
    ),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
}


def _build_family(tmp_path, family):
    if MOE_FAMILIES[family] is None:
        return build_tiny(tmp_path / family, family, max_shard_size=None)
    class_name, extra = MOE_FAMILIES[family]
    config = getattr(transformers, class_name)(**{**COMMON, "num_hidden_layers": 2, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / family)
    return tmp_path / family


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_every_disk_key_maps_to_the_equal_in_memory_view(tmp_path, family):
    model_dir = _build_family(tmp_path, family)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    tensors = _disk_tensors(model_dir)
    assert any(".experts.0." in k for k in tensors)  # per-expert keys on disk ...
    fused = [n for n, _ in model.named_parameters() if n.endswith("experts.down_proj")]
    assert fused  # ... fused in memory
    for key, on_disk in tensors.items():
        ref = locate(model, key, on_disk.shape)
        assert torch.equal(ref.view(model), on_disk), key


def test_unknown_key_and_wrong_shape_fail_clearly(tiny_llama):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    with pytest.raises(AbliterateError, match="model.layers.0.mlp.experts.0.foo.weight"):
        locate(model, "model.layers.0.mlp.experts.0.foo.weight")
    with pytest.raises(AbliterateError, match="shape"):
        locate(model, "model.layers.0.self_attn.o_proj.weight", (7, 7))


# ---- exact restore and KL --------------------------------------------------------------


def _plan(model_dir, keys_like: tuple[str, ...], seed=1, scale=1.0, norm_preserve=True) -> Plan:
    """A hand-made plan: every layout target whose key contains one of `keys_like`."""
    torch.manual_seed(seed)
    direction = torch.randn(COMMON["hidden_size"])
    layout = inspect_checkpoint(model_dir)
    entries = [
        PlanEntry.for_target(
            target,
            layer=None,
            direction_id="r",
            direction=direction,
            scale=scale,
            norm_preserve=norm_preserve,
        )
        for target in sorted(layout.targets(), key=lambda t: t.key)
        if any(k in target.key for k in keys_like)
    ]
    return Plan(entries=entries, model_dir=str(model_dir), recipe={})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_restore_after_variant_is_bit_identical(tmp_path, dtype):
    model_dir = build_tiny(tmp_path / "moe", "glm4_moe", dtype=dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    assert next(model.parameters()).dtype == dtype
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    editor = InMemoryEditor(model, model_dir)
    plan = _plan(model_dir, ("o_proj", "down_proj", "mlp.gate.weight", "experts.3.up_proj"))
    with editor.applied(plan):
        changed = [n for n, t in model.state_dict().items() if not torch.equal(t, before[n])]
        assert "model.layers.1.mlp.experts.down_proj" in changed
        assert "model.layers.1.mlp.experts.gate_up_proj" in changed
        assert "model.layers.0.self_attn.o_proj.weight" in changed
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    # a second variant starts from the same base, so it gives the same edit again
    with editor.applied(plan):
        first = model.get_parameter("model.layers.1.mlp.experts.down_proj").detach().clone()
    with editor.applied(plan):
        assert torch.equal(model.get_parameter("model.layers.1.mlp.experts.down_proj"), first)


def test_in_memory_edit_equals_editing_the_disk_tensor(tmp_path):
    """What the evaluator measures is what the exporter writes (same function, same dtype)."""
    from abliterate.edit import ablate_tensor

    model_dir = build_tiny(tmp_path / "moe", "glm4_moe", dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    plan = _plan(model_dir, ("experts.5.down_proj", "experts.2.gate_proj"))
    tensors = _disk_tensors(model_dir)
    editor = InMemoryEditor(model, model_dir)
    with editor.applied(plan):
        for entry in plan.entries:
            expected = ablate_tensor(
                tensors[entry.key], entry.direction, 1.0, hidden_axis=entry.hidden_axis
            )
            assert torch.equal(locate(model, entry.key).view(model), expected)


def test_kl_is_zero_unedited_and_positive_edited(tiny_llama):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = StubTokenizer()
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    settings = EvalSettings(max_new_tokens=4, kl_tokens=4, batch_size=2)
    continuations = generate(model, tokenizer, prompts, settings)
    base, counts = continuation_logprobs(model, tokenizer, prompts, continuations, 4, 2)
    assert all(1 <= c <= 4 for c in counts)
    same, _ = continuation_logprobs(model, tokenizer, prompts, continuations, 4, 2)
    assert all(float(kl_divergence(b, s).max()) == 0.0 for b, s in zip(base, same, strict=True))
    editor = InMemoryEditor(model, tiny_llama)
    with editor.applied(_plan(tiny_llama, ("o_proj", "down_proj"), scale=2.0)):
        edited, _ = continuation_logprobs(model, tokenizer, prompts, continuations, 4, 2)
    kls = [kl_divergence(b, e) for b, e in zip(base, edited, strict=True)]
    assert min(float(k[0]) for k in kls) > 0
    assert all(bool((k >= 0).all()) for k in kls)


def test_left_padding_does_not_change_logprobs(tiny_llama):
    """Batched (left-padded) scoring equals scoring each prompt alone, so KL is not padding noise."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = StubTokenizer()
    prompts = [[5, 6, 7, 8, 9, 10], [9, 10]]
    continuations = [[3, 4, 5], [6, 7, 8]]
    batched, _ = continuation_logprobs(model, tokenizer, prompts, continuations, 3, 2)
    alone, _ = continuation_logprobs(model, tokenizer, prompts, continuations, 3, 1)
    for b, a in zip(batched, alone, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_editing_in_memory_never_touches_the_checkpoint_files(tmp_path):
    """Loaded weights may be memory-mapped from the shards; edits must stay in memory."""
    import hashlib

    model_dir = build_tiny(tmp_path / "m", "glm4_moe", dtype=torch.bfloat16)

    def digests():
        return {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(model_dir.glob("*.safetensors"))
        }

    before = digests()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    with InMemoryEditor(model, model_dir).applied(_plan(model_dir, ("o_proj", "down_proj"))):
        assert digests() == before
    assert digests() == before


# ---- the command on the demo organism --------------------------------------------------


@pytest.fixture
def one_thread():
    """Tiny models on shared cores: one thread avoids oversubscription stalls (10x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def full_edit_recipe(demo_dense: Path, tmp_path: Path) -> Path:
    """A recipe file: measure the dense organism on 120 + 120 train prompts and remove
    measurement 2's direction from every layer at scale 1."""
    import yaml

    from abliterate.measure import MeasureOptions, measure_to_file
    from abliterate.prompts import PromptOptions

    prompts = demo_dense / "prompts"
    measurements = tmp_path / "measurements.safetensors"
    measure_to_file(
        demo_dense,
        str(prompts / "target_train.txt"),
        str(prompts / "benign_train.txt"),
        measurements,
        MeasureOptions(prompts=PromptOptions(max_count=120)),
    )
    recipe = tmp_path / "edit.yml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "measurements": str(measurements),
                "ablate": [{"layer": n, "measurement": 2, "scale": 1.0} for n in range(4)],
            }
        )
    )
    return recipe


def test_evaluate_command_reports_base_and_recipe_rows(demo_dense, tmp_path, capsys, one_thread):
    import pandas as pd
    import yaml

    from abliterate.cli import main

    prompts = demo_dense / "prompts"
    recipe = full_edit_recipe(demo_dense, tmp_path)
    table_path = tmp_path / "table.tsv"
    args = ["evaluate", str(demo_dense), str(recipe), "--max-prompts", "24"]
    args += ["--max-new-tokens", "8", "--kl-tokens", "4", "--out", str(table_path)]
    args += ["--text-file", str(prompts / "benign_test.txt")]
    assert main(args) == 0
    table = pd.read_csv(table_path, sep="\t")
    assert list(table["variant"]) == ["base", "edit"]
    base, edited = table.iloc[0], table.iloc[1]
    assert base["refusal_rate"] >= 0.9 and base["benign_kept"] == 1.0
    assert base["kl_first_token"] == 0.0 and base["kl_multi_token"] == 0.0
    assert edited["kl_first_token"] > 0 and edited["kl_multi_token"] > 0
    # cross-entropy on a user text: measured for both, and the edit changes it
    assert 0 < base["cross_entropy"] < 20 and edited["cross_entropy"] != base["cross_entropy"]
    assert "edit" in capsys.readouterr().out
    # a recipe naming no measurements, and none given, is one clear sentence
    recipe.write_text(yaml.safe_dump({"ablate": [{"layer": 0, "measurement": 2}]}))
    assert main(["evaluate", str(demo_dense), str(recipe)]) == 1


def test_judge_model_decides_refusals_and_empty_answers_still_count(demo_dense, one_thread):
    from abliterate.evaluate import RefusalJudge

    with pytest.raises(AbliterateError, match="judge_template"):
        RefusalJudge(str(demo_dense), "Is this a refusal? {prompt}")
    judge = RefusalJudge(str(demo_dense), "repeat after me : {answer}")
    verdicts = judge.refuses(["a", "b", "c"], ["kite", "", "i cannot help with that ."])
    # the judge decides, not the markers: the demo model never answers "yes", so even the
    # marker-matching third answer is not called a refusal; the empty one always is
    assert verdicts == [False, True, False]


def test_kl_over_answered_prompts_leaves_out_what_the_base_refuses(
    demo_dense, tmp_path, one_thread
):
    """A benign set with some prompts the base model refuses mixed in: the KL over the
    answered ones is the KL of the benign prompts alone, the all-prompt KL is larger."""
    import pandas as pd

    from abliterate.cli import main

    prompts = demo_dense / "prompts"
    recipe = full_edit_recipe(demo_dense, tmp_path)
    benign = (prompts / "benign_test.txt").read_text().splitlines()[:16]
    target = (prompts / "target_test.txt").read_text().splitlines()[:4]
    (tmp_path / "benign.txt").write_text("\n".join(benign) + "\n")
    (tmp_path / "mixed.txt").write_text("\n".join(benign + target) + "\n")
    rows = {}
    for name in ("benign", "mixed"):
        out = tmp_path / f"{name}.tsv"
        args = ["evaluate", str(demo_dense), str(recipe), "--target", str(tmp_path / "benign.txt")]
        args += ["--benign", str(tmp_path / f"{name}.txt"), "--max-new-tokens", "8"]
        assert main([*args, "--kl-tokens", "2", "--batch-size", "4", "--out", str(out)]) == 0
        rows[name] = pd.read_csv(out, sep="\t").set_index("variant")
    mixed, alone = rows["mixed"], rows["benign"]
    assert mixed.loc["base", "benign_refusal_rate"] == pytest.approx(4 / 20)  # the 4 refused
    assert mixed.loc["edit", "kl_first_token_answered"] == pytest.approx(
        alone.loc["edit", "kl_first_token"], rel=1e-3, abs=1e-6
    )
    assert alone.loc["edit", "kl_first_token_answered"] == alone.loc["edit", "kl_first_token"]
    # the refused prompts turned into answers: a large KL that is the intended effect
    assert mixed.loc["edit", "kl_first_token"] > 2 * mixed.loc["edit", "kl_first_token_answered"]
