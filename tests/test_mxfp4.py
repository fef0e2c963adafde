"""MXFP4 (gpt-oss original) checkpoints end to end: inspect, plan, export in both output
formats through the CLI, verify, load in transformers; a checkpoint mixing MXFP4 and bf16
experts; a corrupt scale tensor named by its key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_prompts import chat_tokenizer
from test_quant import fake_measurements
from tiny_models import build_tiny
from transformers import AutoModelForCausalLM

from abliterate import quant
from abliterate.cli import main
from abliterate.errors import AbliterateError
from abliterate.export import plan_shards
from abliterate.layout import inspect_checkpoint
from abliterate.measure import save_measurements
from abliterate.recipe import build_plan, resolve
from abliterate.shards import read_checkpoint
from abliterate.verify import verify

INDEX = "model.safetensors.index.json"
LAYER0 = "model.layers.0.mlp.experts"
BF16_MODULE = "model.layers.2.mlp.experts"  # stored unquantized in the mixed source


def to_mixed_mxfp4(source: Path, output: Path) -> Path:
    """The original gpt-oss layout from a tiny sharded bf16 checkpoint, shard by shard:
    fused experts as `_blocks` [E, out, in / 32, 16] + `_scales` [E, out, in / 32] beside
    each other, except layer 2's, which stay bf16 and are listed in
    `modules_to_not_convert` (a checkpoint mixing quantized and unquantized experts)."""
    output.mkdir(parents=True)
    index = json.loads((source / INDEX).read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = {}
        for key, value in load_file(source / shard).items():
            quantize = key.endswith(("experts.down_proj", "experts.gate_up_proj"))
            if quantize and not key.startswith(BF16_MODULE):
                blocks_key, scales_key = quant.mxfp4_keys(key)
                tensors[blocks_key], tensors[scales_key] = quant.mxfp4_from_parameter(value)
            else:
                tensors[key] = value
        save_file(tensors, output / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
    index["weight_map"] = weight_map
    (output / INDEX).write_text(json.dumps(index))
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            BF16_MODULE,
        ],
    }
    (output / "config.json").write_text(json.dumps(config))
    return output


@pytest.fixture(scope="module")
def gpt_oss_mxfp4(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt-oss-mxfp4")
    bf16 = build_tiny(
        root / "bf16", "gpt_oss", dtype=torch.bfloat16, max_shard_size="40KB", intermediate_size=64
    )
    model = to_mixed_mxfp4(bf16, root / "mxfp4")
    chat_tokenizer().save_pretrained(model)
    measurements = save_measurements(fake_measurements(3, 32), root / "m.safetensors")
    return model, measurements


RECIPE = {
    "components": ["attn_out", "router", "expert_down"],
    "ablate_individual_experts": True,
    "biases": True,
    "ablate": [{"layer": 0, "measurement": 1}, {"layer": 2, "measurement": 2}],
}


def write_recipe(model: Path, measurements: Path, output: Path, path: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                **RECIPE,
                "model": str(model),
                "measurements": str(measurements),
                "output": str(output),
            }
        )
    )
    return path


def stored(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def test_inspection_names_mxfp4_experts_by_their_parameters_beside_bf16_ones(gpt_oss_mxfp4):
    model, _ = gpt_oss_mxfp4
    layout = inspect_checkpoint(model)
    down = layout.target(f"{LAYER0}.down_proj")
    assert (down.dtype, down.shape, down.hidden_axis) == ("BF16", (4, 64, 32), 2)
    assert down.quant == {
        "format": "mxfp4",
        "stored": [f"{LAYER0}.down_proj_blocks", f"{LAYER0}.down_proj_scales"],
        "block_size": None,
    }
    assert down.bias == f"{LAYER0}.down_proj_bias"
    assert read_checkpoint(model)[down.key + "_blocks"].shard == down.shard
    gate_up = layout.target(f"{LAYER0}.gate_up_proj")
    assert gate_up.shape == (4, 32, 128) and gate_up.quant["format"] == "mxfp4"
    plain = layout.target(f"{BF16_MODULE}.down_proj")  # the mixed checkpoint's bf16 experts
    assert plain.dtype == "BF16" and plain.quant is None
    assert layout.num_experts == 4 and len(layout.targets(component="expert_down")) == 3


@pytest.mark.parametrize("output", quant.MXFP4_OUTPUTS)
def test_mxfp4_export_via_the_cli_loads_in_transformers_and_meets_the_invariants(
    gpt_oss_mxfp4, tmp_path, output
):
    """`abliterate ablate --mxfp4 bf16|requantize` on the mixed checkpoint: it verifies
    (recomputed bit for bit, untouched tensors bit-identical, transformers loads and
    generates), and the edited experts, dequantized, have lost the direction."""
    model, measurements = gpt_oss_mxfp4
    out = tmp_path / "out"
    recipe = write_recipe(model, measurements, out, tmp_path / "recipe.yml")
    assert main(["ablate", str(recipe), "--mxfp4", output, "-j", "2"]) == 0
    report = json.loads((tmp_path / "out.verify.json").read_text())
    assert report["ok"], report["failures"]
    assert report["mxfp4"]["output"] == output
    plan = build_plan(recipe)
    edited = {e.key for e in plan.entries} | {e.bias for e in plan.entries if e.bias}
    source, exported = stored(model), stored(out)
    down = f"{LAYER0}.down_proj"
    if output == "bf16":
        # the edited module is bf16 as a whole (gate_up_proj dequantized, unedited)
        assert exported[down].dtype == torch.bfloat16 and exported[down].shape == (4, 64, 32)
        assert not any(name.startswith(LAYER0 + ".") and "_blocks" in name for name in exported)
        gate_up = quant.mxfp4_parameter(
            *(source[n] for n in quant.mxfp4_keys(f"{LAYER0}.gate_up_proj"))
        )
        assert torch.equal(exported[f"{LAYER0}.gate_up_proj"], gate_up.to(torch.bfloat16))
        config = json.loads((out / "config.json").read_text())["quantization_config"]
        assert LAYER0 in config["modules_to_not_convert"] and config["quant_method"] == "mxfp4"
        weight_map = json.loads((out / INDEX).read_text())["weight_map"]
        assert weight_map.keys() == exported.keys() and down + "_blocks" not in weight_map
        assert report["mxfp4"]["rewritten"] == 2 and report["mxfp4_dequantized"] == 1
    else:
        # same bytes and layout as the source: only the edited pair's values changed
        assert exported.keys() == source.keys()
        for path in model.glob("*.safetensors"):
            assert (out / path.name).stat().st_size == path.stat().st_size
        assert not torch.equal(exported[down + "_blocks"], source[down + "_blocks"])
        assert report["mxfp4"]["rewritten"] == 1 and report["mxfp4_dequantized"] == 0
        assert 0 < report["mxfp4"]["requantized_max_residual"] < 1
    rewritten = {n for k in report_keys(plan) for n in quant.mxfp4_keys(k)}
    for name, tensor in exported.items():  # everything else: the source's bytes
        if name in source and name not in edited and name not in rewritten:
            assert torch.equal(tensor.view(torch.uint8), source[name].view(torch.uint8)), name

    original = AutoModelForCausalLM.from_pretrained(model, dtype="auto").state_dict()
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto").state_dict()
    bound, drift = (0.02, 0.02) if output == "bf16" else (0.6, 0.15)
    for entry in plan.entries:
        if not entry.key.endswith("experts.down_proj"):
            continue
        r, axis = (entry.direction / entry.direction.norm()).float(), entry.hidden_axis
        before, after = original[entry.key].float(), loaded[entry.key].float()
        mixed = entry.key.startswith(BF16_MODULE)  # a plain bf16 edit, whatever the format
        assert (
            torch.tensordot(after, r, dims=([axis], [0])).norm()
            < (0.02 if mixed else bound) * torch.tensordot(before, r, dims=([axis], [0])).norm()
        ), entry.key
        norms = after.norm(dim=axis) / before.norm(dim=axis)  # norm-preserving per vector
        assert ((norms - 1).abs() < (0.02 if mixed else drift)).all(), entry.key
    untouched = "model.layers.1.mlp.experts.down_proj"
    assert torch.equal(loaded[untouched], original[untouched])


def report_keys(plan) -> list[str]:
    return [e.key for e in plan.entries if e.key.endswith(("experts.down_proj", "gate_up_proj"))]


def test_cli_inspect_plan_ablate_verify_and_verify_catches_a_changed_expert(
    gpt_oss_mxfp4, tmp_path
):
    """The default output (bf16) through `inspect --json`, `plan --save`, `ablate --layout`
    and `verify --plan`; one flipped byte in an exported expert, or a config.json that no
    longer lists the converted module, fails verification naming it."""
    model, measurements = gpt_oss_mxfp4
    out = tmp_path / "out"
    recipe = write_recipe(model, measurements, out, tmp_path / "recipe.yml")
    layout, plan = tmp_path / "layout.json", tmp_path / "plan.json"
    assert main(["inspect", str(model), "--json", str(layout)]) == 0
    assert main(["plan", str(recipe), "--layout", str(layout), "--save", str(plan)]) == 0
    assert main(["ablate", str(recipe), "--layout", str(layout), "--no-verify"]) == 0
    assert json.loads((out / "manifest.json").read_text())["mxfp4_output"] == "bf16"
    command = [
        "verify",
        str(model),
        str(out),
        "--plan",
        str(plan),
        "--json",
        str(tmp_path / "v.json"),
    ]
    assert main(command) == 0

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    key = f"{LAYER0}.down_proj"
    info = read_checkpoint(broken)[key]
    with open(broken / info.shard, "r+b") as handle:
        handle.seek(info.begin + 2 * 64 * 32 + 7)  # expert 1
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x40]))
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"]["modules_to_not_convert"].remove(LAYER0)
    (broken / "config.json").write_text(json.dumps(config))
    report = verify(model, broken, build_plan(recipe), generate=False)
    assert not report["ok"]
    assert any(f.startswith(f"{key}: differs from the plan's edit") for f in report["failures"])
    assert any("quantization_config does not match" in f for f in report["failures"])


def test_corrupt_mxfp4_scale_block_count_is_named_at_inspection_and_planning(
    gpt_oss_mxfp4, tmp_path
):
    model, measurements = gpt_oss_mxfp4
    plan = resolve(RECIPE, inspect_checkpoint(model), fake_measurements(3, 32))
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    key = f"{LAYER0}.down_proj_scales"  # blocks [4, 32, 2, 16]: two groups of 32 per row
    shard = json.loads((broken / INDEX).read_text())["weight_map"][key]
    tensors = load_file(broken / shard)
    tensors[key] = tensors[key][..., :1].contiguous()
    save_file(tensors, broken / shard, metadata={"format": "pt"})
    expected = f"MXFP4 scale tensor '{key}' has shape [4, 32, 1]"
    with pytest.raises(AbliterateError, match="needs \\[4, 32, 2\\]") as caught:
        inspect_checkpoint(broken)
    assert str(caught.value).startswith(expected) and str(caught.value).count(";") == 1
    with pytest.raises(AbliterateError, match=expected.replace("[", "\\[")):
        plan_shards(plan, broken)  # a plan made from the intact copy


def test_in_memory_edit_of_an_mxfp4_checkpoint_equals_loading_its_bf16_export(
    gpt_oss_mxfp4, tmp_path
):
    """The sweep edits the dequantized model in memory (checking its MXFP4 parameters
    against the file's blocks and scales first); loading the bf16 export gives the same
    parameters, so the sweep scores what the default export holds."""
    from abliterate.evaluate import InMemoryEditor
    from abliterate.export import export_model
    from abliterate.model import LoadOptions, load_model

    model_dir, _ = gpt_oss_mxfp4
    plan = resolve(RECIPE, inspect_checkpoint(model_dir), fake_measurements(3, 32))
    plan.model_dir = str(model_dir)
    cpu = LoadOptions(device="cpu")
    exported = load_model(export_model(plan, tmp_path / "out"), cpu)[0].state_dict()
    model = load_model(model_dir, cpu)[0]
    base = {k: v.clone() for k, v in model.state_dict().items()}
    with InMemoryEditor(model, model_dir).applied(plan):
        edited = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())  # restored
    key = f"{LAYER0}.down_proj"
    assert not torch.equal(edited[key], base[key])
    for name, value in edited.items():
        assert torch.equal(value, exported[name]), name


@pytest.mark.parametrize("output", quant.MXFP4_OUTPUTS)
def test_experts_outside_the_subset_keep_their_values(gpt_oss_mxfp4, tmp_path, output):
    """`expert_subset` edits some experts' slices of a fused MXFP4 tensor: the others keep
    their stored bytes (requantize) or their exact dequantized values (bf16)."""
    from abliterate.export import export_model

    model_dir, _ = gpt_oss_mxfp4
    recipe = {**RECIPE, "expert_subset": [1, 3]}
    plan = resolve(recipe, inspect_checkpoint(model_dir), fake_measurements(3, 32))
    plan.model_dir = str(model_dir)
    out = export_model(plan, tmp_path / "out", mxfp4=output)
    assert verify(model_dir, out, plan)["ok"]
    source, exported = stored(model_dir), stored(out)
    key = f"{LAYER0}.down_proj"
    blocks, scales = quant.mxfp4_keys(key)
    values = quant.mxfp4_parameter(source[blocks], source[scales])
    for expert in range(4):
        if output == "requantize":
            same = torch.equal(exported[blocks][expert], source[blocks][expert]) and torch.equal(
                exported[scales][expert], source[scales][expert]
            )
        else:
            same = torch.equal(exported[key][expert], values[expert].to(torch.bfloat16))
        assert same == (expert not in (1, 3)), expert


@pytest.mark.slow
def test_workflow_exports_an_mxfp4_checkpoint_in_the_configured_format(gpt_oss_mxfp4, tmp_path):
    """`export.mxfp4` reaches plan_shards, the shard jobs and assemble: the workflow's
    export of the MXFP4 source verifies, in the non-default format it was asked for."""
    from snakemake_runner import snakemake

    model, _ = gpt_oss_mxfp4
    prompts = {}
    for cls, first in (("target", 10), ("benign", 30)):
        for split in ("train", "test"):
            path = tmp_path / f"{cls}_{split}.txt"
            path.write_text("\n".join(f"w{first + i} w{first + i + 1}" for i in range(6)) + "\n")
            prompts.setdefault(cls, {})[split] = str(path)
    config = {
        "model": {"name": "oss", "path": str(model)},
        "prompts": prompts,
        "measure": {"device": "cpu"},
        # one target (one shard job): each job is a Python start, the cost of this test
        "recipe": {
            "components": ["expert_down"],
            "ablate_individual_experts": True,
            "ablate": [{"layer": 0, "measurement": 1}],
        },
        "export": {"device": "cpu", "mem_mb": 1024, "mxfp4": "requantize"},
    }
    result = snakemake(tmp_path, "--cores", "2", "results/oss/verify.json", config=config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    results = tmp_path / "results" / "oss"
    report = json.loads((results / "verify.json").read_text())
    assert report["ok"] and report["mxfp4"]["output"] == "requantize", report["failures"]
    manifest = json.loads((results / "abliterated" / "manifest.json").read_text())
    assert manifest["mxfp4_output"] == "requantize"
    shards = json.loads((results / "export" / "shards.json").read_text())
    assert shards["mxfp4"] == {"output": "requantize", "rewritten": [f"{LAYER0}.down_proj"]}


def test_bf16_export_of_every_mxfp4_module_drops_the_quantization_config(gpt_oss_mxfp4, tmp_path):
    """Nothing MXFP4 left: config.json loses `quantization_config`, and transformers loads
    the export as the plain bf16 model it now is (no dequantizing on load)."""
    from abliterate.export import export_model

    model_dir, _ = gpt_oss_mxfp4
    recipe = {**RECIPE, "ablate": [{"layer": 0, "measurement": 1}, {"layer": 1, "measurement": 2}]}
    plan = resolve(recipe, inspect_checkpoint(model_dir), fake_measurements(3, 32))
    plan.model_dir = str(model_dir)
    out = export_model(plan, tmp_path / "out")
    report = verify(model_dir, out, plan, generate=False)
    assert report["ok"], report["failures"]
    assert report["mxfp4"]["rewritten"] == 4 and report["mxfp4_dequantized"] == 2
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert not [name for name in read_checkpoint(out) if name.endswith(("_blocks", "_scales"))]
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert getattr(loaded.config, "quantization_config", None) is None
    assert loaded.state_dict()[f"{LAYER0}.down_proj"].dtype == torch.bfloat16
