"""Expert strategies on the MoE demo organisms: refusal, KL and routing shift per strategy.

For each MoE organism (glm4_moe, mixtral, gpt_oss, deepseek_v3, the cached ones the tests
train): measure on its training prompts, take the analysis' suggested direction, and run
the sweep grid with every layer edited along it at scale 1 (norm-preserving), one variant
per expert strategy:

- `none` (attention + shared experts + router: the guide's default), `all`, `auto:1`,
  `auto:2`, `coverage:0.5`, `coverage:0.9`;
- an explicit list: the two experts with the largest summed attribution signal over the
  MoE layers (one list for every layer, as the seed's `--expert-subset` takes it);
- router suppression on top of `none`: `router_suppress: top:1` and `top:2` at strength 1.

Each variant is scored on the organism's held-out test prompts (100 per class) exactly as
the workflow's sweep scores it (`abliterate.sweep.evaluate_chunk`). The per-organism tables
go to stdout (markdown, for docs/moe.md) and, with --out, to TSV files.

With --search N, also a TPE search of N trials per organism and seed (--seeds) in the
default space (`experts: [none, all]`) and in the extended one (`SEARCH_STRATEGIES`), on
the first half of the held-out prompts as validation; it prints, per space, the trial the
workflow's selection rule picks (refusal <= 0.05, then the lowest first-token KL). This is
the evidence for or against extending the default search space.

Usage: nice -n 19 .venv/bin/python bench/strategies_bench.py [--arch glm4_moe ...] [--out DIR]
       [--search 24 --seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

ORGANISMS = {"glm4_moe": "a", "mixtral": "a", "gpt_oss": "b", "deepseek_v3": "a"}
STRATEGIES = ["none", "all", "auto:1", "auto:2", "coverage:0.5", "coverage:0.9"]
SUPPRESS = ["top:1@1.0", "top:2@1.0"]
SEARCH_STRATEGIES = ["none", "all", "auto:2", "coverage:0.9"]
COLUMNS = [
    ("strategy", "strategy"),
    ("experts_edited", "experts edited"),
    ("refusal_rate", "refusal"),
    ("benign_kept", "benign kept"),
    ("kl_first_token", "first-token KL"),
    ("routing_kl_benign", "routing KL benign"),
    ("routing_kl_target", "routing KL target"),
    ("topk_changed_benign", "top-k changed benign"),
    ("topk_changed_target", "top-k changed target"),
]


def top_experts(meas, count: int = 2) -> str:
    """The `count` experts with the largest attribution signal summed over MoE layers."""
    from abliterate.experts import attribution_table

    table = attribution_table(meas)
    summed = table.groupby("expert")["signal"].sum().sort_values(ascending=False)
    return ",".join(str(e) for e in sorted(int(e) for e in summed.index[:count]))


def run(arch: str, work: Path) -> tuple[object, dict]:
    import conftest  # the cached organisms, trained with the suite's kernels

    from abliterate.analyze import write_analysis
    from abliterate.evaluate import EvalSettings
    from abliterate.grid import variants
    from abliterate.layout import inspect_checkpoint
    from abliterate.measure import MeasureOptions, load_measurements, measure_to_file
    from abliterate.model import LoadOptions
    from abliterate.sweep import evaluate_chunk

    model = conftest._demo(arch, wording=ORGANISMS[arch])
    prompts = model / "prompts"
    work.mkdir(parents=True, exist_ok=True)
    (work / "model").unlink(missing_ok=True)
    (work / "model").symlink_to(model)  # for the search part
    started = time.time()
    inspect_checkpoint(model).save(work / "layout.json")
    measure_to_file(
        model,
        str(prompts / "target_train.txt"),
        str(prompts / "benign_train.txt"),
        work / "measurements.safetensors",
        MeasureOptions(progress=False, load=LoadOptions(device="cpu")),
    )
    meas = load_measurements(work / "measurements.safetensors")
    write_analysis(meas, work, charts=False)
    explicit = top_experts(meas)
    grid = variants(
        {"layers": ["all"], "experts": [*STRATEGIES, explicit], "router_suppress": ["none"]}
    )
    grid += variants({"layers": ["all"], "experts": ["none"], "router_suppress": SUPPRESS})
    table = evaluate_chunk(
        model,
        grid,
        layout_path=work / "layout.json",
        measurements_path=work / "measurements.safetensors",
        suggested_path=work / "suggested.yaml",
        target_prompts=prompts / "target_test.txt",
        benign_prompts=prompts / "benign_test.txt",
        settings=EvalSettings(load=LoadOptions(device="cpu")),
    )

    def strategy(row) -> str:
        if row["variant"] == "base":
            return "base model"
        if row["router_suppress"] != "none":
            return f"none + router_suppress {row['router_suppress'].removesuffix('@1.0')}"
        if row["experts"] == explicit:
            return f"list {explicit}"
        return row["experts"]

    table.insert(0, "strategy", [strategy(row) for _, row in table.iterrows()])
    info = {
        "measurement": int(table["measurement_resolved"].dropna().iloc[0]),
        "layers": table["layers_resolved"].dropna().iloc[0],
        "n": (int(table["n_target"].iloc[0]), int(table["n_benign"].iloc[0])),
        "seconds": round(time.time() - started),
    }
    return table, info


def markdown(arch: str, table, info: dict) -> str:
    lines = [
        f"{arch} (direction index {info['measurement']}, layers {info['layers']}, "
        f"{info['n'][0]} + {info['n'][1]} test prompts; {info['seconds']} s):",
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for _, row in table.iterrows():
        cells = []
        for column, _ in COLUMNS:
            value = row[column]
            if column == "strategy":
                cells.append(f"`{value}`" if value != "base model" else value)
            elif column == "experts_edited":
                cells.append("" if value != value or value is None else str(int(value)))
            elif column in ("refusal_rate", "benign_kept"):
                cells.append(f"{value:.2f}")
            elif row["variant"] == "base":
                cells.append("")
            else:
                cells.append(f"{value:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def search(arch: str, work: Path, n_trials: int, seeds: list[int]) -> list[str]:
    """The selected trial of a default-space and an extended-space search, per seed."""
    from search_fixtures import PROMPTS

    from abliterate.search import parse_settings, trials_table
    from abliterate.search_steps import init_study, worker
    from abliterate.sweep import select_best

    model = work / "model"
    prompts = Path(os.readlink(model)) / "prompts"
    validation = {}
    for cls in ("target", "benign"):
        lines = (prompts / f"{cls}_test.txt").read_text().splitlines()
        validation[cls] = str(work / f"{cls}_validation.txt")
        Path(validation[cls]).write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    inputs = {
        "model_dir": str(os.readlink(model)),
        "layout_path": str(work / "layout.json"),
        "measurements_path": str(work / "measurements.safetensors"),
        "validation": validation,
        "recipe_config": {},
        "evaluate_config": {"device": "cpu"},
        "prompts_config": PROMPTS,
    }
    lines = []
    for seed in seeds:
        for label, experts in (("default", ["none", "all"]), ("extended", SEARCH_STRATEGIES)):
            sweep = {
                "n_trials": n_trials,
                "n_startup_trials": 6,
                "seed": seed,
                "search": {"experts": experts},
            }
            directory = work / f"search-{label}-{seed}"
            started = time.time()
            init_study(
                journal=directory / "study.journal",
                study_json=directory / "study.json",
                suggested_path=work / "suggested.yaml",
                sweep_config=sweep,
                **inputs,
            )
            worker(
                study_json=directory / "study.json",
                worker_index=0,
                output=None,
                sweep_config=sweep,
                **inputs,
            )
            study = json.loads((directory / "study.json").read_text())
            table, _ = trials_table(study["journal"], study["fingerprint"], parse_settings(sweep))
            table.to_csv(directory / "trials.tsv", sep="\t", index=False)
            best, _ = select_best(table, 0.05)
            row = table.set_index("variant").loc[best]
            counts = table["experts"].value_counts().to_dict()
            lines.append(
                f"| {arch} | {seed} | {label} | {best} | `{row['experts']}` | "
                f"{row['refusal_rate']:.2f} | {row['benign_kept']:.2f} | "
                f"{row['kl_first_token']:.4f} | {row['routing_kl_benign']:.4f} | "
                f"{', '.join(f'{k} {v}' for k, v in sorted(counts.items()))} | "
                f"{round(time.time() - started)} s |"
            )
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="*", default=list(ORGANISMS), choices=list(ORGANISMS))
    parser.add_argument("--out", type=Path, default=None, help="write <arch>.tsv here")
    parser.add_argument("--search", type=int, default=0, help="trials per search (0: none)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(tempfile.mkdtemp(prefix="strategies-bench-"))
    for arch in args.arch:
        table, info = run(arch, work / arch)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            table.to_csv(args.out / f"{arch}.tsv", sep="\t", index=False, float_format="%.6g")
        print(markdown(arch, table, info) + "\n", flush=True)
    if args.search:
        print(
            "| organism | seed | space | selected | experts | refusal | benign kept | "
            "first-token KL | routing KL benign | trials per strategy | time |\n"
            + "|---" * 11
            + "|",
            flush=True,
        )
        for arch in args.arch:
            search(arch, work / arch, args.search, args.seeds)


if __name__ == "__main__":
    main()
