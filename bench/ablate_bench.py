"""Benchmark: the sharded export against `cp` on a GLM-4.5-Air-shaped slice, same run.

Builds (tensor by tensor, never the whole thing in memory) two decoder layers of
GLM-4.5-Air at real widths and real key names (hidden 4096, 96 query heads of 128, 8 KV
heads, 128 routed experts of width 1408, 1 shared expert, the router with its correction
bias), one layer per ~4.7 GB bf16 shard, filled with real random bf16 data. Then times:

- `cp -r` of the model directory followed by `sync` (the baseline),
- `abliterate`'s export of o_proj + shared expert + all 128 routed experts' down_proj,
  norm-preserving, on CPU, with 1 and with 2 parallel shard jobs (the export fsyncs each
  shard and computes its SHA-256 for the manifest on the way),
- one shard job alone in a fresh process, for its peak RSS (resource.getrusage),

and prints a JSON summary (with the time extrapolated to the 46-layer model).

    python bench/ablate_bench.py [--dir /big/tmp] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HIDDEN = 4096
HEADS, KV_HEADS, HEAD_DIM = 96, 8, 128
EXPERTS, EXPERT_WIDTH = 128, 1408
LAYERS = 2
FULL_MODEL_LAYERS = 46  # GLM-4.5-Air: 1 dense + 45 MoE layers


def layer_tensors(n: int) -> list[tuple[str, tuple[int, ...], str]]:
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
        (p + "mlp.gate.weight", (EXPERTS, HIDDEN), "BF16"),
        (p + "mlp.gate.e_score_correction_bias", (EXPERTS,), "F32"),
        (p + "mlp.shared_experts.gate_proj.weight", (EXPERT_WIDTH, HIDDEN), "BF16"),
        (p + "mlp.shared_experts.up_proj.weight", (EXPERT_WIDTH, HIDDEN), "BF16"),
        (p + "mlp.shared_experts.down_proj.weight", (HIDDEN, EXPERT_WIDTH), "BF16"),
    ]
    for e in range(EXPERTS):
        items += [
            (p + f"mlp.experts.{e}.gate_proj.weight", (EXPERT_WIDTH, HIDDEN), "BF16"),
            (p + f"mlp.experts.{e}.up_proj.weight", (EXPERT_WIDTH, HIDDEN), "BF16"),
            (p + f"mlp.experts.{e}.down_proj.weight", (HIDDEN, EXPERT_WIDTH), "BF16"),
        ]
    return items


def write_streaming_shard(path: Path, items, generator: torch.Generator) -> int:
    """A safetensors file written one random tensor at a time (header first)."""
    from abliterate.shards import DTYPES, tensor_bytes

    header, offset = {}, 0
    for key, shape, dtype in items:
        size = DTYPES[dtype][1]
        for n in shape:
            size *= n
        header[key] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw)
        for _, shape, dtype in items:
            data = torch.randn(shape, generator=generator).mul_(0.02).to(DTYPES[dtype][0])
            handle.write(tensor_bytes(data))
    return 8 + len(raw) + offset


def build_slice(root: Path) -> Path:
    model = root / "glm-4.5-air-slice"
    model.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for n in range(LAYERS):
        name = f"model-{n + 1:05d}-of-{LAYERS:05d}.safetensors"
        items = layer_tensors(n)
        total += write_streaming_shard(model / name, items, generator)
        weight_map.update({key: name for key, _, _ in items})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (model / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config = {
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe",
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "n_routed_experts": EXPERTS,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": EXPERT_WIDTH,
        "intermediate_size": 10944,
        "first_k_dense_replace": 0,
        "vocab_size": 151552,
        "tie_word_embeddings": False,
    }
    (model / "config.json").write_text(json.dumps(config, indent=1))
    return model


def make_plan(model: Path, root: Path):
    from abliterate.measure import Measurements, save_measurements
    from abliterate.recipe import build_plan

    g = torch.Generator().manual_seed(1)
    means = [torch.randn(LAYERS + 1, HIDDEN, generator=g, dtype=torch.float64) for _ in "tb"]
    empty = torch.zeros(LAYERS + 1, 0)
    save_measurements(Measurements(*means, empty, empty, meta={"num_layers": LAYERS}),
                      root / "measurements.safetensors")  # fmt: skip
    recipe = {
        "ablate": [{"layer": n, "measurement": 2} for n in range(LAYERS)],
        "components": ["attn_out", "shared_down", "expert_down"],
        "ablate_individual_experts": True,
        "norm_preserve": True,
    }
    plan = build_plan(recipe, model=model, measurements=root / "measurements.safetensors")
    plan.save(root / "plan.json")
    return plan


def timed(fn) -> float:
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    fn()
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - start


def shard_job_rss(model: Path, root: Path, shard: str) -> tuple[float, float, float]:
    """Run one shard job in a fresh process: (seconds, peak RSS MiB, RSS MiB before it).

    Peak RSS is the child's own VmHWM (/proc/self/status): getrusage's RUSAGE_CHILDREN
    would report the parent's size, inherited across fork.
    """
    script = (
        "import sys, time\n"
        "from abliterate.export import ablate_shard\n"
        "from abliterate.recipe import Plan\n"
        "def hwm():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmHWM:'):\n"
        "            return int(line.split()[1]) / 1024\n"
        "plan = Plan.load(sys.argv[1])\n"
        "base = hwm()\n"
        "t = time.perf_counter()\n"
        "ablate_shard(sys.argv[2], sys.argv[3], plan, sys.argv[4], digest=True)\n"
        "print(time.perf_counter() - t, hwm(), base)\n"
    )
    out = root / "rss-out" / shard
    result = subprocess.run(
        [sys.executable, "-c", script, str(root / "plan.json"), str(model), shard, str(out)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    seconds, peak, base = (float(x) for x in result.stdout.split())
    shutil.rmtree(root / "rss-out")
    return seconds, peak, base


def copy_model(model: Path, destination: Path) -> None:
    subprocess.run(["cp", "-r", str(model), str(destination)], check=True)


def main() -> None:
    global EXPERTS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where to put the ~28 GB of temp files")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    parser.add_argument("--experts", type=int, default=EXPERTS, help="fewer for a smoke run")
    args = parser.parse_args()
    EXPERTS = args.experts
    from abliterate.export import export_model
    from abliterate.logs import setup_logging

    setup_logging(level=30)
    root = Path(tempfile.mkdtemp(prefix="ablate-bench-", dir=args.dir))
    try:
        start = time.perf_counter()
        model = build_slice(root)
        build_s = time.perf_counter() - start
        size = sum(p.stat().st_size for p in model.iterdir())
        plan = make_plan(model, root)
        shards = sorted({e.shard for e in plan.entries})
        for path in sorted(model.iterdir()):  # same page-cache state for every contender
            subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
        cp_runs, rows = [], {}

        def run_cp() -> None:
            cp_runs.append(timed(lambda: copy_model(model, root / "cp")))
            shutil.rmtree(root / "cp")

        run_cp()
        for jobs in (1, 2):  # cp is timed between the exports too, so load drift shows up
            for hashed in (False, True):
                out = root / f"export-j{jobs}"
                name = f"j{jobs}" + ("_sha256" if hashed else "")
                rows[name] = timed(
                    lambda out=out, jobs=jobs, hashed=hashed: export_model(
                        plan, out, jobs=jobs, hash_shards=hashed
                    )
                )
                shutil.rmtree(out)
            run_cp()
        job_s, peak_mib, base_mib = shard_job_rss(model, root, shards[0])
        cp_s = min(cp_runs)  # the fastest cp: the conservative baseline
        per_layer = FULL_MODEL_LAYERS / LAYERS / 60
        result = {
            "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f} at the end",
            "model_GB": round(size / 1e9, 2),
            "shard_GB": round(max((model / s).stat().st_size for s in shards) / 1e9, 2),
            "edited_tensors": len(plan.entries),
            "edited_GB": round(sum(torch.Size(e.shape).numel() * 2 for e in plan.entries) / 1e9, 2),
            "build_s": round(build_s, 1),
            "cp_s": round(cp_s, 2),
            "cp_runs_s": [round(t, 2) for t in cp_runs],
            **{f"export_{k}_s": round(v, 2) for k, v in rows.items()},
            **{f"throughput_vs_cp_{k}": round(cp_s / v, 3) for k, v in rows.items()},
            "shard_job_s": round(job_s, 2),
            "shard_job_peak_rss_MiB": round(peak_mib),
            "shard_job_rss_before_edit_MiB": round(base_mib),
            "extrapolated_46_layers_cp_min": round(cp_s * per_layer, 1),
            **{f"extrapolated_46_layers_{k}_min": round(v * per_layer, 1) for k, v in rows.items()},
        }
        print(json.dumps(result, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
