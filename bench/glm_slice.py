"""A GLM-4.5-Air-shaped checkpoint slice with real widths and key names (bench helper).

Built tensor by tensor with real random bf16 data, never the whole thing in memory:
`layers` MoE decoder layers (hidden 4096, 96 query heads of 128, 8 KV heads, 128 routed
experts of width 1408, 1 shared expert, the router with its correction bias), one layer
per ~4.7 GB shard, plus, like the real checkpoint, a shard with the embedding, the final
norm and the LM head (151552 x 4096 each, 2.5 GB) that the default recipes do not edit.
Also: cache control for cold runs and `cp` + `sync` as the baseline.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import torch

HIDDEN = 4096
HEADS, KV_HEADS, HEAD_DIM = 96, 8, 128
EXPERT_WIDTH = 1408
VOCAB = 151552
FULL_MODEL_LAYERS = 46  # GLM-4.5-Air: 1 dense + 45 MoE layers


def layer_tensors(n: int, experts: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, dtype) of one GLM-4.5-Air MoE decoder layer, in on-disk naming."""
    p = f"model.layers.{n}."
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    items = [
        (p + "input_layernorm.weight", (HIDDEN,), "BF16"),
        (p + "post_attention_layernorm.weight", (HIDDEN,), "BF16"),
        (p + "self_attn.q_proj.weight", (q, HIDDEN), "BF16"),
        (p + "self_attn.q_proj.bias", (q,), "BF16"),
        (p + "self_attn.k_proj.weight", (kv, HIDDEN), "BF16"),
        (p + "self_attn.k_proj.bias", (kv,), "BF16"),
        (p + "self_attn.v_proj.weight", (kv, HIDDEN), "BF16"),
        (p + "self_attn.v_proj.bias", (kv,), "BF16"),
        (p + "self_attn.o_proj.weight", (HIDDEN, q), "BF16"),
        (p + "mlp.gate.weight", (experts, HIDDEN), "BF16"),
        (p + "mlp.gate.e_score_correction_bias", (experts,), "F32"),
        (p + "mlp.shared_experts.gate_proj.weight", (EXPERT_WIDTH, HIDDEN), "BF16"),
        (p + "mlp.shared_experts.up_proj.weight", (EXPERT_WIDTH, HIDDEN), "BF16"),
        (p + "mlp.shared_experts.down_proj.weight", (HIDDEN, EXPERT_WIDTH), "BF16"),
    ]
    for e in range(experts):
        items += [
            (p + f"mlp.experts.{e}.gate_proj.weight", (EXPERT_WIDTH, HIDDEN), "BF16"),
            (p + f"mlp.experts.{e}.up_proj.weight", (EXPERT_WIDTH, HIDDEN), "BF16"),
            (p + f"mlp.experts.{e}.down_proj.weight", (HIDDEN, EXPERT_WIDTH), "BF16"),
        ]
    return items


def embedding_tensors() -> list[tuple[str, tuple[int, ...], str]]:
    return [
        ("model.embed_tokens.weight", (VOCAB, HIDDEN), "BF16"),
        ("model.norm.weight", (HIDDEN,), "BF16"),
        ("lm_head.weight", (VOCAB, HIDDEN), "BF16"),
    ]


def write_streaming_shard(path: Path, items, generator: torch.Generator) -> int:
    """A safetensors file written one random tensor at a time (header first)."""
    from abliterate.shards import DTYPES, encode_header, tensor_bytes

    head = encode_header([(key, dtype, shape) for key, shape, dtype in items], {"format": "pt"})
    size = len(head)
    with open(path, "wb") as handle:
        handle.write(head)
        for _, shape, dtype in items:
            data = torch.randn(shape, generator=generator).mul_(0.02).to(DTYPES[dtype][0])
            size += handle.write(tensor_bytes(data))
    return size


def build_slice(root: Path, layers: int = 2, experts: int = 128) -> Path:
    """The model directory: `layers` layer shards + the embedding shard, index, config."""
    model = root / "glm-4.5-air-slice"
    model.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    shards = [(f"layer {n}", layer_tensors(n, experts)) for n in range(layers)]
    shards.append(("embeddings", embedding_tensors()))
    weight_map, total = {}, 0
    for number, (_, items) in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        total += write_streaming_shard(model / name, items, generator)
        weight_map.update({key: name for key, _, _ in items})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (model / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config = {
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe",
        "hidden_size": HIDDEN,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "n_routed_experts": experts,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": EXPERT_WIDTH,
        "intermediate_size": 10944,
        "first_k_dense_replace": 0,
        "vocab_size": VOCAB,
        "tie_word_embeddings": False,
    }
    (model / "config.json").write_text(json.dumps(config, indent=1))
    return model


def write_measurements(path: Path, layers: int) -> Path:
    """Random class means at every index (the export's cost does not depend on them)."""
    from abliterate.measure import Measurements, save_measurements

    g = torch.Generator().manual_seed(1)
    means = [torch.randn(layers + 1, HIDDEN, generator=g, dtype=torch.float64) for _ in "tb"]
    empty = torch.zeros(layers + 1, 0)
    save_measurements(Measurements(*means, empty, empty, meta={"num_layers": layers}), path)
    return path


def recipe(layers: int, all_experts: bool) -> dict:
    """The guide's default MoE recipe, or it plus every routed expert's down_proj."""
    data = {
        "ablate": [{"layer": n, "measurement": layers} for n in range(layers)],
        "norm_preserve": True,
    }
    if all_experts:
        data["components"] = ["attn_out", "shared_down", "expert_down"]
        data["ablate_individual_experts"] = True
    return data


def files_of(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def evict(directory: Path) -> None:
    """Drop `directory`'s files from the page cache (after a sync), as a cold start.

    `posix_fadvise(DONTNEED)` needs no root and evicts clean pages of just these files.
    """
    subprocess.run(["sync"], check=True)
    for path in files_of(directory):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(directory: Path) -> None:
    """Read `directory`'s files once, so they are in the page cache (as far as it holds)."""
    for path in files_of(directory):
        with open(path, "rb") as handle:
            while handle.read(64 << 20):
                pass


def cached_fraction(directory: Path) -> float:
    """Share of `directory`'s bytes in the page cache (mincore via util-linux fincore)."""
    total = cached = 0
    for path in files_of(directory):
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", str(path)],
            capture_output=True, text=True,
        )  # fmt: skip
        if out.returncode != 0 or not out.stdout.split():
            return float("nan")
        res, size = (int(x) for x in out.stdout.split()[:2])
        cached, total = cached + res, total + size
    return cached / total if total else float("nan")


def timed(fn) -> float:
    """Wall seconds of `fn()` including the `sync` that puts its writes on disk."""
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    fn()
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - start


def copy_tree(model: Path, destination: Path) -> None:
    subprocess.run(["cp", "-r", str(model), str(destination)], check=True)
