"""Benchmark: `abliterate measure` vs the naive generate(output_hidden_states=True) recipe.

Both collect per-class residual means at every measurement index for the same prompts,
batch size and model. The naive baseline is what common scripts do: call
`model.generate(..., max_new_tokens=1, output_hidden_states=True,
return_dict_in_generate=True)` per batch, keep every layer's hidden states (all positions)
on the host, and average the last position at the end. Each method runs in its own
subprocess so its peak RSS is its own; prompts/s excludes model loading.

    .venv/bin/python bench/measure_bench.py                       # demo organism, 800 prompts
    .venv/bin/python bench/measure_bench.py --wide                # also a wider random model

Prints a Markdown table (copy it into docs/measure.md).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEMO = ROOT / "resources" / "demo" / "llama-seed0"


def rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_model_mb(model, tokenizer) -> float:
    """RSS once every weight page is resident (one tiny forward pass touches them all)."""
    import psutil
    import torch

    ids = tokenizer("hello", return_tensors="pt", add_special_tokens=True)["input_ids"]
    with torch.no_grad():
        model(ids)
    return psutil.Process().memory_info().rss / 2**20


def run_ours(model_dir: str, target: list[str], benign: list[str], batch_size: int) -> dict:
    import torch

    from abliterate.measure import MeasureOptions, measure
    from abliterate.model import LoadOptions, load_model

    torch.set_num_threads(2)
    model, tokenizer, _ = load_model(model_dir, LoadOptions(device="cpu"))
    loaded = resident_model_mb(model, tokenizer)
    start = time.perf_counter()
    meas = measure(
        model, tokenizer, target, benign, MeasureOptions(batch_size=batch_size, progress=False)
    )
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "loaded_mb": loaded,
        "diff": (meas.target_mean - meas.benign_mean).tolist(),
    }


def run_naive(model_dir: str, target: list[str], benign: list[str], batch_size: int) -> dict:
    import torch

    from abliterate.model import LoadOptions, load_model

    torch.set_num_threads(2)
    model, tokenizer, _ = load_model(model_dir, LoadOptions(device="cpu"))  # left padding
    loaded = resident_model_mb(model, tokenizer)
    start = time.perf_counter()
    means = []
    for prompts in (target, benign):
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
        kept = []  # every layer's hidden states at every position, as common scripts keep them
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[i : i + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            with torch.no_grad():
                out = model.generate(
                    **batch,
                    max_new_tokens=1,
                    do_sample=False,
                    output_hidden_states=True,
                    return_dict_in_generate=True,
                    pad_token_id=tokenizer.pad_token_id,
                )
            kept.append([h.to("cpu") for h in out.hidden_states[0]])
        layers = len(kept[0])
        means.append(
            torch.stack(
                [torch.cat([b[m][:, -1, :] for b in kept]).double().mean(0) for m in range(layers)]
            )
        )
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "loaded_mb": loaded, "diff": (means[0] - means[1]).tolist()}


def child(args) -> None:
    from abliterate.prompts import load_prompts

    target = load_prompts(args.target, max_count=args.prompts // 2)
    benign = load_prompts(args.benign, max_count=args.prompts // 2)
    runner = run_ours if args.child == "ours" else run_naive
    result = runner(args.model, target, benign, args.batch_size)
    result.update(peak_mb=rss_mb(), prompts=len(target) + len(benign))
    print("RESULT " + json.dumps(result))


def run_child(method: str, model: Path, prompts_dir: Path, n: int, batch_size: int) -> dict:
    cmd = [
        sys.executable, __file__, "--child", method, "--model", str(model),
        "--target", str(prompts_dir / "target_train.txt"),
        "--benign", str(prompts_dir / "benign_train.txt"),
        "--prompts", str(n), "--batch-size", str(batch_size),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method} run failed:\n{proc.stderr[-3000:]}")
    out = proc.stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def demo_model() -> Path:
    if (DEFAULT_DEMO / "config.json").is_file():
        return DEFAULT_DEMO
    from abliterate.demo import build_demo_model

    print(f"building the demo organism in {DEFAULT_DEMO} (once) ...", file=sys.stderr)
    return Path(build_demo_model(DEFAULT_DEMO, arch="llama", seed=0))


def wide_model(demo: Path, outdir: Path) -> Path:
    """A random llama with the demo's tokenizer, 1024 wide and 12 layers deep."""
    import shutil

    import transformers

    config = transformers.AutoConfig.from_pretrained(demo)
    config.update(
        dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
             num_attention_heads=16, num_key_value_heads=8, head_dim=64)
    )  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(outdir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (demo / name).is_file():
            shutil.copy(demo / name, outdir / name)
    return outdir


def compare(
    label: str, model: Path, prompts_dir: Path, n: int, batch_size: int, repeats: int
) -> str:
    import torch

    results = {"ours": [], "naive": []}
    for _ in range(repeats):  # interleaved, so a burst of load hits both methods alike
        for method in results:
            results[method].append(run_child(method, model, prompts_dir, n, batch_size))
    ours, naive = (
        dict(
            min(runs, key=lambda r: r["seconds"]),
            peak_mb=max(r["peak_mb"] for r in runs),
            loaded_mb=min(r["loaded_mb"] for r in runs),
        )
        for runs in results.values()
    )
    # hidden_states[L] from generate has the final norm applied; ours is pre-norm by design,
    # so the two agree on indices 0..L-1 only
    error = float((torch.tensor(ours["diff"]) - torch.tensor(naive["diff"]))[:-1].abs().max())
    rows = []
    for name, r in (("abliterate measure", ours), ("naive generate(output_hidden_states)", naive)):
        rate = r["prompts"] / r["seconds"]
        above = r["peak_mb"] - r["loaded_mb"]
        rows.append(
            f"| {label} | {name} | {r['prompts']} | {rate:.1f} | {r['peak_mb']:.0f} | {above:.0f} |"
        )
    speed = (ours["prompts"] / ours["seconds"]) / (naive["prompts"] / naive["seconds"])
    above_ratio = (ours["peak_mb"] - ours["loaded_mb"]) / max(
        1e-9, naive["peak_mb"] - naive["loaded_mb"]
    )
    rows.append(
        f"| {label} | **ratio (ours / naive)** | | **{speed:.2f}x** | "
        f"**{ours['peak_mb'] / naive['peak_mb']:.2f}x** | **{above_ratio:.2f}x** |"
    )
    rows.append(
        f"| {label} | agreement: max abs difference of mean differences, indices 0..L-1 | | "
        f"{error:.1e} | | |"
    )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["ours", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help="model directory (default: the demo organism)")
    parser.add_argument("--target")
    parser.add_argument("--benign")
    parser.add_argument("--prompts", type=int, default=800, help="total prompts (half per class)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="runs per method (best is kept)")
    parser.add_argument("--wide", action="store_true", help="also a 1024-wide, 12-layer model")
    parser.add_argument("--wide-prompts", type=int, default=200, help="total prompts, wide model")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    demo = Path(args.model) if args.model else demo_model()
    print(
        "| model | method | prompts | prompts/s (best of runs) | peak RSS (MiB) | peak above resident model (MiB) |"
    )
    print("|---|---|---|---|---|---|")
    print(
        compare(demo.name, demo, demo / "prompts", args.prompts, args.batch_size, args.repeats),
        flush=True,
    )
    if args.wide:
        with tempfile.TemporaryDirectory() as tmp:
            wide = wide_model(demo, Path(tmp) / "wide")
            print(
                compare(
                    "wide random (d=1024, L=12)",
                    wide,
                    demo / "prompts",
                    args.wide_prompts,
                    args.batch_size,
                    args.repeats,
                )
            )


if __name__ == "__main__":
    main()
