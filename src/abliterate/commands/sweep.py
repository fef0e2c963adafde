"""`abliterate aggregate`: merge sweep evaluation tables, plot them, select the recipe."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import AbliterateError

HELP = (
    "merge sweep tables into sweep.tsv, plot the Pareto front and grid (and the routing "
    "shift of MoE models), write best.yaml"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("tables", nargs="+", help="per-job tables (TSV) from the evaluate step")
    p.add_argument("--details", nargs="+", required=True, help="per-job JSON (recipes, samples)")
    p.add_argument("--out-dir", required=True, help="directory for sweep.tsv, best.yaml, plots")
    p.add_argument("--max-refusal-rate", type=float, default=0.1)
    p.add_argument(
        "--min-benign-kept",
        type=float,
        default=0.98,
        help="share of benign answers a variant must keep to meet the target (default 0.98)",
    )
    p.add_argument("--kl", choices=["first_token", "multi_token"], default="first_token")


def run(args: argparse.Namespace) -> int:
    from ..sweep import aggregate

    out = Path(args.out_dir)
    if not 0 <= args.max_refusal_rate <= 1:
        raise AbliterateError("--max-refusal-rate must be between 0 and 1.")
    if not 0 <= args.min_benign_kept <= 1:
        raise AbliterateError("--min-benign-kept must be between 0 and 1.")
    out.mkdir(parents=True, exist_ok=True)
    from ..sweep import read_chunk_routing

    moe = bool(read_chunk_routing(args.details))  # MoE evaluations carry a routing shift
    best, reason = aggregate(
        args.tables,
        args.details,
        table_out=out / "sweep.tsv",
        best_yaml=out / "best.yaml",
        best_txt=out / "best.txt",
        pareto_png=out / "pareto.png",
        heatmap_png=out / "heatmap.png",
        samples_out=out / "samples.html",
        routing_json=out / "sweep_routing.json" if moe else None,
        routing_png=out / "routing.png" if moe else None,
        max_refusal_rate=args.max_refusal_rate,
        min_benign_kept=args.min_benign_kept,
        kl=args.kl,
    )
    print(reason)
    return 0
