"""Quantized checkpoints: FP8 block scales and MXFP4 experts round-trip through the edit,
bad scale tensors are one sentence naming the key, and pre-quantized bitsandbytes
checkpoints are measured but never exported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_prompts import chat_tokenizer
from tiny_models import build_tiny
from transformers import AutoModelForCausalLM

from abliterate import quant
from abliterate.edit import ablate_tensor
from abliterate.errors import AbliterateError
from abliterate.evaluate import InMemoryEditor
from abliterate.export import export_model
from abliterate.layout import Layout, inspect_checkpoint
from abliterate.measure import Measurements, MeasureOptions, measure
from abliterate.model import LoadOptions, load_model, quantization_of
from abliterate.quant import FP8_DTYPE
from abliterate.recipe import resolve
from abliterate.shards import TensorInfo, read_checkpoint
from abliterate.verify import verify


def info(name: str, dtype: str, shape) -> TensorInfo:
    return TensorInfo(name, "model.safetensors", dtype, tuple(shape), 0, 0)


def llm_like(shape, seed: int) -> torch.Tensor:
    """Gaussian weights with rare large outliers, as trained LLM weights have."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=generator) * 0.02
    return torch.where(torch.rand(shape, generator=generator) < 2e-3, w * 20, w)


def unit(n: int, seed: int) -> torch.Tensor:
    r = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return r / r.norm()


# --------------------------------------------------------------------------- FP8


def test_fp8_dequantize_multiplies_each_block_by_its_scale_inv_partial_blocks_included():
    """DeepSeek-V3's convention: 128 x 128 blocks, ceil-divided, value = fp8 * scale_inv."""
    weight = torch.ones(130, 260).to(quant.FP8_DTYPE)
    scale_inv = torch.arange(1, 1 + 2 * 3, dtype=torch.float32).reshape(2, 3)
    assert quant.fp8_scale_shape(weight.shape, (128, 128)) == (2, 3)
    values = quant.dequantize_fp8_blocks(weight, scale_inv, (128, 128))
    assert values.dtype == torch.float32
    assert values[0, 0] == 1 and values[127, 127] == 1 and values[0, 128] == 2
    assert values[0, 259] == 3 and values[128, 0] == 4 and values[129, 259] == 6


def test_fp8_round_trip_is_bounded_and_requantizing_shipped_values_is_exact():
    w = llm_like((300, 520), seed=0)  # partial blocks on both axes
    q, s = quant.quantize_fp8_blocks(w, (128, 128))
    assert q.dtype == quant.FP8_DTYPE and q.shape == w.shape and s.shape == (3, 5)
    back = quant.dequantize_fp8_blocks(q, s, (128, 128))
    # e4m3 keeps 3 mantissa bits: at most half a step (1/16 relative) per value
    assert ((back - w).abs() <= w.abs() / 16 + s.max() * 2**-9).all()
    assert (back - w).norm() / w.norm() < 0.03
    # a checkpoint as shipped (already on the FP8 grid) survives dequant -> requant unchanged
    q2, s2 = quant.quantize_fp8_blocks(back, (128, 128))
    assert torch.equal(quant.dequantize_fp8_blocks(q2, s2, (128, 128)), back)


def test_fp8_edit_removes_the_direction_to_fp8_precision_versus_bf16():
    """The numbers of docs/quantized.md in small: requantizing to FP8 costs ~5x the error
    of storing the edit in bf16, and leaves a bounded part of the removed component."""
    q, s = quant.quantize_fp8_blocks(llm_like((256, 384), seed=1))
    source = quant.dequantize_fp8_blocks(q, s)
    r = unit(256, seed=2)

    def edit(w):
        assert w.dtype == torch.float32
        return ablate_tensor(w, r, 1.0, hidden_axis=0)

    exact = edit(source)
    q2, s2 = quant.edit_fp8(q, s, edit)
    assert q2.dtype == q.dtype and s2.dtype == s.dtype and s2.shape == s.shape
    as_fp8 = quant.dequantize_fp8_blocks(q2, s2)
    as_bf16 = ablate_tensor(source.to(torch.bfloat16), r, 1.0, hidden_axis=0).float()
    fp8_error = ((as_fp8 - exact).norm() / exact.norm()).item()
    bf16_error = ((as_bf16 - exact).norm() / exact.norm()).item()
    assert bf16_error < 0.005 and fp8_error < 0.03 and fp8_error > bf16_error
    before = (r @ source).norm()
    assert (r @ as_fp8).norm() / before < 0.5  # what FP8's grid leaves of r^T W
    assert (r @ as_bf16).norm() / before < 0.05
    norms = as_fp8.norm(dim=0) / source.norm(dim=0)  # norm preservation, to FP8 precision
    assert ((norms - 1).abs() < 0.05).all()


def test_fp8_per_tensor_scale_round_trips():
    w = llm_like((64, 48), seed=3)
    q, s = quant.quantize_fp8_blocks(w, None)
    assert s.shape == ()
    back = quant.dequantize_fp8_blocks(q, s, None)
    assert (back - w).norm() / w.norm() < 0.03


# --------------------------------------------------------------------------- MXFP4


def test_mxfp4_low_nibble_first_and_e8m0_bias_127():
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, 0] = 0x21  # low nibble 1 (0.5) is value 0, high nibble 2 (1.0) is value 1
    blocks[0, 1] = 0xF7  # 7 (6.0) then 15 (-6.0)
    for byte, factor in ((127, 1.0), (128, 2.0), (125, 0.25)):
        values = quant.dequantize_mxfp4(blocks, torch.tensor([byte], dtype=torch.uint8))
        assert values.shape == (32,)
        assert values[:4].tolist() == [0.5 * factor, 1.0 * factor, 6.0 * factor, -6.0 * factor]
        assert (values[4:] == 0).all()
    assert quant.quantize_mxfp4(quant.dequantize_mxfp4(blocks, torch.tensor([127]).byte()))[
        0
    ].equal(blocks)


def test_mxfp4_gpt_oss_layout_and_round_trip():
    """gpt-oss down_proj: parameter [E, intermediate, hidden], blocks [E, hidden, I/32, 16]."""
    parameter = llm_like((2, 64, 96), seed=4)
    blocks, scales = quant.mxfp4_from_parameter(parameter)
    assert blocks.shape == (2, 96, 2, 16) and scales.shape == (2, 96, 2)
    assert blocks.dtype == scales.dtype == torch.uint8
    assert quant.mxfp4_parameter_shape(blocks.shape) == (2, 64, 96)
    back = quant.mxfp4_parameter(blocks, scales)
    assert back.shape == parameter.shape
    # e2m1 keeps 1 mantissa bit, and the power-of-two scale wastes up to half the range
    assert (back - parameter).norm() / parameter.norm() < 0.2
    # values already on the grid (a shipped checkpoint) requantize to the same values
    again = quant.mxfp4_parameter(*quant.mxfp4_from_parameter(back))
    assert torch.equal(again, back)


@pytest.mark.parametrize("output", quant.MXFP4_OUTPUTS)
def test_mxfp4_edit_meets_the_invariants_after_dequantization(output):
    blocks, scales = quant.mxfp4_from_parameter(llm_like((2, 64, 96), seed=5))
    source = quant.mxfp4_parameter(blocks, scales)
    r = unit(96, seed=6)

    def edit(w):
        return ablate_tensor(w, r, 1.0, hidden_axis=2)

    result = quant.edit_mxfp4(blocks, scales, edit, output=output)
    if output == "bf16":
        assert result.dtype == torch.bfloat16 and result.shape == source.shape
        edited, bound = result.float(), 0.02
    else:
        assert [t.shape for t in result] == [blocks.shape, scales.shape]
        edited, bound = quant.mxfp4_parameter(*result), 0.6
    residual = (
        torch.einsum("eih,h->ei", edited, r).norm() / torch.einsum("eih,h->ei", source, r).norm()
    )
    assert residual < bound, residual
    norms = edited.norm(dim=2) / source.norm(dim=2)
    assert ((norms - 1).abs() < (0.02 if output == "bf16" else 0.15)).all()


def test_unknown_mxfp4_output_is_one_sentence():
    blocks, scales = quant.mxfp4_from_parameter(torch.ones(1, 32, 32))
    with pytest.raises(AbliterateError, match="mxfp4 output is 'fp16'"):
        quant.edit_mxfp4(blocks, scales, lambda w: w, output="fp16")


# --------------------------------------------------------------------------- validation


def test_corrupt_fp8_scale_names_the_key_and_the_expected_block_count():
    key = "model.layers.0.self_attn.o_proj.weight"
    weight = info(key, "F8_E4M3", (256, 384))
    with pytest.raises(AbliterateError) as caught:
        quant.check_fp8_pair(key, weight, info(key + "_scale_inv", "F32", (2, 2)), (128, 128))
    message = str(caught.value)
    assert f"'{key}_scale_inv'" in message and "[2, 2]" in message and "[2, 3]" in message
    with pytest.raises(AbliterateError, match="dtype U8; expected one of F32"):
        quant.check_fp8_pair(key, weight, info(key + "_scale_inv", "U8", (2, 3)), (128, 128))
    quant.check_fp8_pair(key, weight, info(key + "_scale_inv", "F32", (2, 3)), (128, 128))


def test_fp8_weight_without_scale_or_scale_in_another_shard_is_refused():
    key = "model.layers.0.mlp.down_proj.weight"
    q = quant.CheckpointQuantization("fp8", (128, 128))
    with pytest.raises(
        AbliterateError, match=f"'{key}' is stored as F8_E4M3 .* no '{key}_scale_inv'"
    ):
        quant.quantized_tensors({key: info(key, "F8_E4M3", (128, 128))}, q)
    scale = TensorInfo(key + "_scale_inv", "other.safetensors", "F32", (1, 1), 0, 0)
    with pytest.raises(
        AbliterateError, match="is in other.safetensors, not beside .* in model.safetensors"
    ):
        quant.quantized_tensors({key: info(key, "F8_E4M3", (128, 128)), scale.name: scale}, q)


def test_corrupt_mxfp4_scales_name_the_key():
    key = "model.layers.0.mlp.experts.down_proj"
    blocks = info(key + "_blocks", "U8", (4, 32, 2, 16))
    with pytest.raises(AbliterateError, match=f"'{key}_scales' has shape \\[4, 32, 3\\]"):
        quant.check_mxfp4_pair(key, blocks, info(key + "_scales", "U8", (4, 32, 3)))
    with pytest.raises(AbliterateError, match=f"'{key}_blocks' has shape"):
        quant.check_mxfp4_pair(
            key, info(key + "_blocks", "U8", (4, 32, 64)), info(key + "_scales", "U8", (4, 32))
        )
    q = quant.CheckpointQuantization("mxfp4", None)
    with pytest.raises(AbliterateError, match="has no .*_scales' beside it"):
        quant.quantized_tensors({blocks.name: blocks}, q)


def test_detection_from_config_then_from_tensor_names():
    fp8 = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    assert quant.checkpoint_quantization(fp8, {}) == quant.CheckpointQuantization(
        "fp8", (128, 128), fp8["quantization_config"]
    )
    mx = quant.checkpoint_quantization({"quantization_config": {"quant_method": "mxfp4"}}, {})
    assert mx.method == "mxfp4" and mx.editable
    bnb = {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}
    found = quant.checkpoint_quantization(bnb, {})
    assert found.method == "bitsandbytes" and not found.editable
    assert found.describe() == "bitsandbytes 4-bit"
    # no quantization_config: the tensors decide
    key = "model.layers.0.self_attn.o_proj.weight"
    names = {key: info(key, "F8_E4M3", (128, 128)), key + "_scale_inv": info(key, "F32", (1, 1))}
    assert quant.checkpoint_quantization({}, names).method == "fp8"
    blocks = {"x.down_proj_blocks": None, "x.down_proj_scales": None}
    assert quant.checkpoint_quantization({}, blocks).method == "mxfp4"
    assert quant.checkpoint_quantization({}, {key: None}).method is None


def test_pre_quantized_bitsandbytes_is_refused_in_one_sentence():
    found = quant.CheckpointQuantization("bitsandbytes", None, {"load_in_4bit": True})
    with pytest.raises(AbliterateError) as caught:
        quant.require_editable(found, "models/x")
    message = str(caught.value)
    assert message.count(".") == 1 and message.endswith(").")
    assert "bitsandbytes 4-bit" in message and "full-precision weights" in message


# --------------------------------------------------------------------------- checkpoints

INDEX = "model.safetensors.index.json"
CPU = LoadOptions(device="cpu")
QUIET = MeasureOptions(progress=False)
FIXTURE_BLOCK = (16, 16)  # the tiny model's widths (32, 48, 16) are multiples of 16


def to_fp8_checkpoint(source: Path, output: Path, block=FIXTURE_BLOCK) -> Path:
    """GLM-4.5-Air-FP8's layout from a tiny bf16 checkpoint: every `*_proj.weight` of the
    decoder layers in float8_e4m3fn with its `weight_scale_inv` beside it in the same shard
    (as DeepSeek-V3's index maps them); router, norms, embeddings and lm_head stay bf16."""
    output.mkdir(parents=True)
    index = json.loads((source / INDEX).read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = {}
        for key, value in load_file(source / shard).items():
            if ".layers." in key and key.endswith("_proj.weight"):
                # uneven block scales, as trained weights have: row block i gets gain i + 1
                gain = torch.arange(1, value.shape[0] // block[0] + 1).repeat_interleave(block[0])
                value = value * gain[:, None].to(value.dtype)
                tensors[key], tensors[quant.fp8_scale_key(key)] = quant.quantize_fp8_blocks(
                    value, block
                )
                index["weight_map"][quant.fp8_scale_key(key)] = shard
            else:
                tensors[key] = value
        save_file(tensors, output / shard, metadata={"format": "pt"})
    (output / INDEX).write_text(json.dumps(index))
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(block),
    }
    (output / "config.json").write_text(json.dumps(config))
    return output


def load_all(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def fake_measurements(num_layers: int, hidden: int) -> Measurements:
    g = torch.Generator().manual_seed(0)
    means = [torch.randn(num_layers + 1, hidden, generator=g, dtype=torch.float64) for _ in "tb"]
    empty = torch.zeros(num_layers + 1, 0)
    return Measurements(means[0], means[1], empty, empty, meta={"num_layers": num_layers})


@pytest.fixture(scope="module")
def glm_fp8(tmp_path_factory):
    root = tmp_path_factory.mktemp("glm-fp8")
    bf16 = build_tiny(root / "bf16", "glm4_moe", dtype=torch.bfloat16, max_shard_size="20KB")
    model = to_fp8_checkpoint(bf16, root / "fp8")
    chat_tokenizer().save_pretrained(model)
    return model


def test_inspection_recognizes_fp8_targets_with_their_scales_beside_bf16_ones(glm_fp8):
    layout = inspect_checkpoint(glm_fp8)
    o_proj = layout.target("model.layers.0.self_attn.o_proj.weight")
    assert o_proj.dtype == "F8_E4M3" and o_proj.quant == {
        "format": "fp8",
        "stored": [o_proj.key, o_proj.key + "_scale_inv"],
        "block_size": [16, 16],
    }
    router = layout.target("model.layers.1.mlp.gate.weight")
    assert router.dtype == "BF16" and router.quant is None  # a mixed checkpoint
    assert len(layout.targets(component="expert_down")) == 2 * 8
    assert all(t.quant for t in layout.targets(component="expert_down"))
    assert Layout.from_dict(json.loads(layout.to_json())) == layout


def test_fp8_export_edits_targets_and_scales_and_leaves_the_rest_bit_identical(glm_fp8, tmp_path):
    layout = inspect_checkpoint(glm_fp8)
    recipe = {
        "ablate": [{"layer": 0, "measurement": 1}, {"layer": 1, "measurement": 2}],
        "ablate_individual_experts": True,
    }
    plan = resolve(recipe, layout, fake_measurements(3, 32))
    plan.model_dir = str(glm_fp8)
    output = export_model(plan, tmp_path / "out", jobs=2)
    source, exported = load_all(glm_fp8), load_all(output)
    assert exported.keys() == source.keys()
    edited = {e.key for e in plan.entries}
    rewritten = edited | {quant.fp8_scale_key(k) for k in edited if source[k].dtype == FP8_DTYPE}
    assert "model.layers.1.mlp.gate.weight" in edited and len(rewritten) > len(edited)
    for key, tensor in exported.items():
        assert tensor.dtype == source[key].dtype and tensor.shape == source[key].shape, key
        if key not in rewritten:
            assert torch.equal(tensor.view(torch.uint8), source[key].view(torch.uint8)), key
    for entry in plan.entries:
        key, axis = entry.key, entry.hidden_axis
        if source[key].dtype != FP8_DTYPE:  # the bf16 router: the plain shared edit
            expected = ablate_tensor(source[key], entry.direction, entry.scale, hidden_axis=axis)
            assert torch.equal(exported[key], expected), key
            continue
        scale = quant.fp8_scale_key(key)
        assert not torch.equal(exported[scale], source[scale]), key  # fresh block scales
        before = quant.dequantize_fp8_blocks(source[key], source[scale], FIXTURE_BLOCK)
        after = quant.dequantize_fp8_blocks(exported[key], exported[scale], FIXTURE_BLOCK)
        r = entry.direction / entry.direction.norm()
        residual = torch.tensordot(after, r, dims=([axis], [0])).norm()
        assert residual < 0.5 * torch.tensordot(before, r, dims=([axis], [0])).norm(), key
        exact = ablate_tensor(before, entry.direction, entry.scale, hidden_axis=axis)
        assert (after - exact).norm() < 0.05 * exact.norm(), key
    report = verify(glm_fp8, output, plan)
    assert report["ok"], report["failures"]
    assert report["edited"] == len(edited)
    assert report["untouched"] + report["untouched_linked"] == len(source) - len(rewritten)
    # transformers loads the result the way it loads the source (dequantized to bf16 on CPU)
    model = AutoModelForCausalLM.from_pretrained(output, dtype="auto")
    key = "model.layers.0.self_attn.o_proj.weight"
    expected = quant.dequantize_fp8_blocks(exported[key], exported[key + "_scale_inv"], (16, 16))
    assert torch.equal(model.state_dict()[key], expected.to(torch.bfloat16))


def test_measurement_runs_on_an_fp8_checkpoint(glm_fp8):
    """transformers dequantizes FP8 to bf16 where it has no FP8 kernels (this CPU)."""
    model, tokenizer, info = load_model(glm_fp8, CPU)
    key = "model.layers.1.mlp.shared_experts.down_proj.weight"
    stored = load_all(glm_fp8)
    values = quant.dequantize_fp8_blocks(stored[key], stored[key + "_scale_inv"], FIXTURE_BLOCK)
    assert torch.equal(model.state_dict()[key], values.to(torch.bfloat16))
    meas = measure(model, tokenizer, ["w10 w11", "w12"], ["w20 w21", "w22"], QUIET)
    assert meas.target_mean.shape == (4, 32) and torch.isfinite(meas.target_mean).all()


def test_corrupt_scale_in_a_checkpoint_is_named_at_inspection(glm_fp8, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(glm_fp8, broken)
    key = "model.layers.1.mlp.experts.3.down_proj.weight"
    shard = json.loads((broken / INDEX).read_text())["weight_map"][key]
    tensors = load_file(broken / shard)
    tensors[key + "_scale_inv"] = torch.ones(2, 2)  # [32, 16] in 16 x 16 blocks needs [2, 1]
    save_file(tensors, broken / shard, metadata={"format": "pt"})
    with pytest.raises(AbliterateError) as caught:
        inspect_checkpoint(broken)
    assert f"'{key}_scale_inv' has shape [2, 2]" in str(caught.value)
    assert "needs [2, 1] blocks" in str(caught.value)


def test_pre_quantized_bitsandbytes_measures_but_does_not_export(tmp_path):
    pytest.importorskip("bitsandbytes")
    path = build_tiny(
        tmp_path / "llama64", "llama", hidden_size=64, intermediate_size=128, num_key_value_heads=4
    )
    chat_tokenizer().save_pretrained(path)
    model, tokenizer, _ = load_model(path, LoadOptions(device="cpu", load_in_4bit=True))
    model.save_pretrained(tmp_path / "bnb")
    tokenizer.save_pretrained(tmp_path / "bnb")
    model, tokenizer, info = load_model(tmp_path / "bnb", CPU)  # no flags: as shipped
    meas = measure(model, tokenizer, ["w10 w11", "w12"], ["w20 w21", "w22"], QUIET)
    assert meas.meta["quantization"] == "4bit" and torch.isfinite(meas.target_mean).all()
    with pytest.raises(AbliterateError, match="export needs full-precision weights"):
        inspect_checkpoint(tmp_path / "bnb")
    layout = inspect_checkpoint(path)
    plan = resolve({"ablate": [{"layer": 0, "measurement": 1}]}, layout, meas)
    with pytest.raises(AbliterateError) as caught:
        export_model(plan, tmp_path / "out", model_dir=tmp_path / "bnb")
    assert "pre-quantized (bitsandbytes 4-bit)" in str(caught.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def to_mxfp4_checkpoint(source: Path, output: Path) -> Path:
    """The original gpt-oss layout from a tiny bf16 checkpoint: fused expert tensors as
    `_blocks` [E, out, in / 32, 16] + `_scales` [E, out, in / 32], the rest bf16."""
    output.mkdir(parents=True)
    tensors = {}
    for key, value in load_file(source / "model.safetensors").items():
        if key.endswith(("experts.down_proj", "experts.gate_up_proj")):
            blocks_key, scales_key = quant.mxfp4_keys(key)
            tensors[blocks_key], tensors[scales_key] = quant.mxfp4_from_parameter(value)
        else:
            tensors[key] = value
    save_file(tensors, output / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router"],
    }
    (output / "config.json").write_text(json.dumps(config))
    return output


@pytest.mark.parametrize("output", quant.MXFP4_OUTPUTS)
def test_mxfp4_experts_edited_in_either_format_load_in_transformers(tmp_path, output):
    """Layer 0's fused experts edited (down_proj writes along its last axis, gate_up_proj
    reads along axis 1); layer 1 stays MXFP4, so a bf16 result mixes both storages."""
    bf16 = build_tiny(
        tmp_path / "bf16",
        "gpt_oss",
        dtype=torch.bfloat16,
        max_shard_size=None,
        intermediate_size=64,
    )
    source_dir = to_mxfp4_checkpoint(bf16, tmp_path / "mxfp4")
    source = load_file(source_dir / "model.safetensors")
    headers = read_checkpoint(source_dir)
    config = json.loads((source_dir / "config.json").read_text())
    found = quant.quantized_tensors(headers, quant.checkpoint_quantization(config, headers))
    r = unit(32, seed=7)
    axes = {"model.layers.0.mlp.experts.down_proj": 2, "model.layers.0.mlp.experts.gate_up_proj": 1}
    assert set(axes) < set(found) and found[next(iter(axes))].shape == (4, 64, 32)
    tensors = dict(source)
    for key, axis in axes.items():
        blocks, scales = (tensors.pop(name) for name in quant.mxfp4_keys(key))
        result = quant.edit_mxfp4(
            blocks, scales, lambda w, a=axis: ablate_tensor(w, r, 1.0, hidden_axis=a), output=output
        )
        if output == "bf16":
            tensors[key] = result
        else:
            tensors.update(zip(quant.mxfp4_keys(key), result, strict=True))
    edited_dir = tmp_path / "edited"
    edited_dir.mkdir()
    save_file(tensors, edited_dir / "model.safetensors", metadata={"format": "pt"})
    if output == "bf16":
        config = quant.mxfp4_bf16_config(config, ["model.layers.0.mlp.experts"])
    (edited_dir / "config.json").write_text(json.dumps(config))

    original = AutoModelForCausalLM.from_pretrained(source_dir, dtype="auto").state_dict()
    loaded = AutoModelForCausalLM.from_pretrained(edited_dir, dtype="auto").state_dict()
    bound = 0.02 if output == "bf16" else 0.6  # 4-bit requantization leaves part of r^T W
    for key, axis in axes.items():
        before, after = original[key].float(), loaded[key].float()
        assert after.shape == before.shape
        assert (
            torch.tensordot(after, r, dims=([axis], [0])).norm()
            < bound * torch.tensordot(before, r, dims=([axis], [0])).norm()
        ), key
        norms = after.norm(dim=axis) / before.norm(dim=axis)  # norm-preserving, per vector
        assert ((norms - 1).abs() < (0.02 if output == "bf16" else 0.15)).all(), key
    untouched = "model.layers.1.mlp.experts.down_proj"
    assert torch.equal(loaded[untouched], original[untouched])


def test_evaluation_loads_fp8_and_mxfp4_checkpoints_dequantized(glm_fp8, tmp_path):
    """The in-memory evaluator edits parameters, so it asks transformers for real values
    on every machine (a CPU would dequantize anyway; an FP8-capable GPU would not)."""
    config = quant.dequantizing_load_kwargs(glm_fp8)["quantization_config"]
    assert type(config).__name__ == "FineGrainedFP8Config" and config.dequantize
    assert quant.dequantizing_load_kwargs(build_tiny(tmp_path / "plain", "llama")) == {}
    model, _, info = load_model(glm_fp8, CPU)  # measurement and evaluation load through it
    weight = model.model.layers[0].self_attn.o_proj.weight
    assert (
        weight.dtype == torch.bfloat16
        and type(model.model.layers[0].self_attn.o_proj) is torch.nn.Linear
    )
    # nothing quantized is left, so the evaluator edits variants (it refuses 4/8-bit models)
    assert info["quantization"] is None and quantization_of(model) is None


def test_in_memory_edit_of_an_fp8_checkpoint_is_within_fp8_precision_of_the_export(
    glm_fp8, tmp_path
):
    """The sweep scores the bf16 edit of the dequantized weights; loading the FP8 export
    gives that edit requantized: the same tensors changed, each within FP8 precision."""
    layout = inspect_checkpoint(glm_fp8)
    recipe = {"ablate": [{"layer": 0, "measurement": 1}, {"layer": 1, "measurement": 2}]}
    plan = resolve(recipe, layout, fake_measurements(3, 32))
    plan.model_dir = str(glm_fp8)
    exported = load_model(export_model(plan, tmp_path / "out"), CPU)[0].state_dict()
    model = load_model(glm_fp8, CPU)[0]
    base = {k: v.clone() for k, v in model.state_dict().items()}
    with InMemoryEditor(model, glm_fp8).applied(plan):  # checks FP8 parameters against disk
        edited = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())  # restored
    changed = {k for k in base if not torch.equal(edited[k], base[k])}
    assert changed == {k for k in base if not torch.equal(exported[k], base[k])}
    o_proj = next(e for e in plan.entries if e.key == "model.layers.0.self_attn.o_proj.weight")
    bf16_edit = ablate_tensor(
        base[o_proj.key], o_proj.direction, o_proj.scale, hidden_axis=o_proj.hidden_axis
    )
    assert o_proj.dtype == "F8_E4M3" and torch.equal(edited[o_proj.key], bf16_edit)
    for key in changed:
        difference = (edited[key].float() - exported[key].float()).norm()
        assert difference < 0.05 * edited[key].float().norm(), key
