"""Per-variant wall time of a sweep: in-memory switching vs reloading the model per variant.

Two parts, both measured in the same run:

1. Demo organism, full evaluation (generation on held-out prompts, KL, kept): N variants
   evaluated with one model load and in-memory apply/restore, against the same N variants
   evaluated by loading the model afresh for each (base references computed once in both).
2. A larger random Llama-shaped checkpoint (bf16, default ~0.9 GB): the cost of switching
   variants alone — apply + restore of an all-layer plan — against one `from_pretrained`.

Usage: .venv/bin/python bench/sweep_bench.py [--model DIR] [--variants 6] [--big-hidden 2048]
Numbers go to docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def writer_plan(layout, directions: dict[int, torch.Tensor], scale: float, norm_preserve: bool):
    """Every write-side tensor of every layer, edited with the direction of its index."""
    from abliterate.recipe import Plan, PlanEntry

    m = min(directions)
    entries = [
        PlanEntry.for_target(
            target,
            layer=None,
            direction_id=f"m{m}",
            direction=directions[m],
            scale=scale,
            norm_preserve=norm_preserve,
        )
        for target in layout.targets(side="write")
        if target.component != "embed"
    ]
    return Plan(entries=entries, model_dir=layout.model_dir, recipe={})


def demo_part(model_dir: Path, n_variants: int) -> dict:
    from abliterate.evaluate import EvalSettings, Evaluator, render_prompts
    from abliterate.layout import inspect_checkpoint
    from abliterate.measure import load_measurements, measure_to_file
    from abliterate.model import LoadOptions, load_model
    from abliterate.prompts import load_prompts

    work = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    meas_path = work / "measurements.safetensors"
    prompts = model_dir / "prompts"
    measure_to_file(
        model_dir, str(prompts / "target_train.txt"), str(prompts / "benign_train.txt"), meas_path
    )
    meas = load_measurements(meas_path)
    layout = inspect_checkpoint(model_dir)
    norms = (meas.target_mean - meas.benign_mean).norm(dim=-1)
    best_m = int(norms[1:].argmax()) + 1
    direction = (meas.target_mean[best_m] - meas.benign_mean[best_m]).float()
    plans = [
        writer_plan(layout, {best_m: direction}, scale, norm_preserve)
        for scale in (1.0, 0.75, 0.5)
        for norm_preserve in (True, False)
    ][:n_variants]
    settings = EvalSettings(max_new_tokens=16, kl_tokens=8)

    def prompt_sets(tokenizer):
        return (
            render_prompts(tokenizer, load_prompts(prompts / "target_test.txt")),
            render_prompts(tokenizer, load_prompts(prompts / "benign_test.txt")),
        )

    # in memory: one load, apply/evaluate/restore per variant
    start = time.perf_counter()
    model, tokenizer, _ = load_model(model_dir, LoadOptions(device="cpu"))
    evaluator = Evaluator(model, tokenizer, *prompt_sets(tokenizer), settings, model_dir=model_dir)
    evaluator.evaluate_base()
    setup = time.perf_counter() - start
    base = evaluator

    def reload_and_evaluate(name, plan):
        """The alternative: a fresh model per variant (base references reused)."""
        model, tokenizer, _ = load_model(model_dir, LoadOptions(device="cpu"))
        fresh = Evaluator(model, tokenizer, base.target, base.benign, settings, model_dir=model_dir)
        fresh.base = base.base
        fresh._base_benign_answers = base._base_benign_answers
        fresh._base_continuations = base._base_continuations
        fresh._base_logprobs = base._base_logprobs
        fresh.evaluate(name, plan)

    # interleaved, so load drift on shared machines hits both strategies alike
    in_memory, reload = [], []
    for i, plan in enumerate(plans):
        t = time.perf_counter()
        evaluator.evaluate(f"v{i}", plan)
        in_memory.append(time.perf_counter() - t)
        t = time.perf_counter()
        reload_and_evaluate(f"v{i}", plan)
        reload.append(time.perf_counter() - t)
    return {
        "variants": len(plans),
        "setup_s": setup,
        "in_memory_s": statistics.median(in_memory),
        "reload_s": statistics.median(reload),
    }


def big_part(hidden: int, layers: int, device: str = "cpu", repeats: int = 5) -> dict:
    import transformers

    from abliterate.evaluate import InMemoryEditor
    from abliterate.layout import inspect_checkpoint

    work = Path(tempfile.mkdtemp(prefix="sweep-bench-big-"))
    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=max(1, hidden // 512),
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(work, max_shard_size="500MB")
    size_gb = sum(p.numel() for p in model.parameters()) * 2 / 1e9
    del model
    layout = inspect_checkpoint(work)
    plan = writer_plan(layout, {0: torch.randn(hidden)}, 1.0, True)
    tokens = torch.randint(0, 32000, (1, 8), device=device)

    @torch.no_grad()
    def forward(model):
        return model(input_ids=tokens).logits

    def load():
        """from_pretrained, then every weight copied into its own memory: what loading
        onto an accelerator costs at least (transformers may memory-map CPU weights, which
        would defer the read to the first forward)."""
        model = transformers.AutoModelForCausalLM.from_pretrained(work, dtype="auto")
        if device != "cpu":
            return model.to(device)
        with torch.no_grad():
            for param in model.parameters():
                param.data = param.data.clone()
        return model

    loads, applies, forwards, switches, restores = [], [], [], [], []
    resident = load()
    editor = InMemoryEditor(resident, work)
    with editor.applied(plan):  # first use also checks a few mapped tensors against disk
        pass
    for _ in range(repeats):  # interleaved: reload strategy, then in-memory strategy
        t = time.perf_counter()
        model = load()
        loads.append(time.perf_counter() - t)
        t = time.perf_counter()
        with InMemoryEditor(model).applied(plan):
            applies.append(time.perf_counter() - t)
            t = time.perf_counter()
            forward(model)
            forwards.append(time.perf_counter() - t)
        del model
        t = time.perf_counter()
        with editor.applied(plan):
            t_restore = time.perf_counter()
        switches.append(time.perf_counter() - t)
        restores.append(time.perf_counter() - t_restore)
    median = statistics.median
    return {
        "size_gb": size_gb,
        "tensors": len(plan.entries),
        "load_s": median(loads),
        "apply_s": median(applies),
        "switch_s": median(switches),
        "restore_s": median(restores),
        "forward_s": median(forwards),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="demo organism dir (default: build one)")
    parser.add_argument("--variants", type=int, default=6)
    parser.add_argument("--big-hidden", type=int, default=2048)
    parser.add_argument("--big-layers", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="device of the large-model part")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model
    if model_dir is None:
        from abliterate.demo import build_demo_model

        model_dir = build_demo_model(Path(tempfile.mkdtemp(prefix="demo-")) / "llama", "llama", 0)
    demo = demo_part(Path(model_dir), args.variants)
    print(
        f"demo organism, {demo['variants']} variants, full evaluation per variant: "
        f"in-memory {demo['in_memory_s']:.3f} s/variant (+{demo['setup_s']:.2f} s once), "
        f"reload {demo['reload_s']:.3f} s/variant -> "
        f"{demo['reload_s'] / demo['in_memory_s']:.2f}x"
    )
    big = big_part(args.big_hidden, args.big_layers, args.device)
    per_reload = big["load_s"] + big["apply_s"]
    print(
        f"random llama {big['size_gb']:.2f} GB bf16 on {args.device}, {big['tensors']} tensors edited "
        f"(norm-preserving): load {big['load_s']:.3f} s, edit {big['apply_s']:.3f} s, "
        f"edit+restore {big['switch_s']:.3f} s (restore "
        f"{big['restore_s']:.3f} s), one forward "
        f"{big['forward_s']:.2f} s -> "
        f"switching cost per variant: reload {per_reload:.3f} s vs in-memory "
        f"{big['switch_s']:.3f} s ({per_reload / big['switch_s']:.1f}x), evaluation excluded"
    )


if __name__ == "__main__":
    main()
