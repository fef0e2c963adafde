"""Half-precision checkpoints: measurement, in-memory evaluation and export agree.

Why: transformers keeps some modules of a bf16/fp16 checkpoint in float32 in memory
(GLM-4.5 and DeepSeek-V3 routers, `_keep_in_fp32_modules_strict`). The sweep evaluates an
edit in memory and the export writes it to disk; a user loads the export with
transformers. These tests check, on tiny random models saved in half precision, that the
model the sweep measured is exactly the model the user gets: the same parameters and the
same logits (compared with `torch.equal`: on one CPU process the forward pass is
deterministic, so the tolerance is zero).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import COMMON, StubTokenizer, build_tiny

from abliterate.evaluate import (
    EvalSettings,
    Evaluator,
    InMemoryEditor,
    PromptSet,
    check_against_disk,
    kept_in_float32,
    locate,
)
from abliterate.export import export_model
from abliterate.layout import inspect_checkpoint
from abliterate.measure import Measurements, MeasureOptions, collect
from abliterate.prompts import EncodedPrompt
from abliterate.recipe import Plan, resolve
from abliterate.verify import verify

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]


def _measurements(num_layers: int, hidden: int) -> Measurements:
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(num_layers + 1, hidden, generator=generator, dtype=torch.float64)
    benign = torch.randn(num_layers + 1, hidden, generator=generator, dtype=torch.float64)
    empty = torch.zeros(num_layers + 1, 0)
    return Measurements(target, benign, empty, empty, meta={"num_layers": num_layers})


def _plan(model_dir) -> Plan:
    """Every layer at scale 1 with the default components plus every routed expert."""
    layout = inspect_checkpoint(model_dir)
    recipe = {
        "ablate": [{"layer": n, "measurement": 2} for n in range(layout.num_layers)],
        "ablate_individual_experts": layout.is_moe,
    }
    plan = resolve(recipe, layout, _measurements(layout.num_layers, layout.hidden_size))
    plan.model_dir = str(model_dir)
    return plan


def _load(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval()


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(input_ids=torch.tensor([PROMPTS[0]])).logits


def _edited_and_exported(model_dir, tmp_path):
    """(parameters + logits of the in-memory edit, the same of the reloaded export)."""
    plan = _plan(model_dir)
    model = _load(model_dir)
    with InMemoryEditor(model, model_dir).applied(plan):
        in_memory = {k: t.detach().clone() for k, t in model.state_dict().items()}
        in_memory_logits = _logits(model)
    output = export_model(plan, tmp_path / "export")
    reloaded = _load(output)
    return plan, output, (in_memory, in_memory_logits), (reloaded.state_dict(), _logits(reloaded))


def _assert_same(edited, exported) -> None:
    (params, logits), (params_out, logits_out) = edited, exported
    assert params.keys() == params_out.keys()
    for name, tensor in params.items():
        assert tensor.dtype == params_out[name].dtype, name
        assert torch.equal(tensor, params_out[name]), name
    assert torch.equal(logits, logits_out)


def test_glm4_moe_bf16_with_its_float32_router_measures_evaluates_and_exports(tmp_path):
    model_dir = build_tiny(tmp_path / "glm", "glm4_moe", dtype=torch.bfloat16)
    model = _load(model_dir)
    router = "model.layers.1.mlp.gate.weight"
    # the situation of the bug: bf16 on disk, float32 in memory, read from the model class
    assert "gate.weight" in kept_in_float32(model)
    assert model.get_parameter(router).dtype == torch.float32
    assert model.get_parameter("model.layers.1.self_attn.o_proj.weight").dtype == torch.bfloat16
    assert inspect_checkpoint(model_dir).target(router).dtype == "BF16"

    # measurement: residual rows and router counts of a bf16 model with a float32 router
    acts = collect(
        model, [EncodedPrompt(ids, 1) for ids in PROMPTS], MeasureOptions(progress=False)
    )
    assert acts.rows.shape == (len(PROMPTS), COMMON["num_hidden_layers"] + 1, 32)
    assert torch.isfinite(acts.mean).all()
    assert int(acts.expert_counts.sum()) > 0

    # the disk check accepts the upcast router and still compares its values
    check_against_disk(model, model_dir, [locate(model, router)])

    # a sweep variant evaluates (its first edit checks the router against the disk)
    plan = _plan(model_dir)
    assert router in plan.keys()
    ids = [list(p) for p in PROMPTS]
    evaluator = Evaluator(
        model,
        StubTokenizer(),
        PromptSet(["t"] * 3, ids),
        PromptSet(["b"] * 3, ids),
        EvalSettings(max_new_tokens=3, kl_tokens=2, batch_size=2),
        model_dir=model_dir,
    )
    row = evaluator.evaluate("variant", plan)
    assert row.kl_first_token > 0

    # what the sweep measured is what the user loads from the export
    plan, output, edited, exported = _edited_and_exported(model_dir, tmp_path)
    assert edited[0][router].dtype == torch.float32
    assert not torch.equal(edited[0][router], model.get_parameter(router))
    _assert_same(edited, exported)
    assert verify(model_dir, output, plan, generate=False)["ok"]


# every registry family with a transformers class, each in half precision
FAMILIES = ["llama", "qwen3", "mixtral", "qwen3_moe", "qwen2_moe", "gpt_oss", "deepseek_v3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_in_memory_edit_equals_the_reloaded_export_in_bf16(tmp_path, family):
    model_dir = build_tiny(tmp_path / family, family, dtype=torch.bfloat16)
    _, _, edited, exported = _edited_and_exported(model_dir, tmp_path)
    _assert_same(edited, exported)


@pytest.mark.parametrize("family", ["glm4_moe", "llama", "gpt_oss"])
def test_in_memory_edit_equals_the_reloaded_export_in_fp16(tmp_path, family):
    """fp16 also upcasts `_keep_in_fp32_modules` (gpt-oss' norms) besides the strict list."""
    model_dir = build_tiny(tmp_path / family, family, dtype=torch.float16)
    acts = collect(
        _load(model_dir), [EncodedPrompt(ids, 1) for ids in PROMPTS], MeasureOptions(progress=False)
    )
    assert acts.rows.dtype == torch.float16 and torch.isfinite(acts.mean).all()
    _, _, edited, exported = _edited_and_exported(model_dir, tmp_path)
    _assert_same(edited, exported)
