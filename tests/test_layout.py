"""Checkpoint inspection: every registered architecture, real on-disk names, bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch
from fixtures.header_only import GLM45_AIR_CONFIG, write_glm45_air, write_header_only_checkpoint
from safetensors.torch import load_file, save_file
from tiny_models import TINY_CONFIGS, build_tiny

from abliterate.cli import main
from abliterate.errors import AbliterateError
from abliterate.layout import ARCHITECTURES, Layout, inspect_checkpoint

DENSE = {"attn_out": 1, "mlp_down": 1}
# tiny_models: 3 layers, 8 routed experts (mixtral, gpt-oss: 4)
ROUTED = {"attn_out": 1, "router": 1, "expert_down": 8, "expert_gate": 8, "expert_up": 8}
SHARED = {**ROUTED, "shared_down": 1}
MIXTRAL = {"attn_out": 1, "router": 1, "expert_down": 4, "expert_gate": 4, "expert_up": 4}
GPT_OSS = {"attn_out": 1, "router": 1, "expert_down": 1, "expert_gate_up": 1}

# model_type -> (family, per-layer component counts, routed experts, shared experts)
EXPECTED = {
    "llama": ("llama", [DENSE] * 3, 0, 0),
    "mistral": ("llama", [DENSE] * 3, 0, 0),
    "qwen2": ("llama", [DENSE] * 3, 0, 0),
    "qwen3": ("llama", [DENSE] * 3, 0, 0),
    "gemma2": ("llama", [DENSE] * 3, 0, 0),
    "gemma3_text": ("llama", [DENSE] * 3, 0, 0),
    "glm4": ("llama", [DENSE] * 3, 0, 0),
    "glm4_moe": ("glm4_moe", [DENSE, SHARED, SHARED], 8, 1),
    "deepseek_v3": ("glm4_moe", [DENSE, SHARED, SHARED], 8, 1),
    "qwen2_moe": ("qwen2_moe", [SHARED] * 3, 8, 1),
    "qwen3_moe": ("qwen3_moe", [ROUTED] * 3, 8, 0),
    "olmoe": ("qwen3_moe", [ROUTED] * 3, 8, 0),
    "mixtral": ("mixtral", [MIXTRAL] * 3, 4, 0),
    "gpt_oss": ("gpt_oss", [GPT_OSS] * 3, 4, 0),
}


def cli(capsys, *argv):
    """Run `abliterate ...`; return (exit code, stdout, stderr)."""
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_every_registered_architecture_has_a_tiny_model():
    assert set(EXPECTED) == set(TINY_CONFIGS)
    assert set(EXPECTED) <= set(ARCHITECTURES)


@pytest.mark.parametrize("model_type", sorted(EXPECTED))
def test_inspect_finds_every_target_of_each_architecture(tmp_path, model_type):
    family, per_layer, experts, shared = EXPECTED[model_type]
    layout = inspect_checkpoint(build_tiny(tmp_path / model_type, model_type))

    assert layout.family == family
    assert (layout.layer_prefix, layout.num_layers, layout.hidden_size) == ("model", 3, 32)
    assert layout.vocab_size == 64
    assert [layout.component_counts(i) for i in range(3)] == per_layer
    assert layout.is_moe == bool(experts)
    assert (layout.num_experts, layout.num_shared_experts) == (experts, shared)
    assert layout.experts_per_token == (2 if experts else 0)
    assert [t.key for t in layout.globals] == ["model.embed_tokens.weight"]
    # every target's hidden axis has the hidden size, readers and writers alike
    for target in layout.targets():
        assert target.shape[target.hidden_axis] == 32, target
        assert target.side == ("read" if target.component in ROUTED_READERS else "write")
    # the shard named for each target really holds it
    for target in layout.targets(layer=1):
        header_keys = _shard_keys(layout.model_dir, target.shard)
        assert target.key in header_keys


ROUTED_READERS = {"router", "expert_gate", "expert_up", "expert_gate_up"}


def _shard_keys(model_dir, shard):
    with open(os.path.join(model_dir, shard), "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return set(json.loads(handle.read(size)))


def test_moe_layers_and_router_keys_of_glm4_moe(tiny_glm4_moe):
    layout = inspect_checkpoint(tiny_glm4_moe)
    assert layout.moe_layers == (1, 2) and layout.dense_layers == (0,)
    (router,) = layout.targets(layer=2, component="router")
    assert router.key == "model.layers.2.mlp.gate.weight"
    assert (router.shape, router.hidden_axis, router.side) == ((8, 32), 1, "read")
    down = layout.targets(layer=1, component="expert_down", expert=7)
    assert [t.key for t in down] == ["model.layers.1.mlp.experts.7.down_proj.weight"]
    assert (down[0].hidden_axis, down[0].fused, down[0].shape) == (0, False, (32, 16))
    (shared,) = layout.targets(layer=1, component="shared_down")
    assert shared.key == "model.layers.1.mlp.shared_experts.down_proj.weight"


def test_mixtral_uses_block_sparse_moe_names(tmp_path):
    layout = inspect_checkpoint(build_tiny(tmp_path / "m", "mixtral"))
    (router,) = layout.targets(layer=0, component="router")
    assert router.key == "model.layers.0.block_sparse_moe.gate.weight"
    by_component = {t.component: t for t in layout.targets(layer=0, expert=3)}
    assert by_component["expert_down"].key == "model.layers.0.block_sparse_moe.experts.3.w2.weight"
    assert by_component["expert_gate"].key == "model.layers.0.block_sparse_moe.experts.3.w1.weight"
    assert by_component["expert_up"].key == "model.layers.0.block_sparse_moe.experts.3.w3.weight"
    assert [by_component[c].hidden_axis for c in ("expert_down", "expert_gate")] == [0, 1]


@pytest.mark.parametrize("intermediate", [48, 32])  # 32: hidden == intermediate
def test_gpt_oss_fused_orientation_comes_from_the_registry(tmp_path, intermediate):
    model = build_tiny(tmp_path / "g", "gpt_oss", intermediate_size=intermediate)
    layout = inspect_checkpoint(model)
    (down,) = layout.targets(layer=1, component="expert_down")
    assert down.key == "model.layers.1.mlp.experts.down_proj"
    assert (down.shape, down.hidden_axis, down.fused, down.expert) == (
        (4, intermediate, 32),
        2,
        True,
        None,
    )
    assert down.bias == "model.layers.1.mlp.experts.down_proj_bias"
    (gate_up,) = layout.targets(layer=1, component="expert_gate_up")
    assert (gate_up.shape, gate_up.hidden_axis, gate_up.side) == (
        (4, 32, 2 * intermediate),
        1,
        "read",
    )
    (router,) = layout.targets(layer=1, component="router")
    assert router.key == "model.layers.1.mlp.router.weight" and router.bias is None
    (attn,) = layout.targets(layer=1, component="attn_out")
    assert attn.bias == "model.layers.1.self_attn.o_proj.bias"


def test_tied_embeddings_are_reported(tmp_path):
    assert inspect_checkpoint(build_tiny(tmp_path / "g", "gemma2")).tie_word_embeddings
    assert not inspect_checkpoint(build_tiny(tmp_path / "l", "llama")).tie_word_embeddings


def test_single_file_checkpoint(tmp_path):
    model = build_tiny(tmp_path / "single", "qwen3_moe", max_shard_size=None)
    assert (model / "model.safetensors").is_file()
    assert not (model / "model.safetensors.index.json").exists()
    layout = inspect_checkpoint(model)
    assert layout.shards == ("model.safetensors",)
    assert {t.shard for t in layout.targets()} == {"model.safetensors"}
    assert layout.num_experts == 8


def test_layout_json_round_trip_and_accessors(tiny_glm4_moe, tmp_path):
    layout = inspect_checkpoint(tiny_glm4_moe)
    path = layout.save(tmp_path / "out" / "layout.json")
    assert Layout.load(path) == layout
    assert os.listdir(path.parent) == ["layout.json"]  # no temp file left behind
    data = json.loads(path.read_text())
    assert data["layers"][1]["index"] == 1
    assert data["moe_layers"] == [1, 2] and data["num_experts"] == 8
    first = data["layers"][1]["targets"][0]
    assert set(first) == {
        "key", "component", "side", "hidden_axis", "expert", "fused", "shape", "dtype",
        "shard", "bias",
    }  # fmt: skip
    assert len(layout.targets(component="embed")) == 1
    assert len(layout.targets(layer=1)) == 1 + 1 + 1 + 3 * 8
    assert len(layout.targets(component=["expert_down", "router"], layer=[1, 2])) == 18
    assert len(layout.targets(side="read", layer=0)) == 0
    key = "model.layers.2.mlp.experts.5.up_proj.weight"
    assert layout.target(key).component == "expert_up"
    with pytest.raises(AbliterateError, match="unknown component"):
        layout.targets(component="o_proj")
    with pytest.raises(AbliterateError, match="layers 0..2"):
        layout.layer(3)


def test_cli_prints_the_validation_lines_and_writes_json(tiny_glm4_moe, tmp_path, capsys):
    out_json = tmp_path / "layout.json"
    code, out, err = cli(capsys, "inspect", str(tiny_glm4_moe), "--json", str(out_json))
    assert code == 0, err
    log = err.splitlines()
    assert "Detected layer prefix: model" in log
    assert "MoE architecture: True" in log
    assert "Detected 8 experts per layer" in log
    assert "expert_down" in out and "shared_down" in out and "router" in out
    assert Layout.load(out_json).num_experts == 8


def test_cli_on_a_dense_model_says_no_moe(tiny_llama, capsys):
    code, out, err = cli(capsys, "inspect", str(tiny_llama))
    assert code == 0
    assert "MoE architecture: False" in err.splitlines()
    assert "experts per layer" not in err


# ------------------------------------------------------------------ GLM-4.5-Air headers


@pytest.fixture(scope="module")
def glm45_air(tmp_path_factory):
    return write_glm45_air(tmp_path_factory.mktemp("glm45") / "GLM-4.5-Air")


def test_glm45_air_real_layout_from_headers(glm45_air, capsys):
    # the fixture allocates no weights: ~200 GB of tensors in a few MB of disk
    apparent = sum(p.stat().st_size for p in glm45_air.iterdir())
    allocated = sum(p.stat().st_blocks * 512 for p in glm45_air.iterdir())
    assert apparent > 150e9 and allocated < 100e6

    code, out, err = cli(capsys, "inspect", str(glm45_air), "--json", str(glm45_air / "l.json"))
    assert code == 0, err
    log = err.splitlines()
    assert "Detected layer prefix: model" in log
    assert "MoE architecture: True" in log
    assert "Detected 128 experts per layer" in log

    layout = Layout.load(glm45_air / "l.json")
    assert (layout.num_layers, layout.hidden_size, layout.vocab_size) == (46, 4096, 151552)
    assert layout.architecture == "Glm4MoeForCausalLM"
    assert layout.dense_layers == (0,) and layout.moe_layers == tuple(range(1, 46))
    assert (layout.num_experts, layout.num_shared_experts, layout.experts_per_token) == (128, 1, 8)
    assert len(layout.shards) == 47
    assert [e.index for e in layout.layers] == list(range(46))  # MTP layer 46 left out
    assert not any(".layers.46." in t.key for t in layout.targets())
    assert layout.component_counts(0) == {"attn_out": 1, "mlp_down": 1}
    assert layout.component_counts(45) == {
        "attn_out": 1, "shared_down": 1, "router": 1,
        "expert_down": 128, "expert_gate": 128, "expert_up": 128,
    }  # fmt: skip
    expert = layout.target("model.layers.3.mlp.experts.7.down_proj.weight")
    assert (expert.shape, expert.dtype, expert.shard) == (
        (4096, 1408),
        "BF16",
        "model-00004-of-00047.safetensors",
    )
    (attn,) = layout.targets(layer=10, component="attn_out")
    assert attn.shape == (4096, 96 * 128) and attn.bias is None


# ------------------------------------------------------------------ consistency checks


def _edit_config(model, **changes):
    path = model / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.modifies_source  # damages its own fixture model on purpose
def test_hidden_size_mismatch_names_the_tensor(tiny_llama, capsys):
    _edit_config(tiny_llama, hidden_size=40)
    code, _, err = cli(capsys, "inspect", str(tiny_llama))
    assert code == 1
    assert "tensor 'model.layers.0." in err and "hidden_size 40" in err


@pytest.mark.modifies_source  # damages its own fixture model on purpose
def test_expert_count_must_agree_with_config(tiny_glm4_moe, capsys):
    _edit_config(tiny_glm4_moe, n_routed_experts=16)
    code, _, err = cli(capsys, "inspect", str(tiny_glm4_moe))
    assert code == 1
    assert "config.json: n_routed_experts is 16" in err and "8 experts" in err


def _drop_keys(model, fragment):
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if fragment not in k}
    index_path.write_text(json.dumps(index))


@pytest.mark.modifies_source  # damages its own fixture model on purpose
def test_experts_must_be_contiguous(tiny_glm4_moe, capsys):
    _drop_keys(tiny_glm4_moe, "layers.2.mlp.experts.3.")
    code, _, err = cli(capsys, "inspect", str(tiny_glm4_moe))
    assert code == 1 and "layer 2 has experts 0..7 but lacks expert(s) [3]" in err


@pytest.mark.modifies_source  # damages its own fixture model on purpose
def test_every_moe_layer_has_the_same_experts(tiny_glm4_moe, capsys):
    _drop_keys(tiny_glm4_moe, "layers.2.mlp.experts.7.")
    code, _, err = cli(capsys, "inspect", str(tiny_glm4_moe))
    assert code == 1 and "(7 in layers 2; 8 in layers 1)" in err


@pytest.mark.modifies_source  # damages its own fixture model on purpose
def test_layer_count_must_be_on_disk(tiny_llama, capsys):
    _edit_config(tiny_llama, num_hidden_layers=5)
    code, _, err = cli(capsys, "inspect", str(tiny_llama))
    assert code == 1 and "[3, 4]" in err and "num_hidden_layers" in err


@pytest.mark.modifies_source  # damages its own fixture model on purpose
def test_unknown_model_type_falls_back_to_key_patterns(tiny_glm4_moe, capsys):
    _edit_config(tiny_glm4_moe, model_type="my_glm_finetune")
    code, _, err = cli(capsys, "inspect", str(tiny_glm4_moe))
    assert code == 0, err
    assert "'glm4_moe' layout" in err
    assert "Detected 8 experts per layer" in err.splitlines()


def test_language_model_prefix_wins_over_a_bigger_vision_encoder(tiny_llama, tmp_path):
    """Multimodal wrappers keep the language model under another prefix, beside a vision
    encoder whose `...layers.N.` tensors may outnumber it."""
    wrapped = tmp_path / "wrapped"
    wrapped.mkdir()
    tensors = {}
    for shard in sorted(tiny_llama.glob("*.safetensors")):
        tensors.update(load_file(shard))
    tensors = {k.replace("model.", "model.language_model.", 1): v for k, v in tensors.items()}
    for i in range(8):
        for name in ("self_attn.out_proj", "self_attn.q_proj", "mlp.fc1", "mlp.fc2"):
            for kind in ("weight", "bias"):
                key = f"model.vision_tower.encoder.layers.{i}.{name}.{kind}"
                tensors[key] = torch.zeros(4)
    save_file(tensors, wrapped / "model.safetensors")
    config = json.loads((tiny_llama / "config.json").read_text())
    (wrapped / "config.json").write_text(
        json.dumps({"model_type": "gemma3", "text_config": config, "vision_config": {}})
    )
    layout = inspect_checkpoint(wrapped)
    assert layout.layer_prefix == "model.language_model"
    assert layout.targets(component="embed")[0].key == "model.language_model.embed_tokens.weight"
    assert [layout.component_counts(i) for i in range(3)] == [DENSE] * 3


# ------------------------------------------------------------------ bad input through the CLI


def _header_only(tmp_path, tensors, config=None):
    config = config or {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1}
    return write_header_only_checkpoint(tmp_path / "m", config, [tensors])


def test_missing_model_dir(tmp_path, capsys):
    code, _, err = cli(capsys, "inspect", str(tmp_path / "nope"))
    assert code == 1 and "model directory not found" in err


@pytest.mark.modifies_source  # damages its own fixture model on purpose
def test_missing_config(tiny_llama, capsys):
    (tiny_llama / "config.json").unlink()
    code, _, err = cli(capsys, "inspect", str(tiny_llama))
    assert code == 1 and "config.json: not found" in err


@pytest.mark.modifies_source  # damages its own fixture model on purpose
def test_malformed_config(tiny_llama, capsys):
    (tiny_llama / "config.json").write_text("{not json")
    code, _, err = cli(capsys, "inspect", str(tiny_llama))
    assert code == 1 and "config.json: malformed JSON" in err


@pytest.mark.modifies_source  # damages its own fixture model on purpose
@pytest.mark.parametrize(
    "text, message",
    [
        ("[1, 2]", "config.json: expected a JSON object, got list"),
        ('{"model_type": "llama", "num_hidden_layers": 3}', "config.json: no hidden_size"),
        (
            '{"model_type": "llama", "hidden_size": 32, "num_hidden_layers": "3"}',
            "config.json: num_hidden_layers is '3'; expected a non-negative integer",
        ),
    ],
    ids=["not-an-object", "no-hidden-size", "string-layers"],
)
def test_config_without_usable_sizes(tiny_llama, capsys, text, message):
    (tiny_llama / "config.json").write_text(text)
    code, _, err = cli(capsys, "inspect", str(tiny_llama))
    assert code == 1 and message in err


@pytest.mark.modifies_source  # damages its own fixture model on purpose
def test_malformed_index(tiny_llama, capsys):
    (tiny_llama / "model.safetensors.index.json").write_text('{"metadata": {}}')
    code, _, err = cli(capsys, "inspect", str(tiny_llama))
    assert code == 1 and "malformed index" in err and "weight_map" in err


@pytest.mark.modifies_source  # damages its own fixture model on purpose
def test_index_naming_a_missing_shard(tiny_llama, capsys):
    shard = sorted(tiny_llama.glob("model-*.safetensors"))[-1]
    shard.unlink()
    code, _, err = cli(capsys, "inspect", str(tiny_llama))
    assert code == 1 and shard.name in err and "not in" in err


@pytest.mark.modifies_source  # damages its own fixture model on purpose
@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: raw[:5], "expected at least an 8-byte header length"),
        (lambda raw: (10**12).to_bytes(8, "little") + raw[8:], "does not fit"),
        (lambda raw: raw[:8] + b"!" + raw[9:], "expected a JSON object"),
        (lambda raw: raw[: len(raw) // 2], "may be truncated"),
    ],
    ids=["truncated-length", "garbage-length", "bad-json", "truncated-data"],
)
def test_corrupt_safetensors_header(tiny_llama, capsys, damage, message):
    shard = sorted(tiny_llama.glob("model-*.safetensors"))[0]
    shard.write_bytes(damage(shard.read_bytes()))
    code, _, err = cli(capsys, "inspect", str(tiny_llama))
    assert code == 1 and shard.name in err and message in err


def test_nothing_matches_lists_what_was_found(tmp_path, capsys):
    model = _header_only(
        tmp_path,
        [("encoder.block.0.layer.0.weight", "F32", (8, 8)), ("shared.weight", "F32", (4, 8))],
        {"model_type": "t5", "d_model": 8},
    )
    code, _, err = cli(capsys, "inspect", str(model))
    assert code == 1
    assert "Could not detect layer structure" in err
    assert "encoder" in err and "shared" in err


def test_layers_without_known_tensors(tmp_path, capsys):
    model = _header_only(
        tmp_path,
        [("model.layers.0.attn.c_proj.weight", "F32", (8, 8))],
        {"model_type": "mystery", "hidden_size": 8, "num_hidden_layers": 1},
    )
    code, _, err = cli(capsys, "inspect", str(model))
    assert code == 1
    assert "Could not detect layer structure" in err and "attn.c_proj.weight" in err


def test_inspect_never_modifies_the_model(tiny_glm4_moe, capsys):
    before = {p.name: p.read_bytes() for p in tiny_glm4_moe.iterdir()}
    assert cli(capsys, "inspect", str(tiny_glm4_moe))[0] == 0
    assert {p.name: p.read_bytes() for p in tiny_glm4_moe.iterdir()} == before


def test_glm45_air_config_matches_the_published_model():
    """The fixture's numbers are GLM-4.5-Air's; a typo here would hollow out the test."""
    c = GLM45_AIR_CONFIG
    assert (c["num_hidden_layers"], c["hidden_size"], c["n_routed_experts"]) == (46, 4096, 128)
    assert (c["moe_intermediate_size"], c["intermediate_size"], c["vocab_size"]) == (
        1408,
        10944,
        151552,
    )


def test_gpt_oss_mxfp4_experts_are_targets_under_their_parameter_names(tmp_path, capsys):
    """The original gpt-oss release stores experts as MXFP4 blocks + scales (uint8); they
    are targets under transformers' parameter names and shapes, their storage recorded."""
    h, experts, layers = 2880, 32, 2
    config = {
        "model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "hidden_size": h,
        "intermediate_size": h, "num_local_experts": experts, "experts_per_token": 4,
        "num_hidden_layers": layers, "vocab_size": 201088,
        "quantization_config": {"quant_method": "mxfp4"},
    }  # fmt: skip
    shards = [[("model.embed_tokens.weight", "BF16", (201088, h))]]
    for i in range(layers):
        p = f"model.layers.{i}"
        shards.append(
            [
                (f"{p}.self_attn.o_proj.weight", "BF16", (h, 4096)),
                (f"{p}.self_attn.o_proj.bias", "BF16", (h,)),
                (f"{p}.mlp.router.weight", "BF16", (experts, h)),
                (f"{p}.mlp.router.bias", "BF16", (experts,)),
                (f"{p}.mlp.experts.down_proj_blocks", "U8", (experts, h, 90, 16)),
                (f"{p}.mlp.experts.down_proj_scales", "U8", (experts, h, 90)),
                (f"{p}.mlp.experts.down_proj_bias", "BF16", (experts, h)),
                (f"{p}.mlp.experts.gate_up_proj_blocks", "U8", (experts, 2 * h, 90, 16)),
                (f"{p}.mlp.experts.gate_up_proj_scales", "U8", (experts, 2 * h, 90)),
            ]
        )
    model = write_header_only_checkpoint(tmp_path / "gpt-oss-20b", config, shards)
    code, _, err = cli(capsys, "inspect", str(model), "--json", str(tmp_path / "l.json"))
    assert code == 0, err
    assert "Detected 32 experts per layer" in err.splitlines()
    assert "stored quantized" not in err
    layout = Layout.load(tmp_path / "l.json")
    assert layout.component_counts(1) == {
        "attn_out": 1, "router": 1, "expert_down": 1, "expert_gate_up": 1,
    }  # fmt: skip
    assert layout.experts_per_token == 4
    down = layout.target("model.layers.1.mlp.experts.down_proj")
    assert (down.shape, down.dtype, down.hidden_axis) == ((experts, h, h), "BF16", 2)
    assert down.quant["stored"] == [down.key + "_blocks", down.key + "_scales"]
    assert down.bias == "model.layers.1.mlp.experts.down_proj_bias"
    assert layout.target("model.layers.1.mlp.experts.gate_up_proj").shape == (experts, h, 2 * h)
