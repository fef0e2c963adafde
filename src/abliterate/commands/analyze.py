"""`abliterate analyze MEASUREMENTS [-o OUTDIR] [-c]`: per-layer metrics and a suggested recipe.

Prints the per-index table and the suggestion; with `-o` writes layers.tsv, suggested.yaml
and suggested.txt there, and with `-c/--charts` also the plots (layers.png, rotation.png,
experts.png); `-c` without `-o` writes everything to `<measurements stem>-analysis/`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..analyze import format_table, write_analysis
from ..measure import load_measurements

HELP = "per-layer metrics of the direction, plots, and a suggested recipe"


def add_arguments(parser) -> None:
    parser.add_argument("measurements", help="measurements (.safetensors or .refuse)")
    parser.add_argument("-o", "--output", metavar="OUTDIR", help="write the analysis files here")
    parser.add_argument("-c", "--charts", action="store_true", help="also draw the PNG plots")
    parser.add_argument(
        "--min-layer-fraction",
        type=float,
        default=0.2,
        help="ignore measurement indices in this first fraction of the model when suggesting",
    )


def run(args) -> int:
    meas = load_measurements(args.measurements)
    if args.charts and not args.output:
        source = Path(args.measurements)
        args.output = str(source.with_name(source.stem + "-analysis"))
    with tempfile.TemporaryDirectory() as scratch:
        outdir = args.output or scratch
        metrics = write_analysis(
            meas,
            outdir,
            charts=args.charts,
            min_layer_fraction=args.min_layer_fraction,
        )
        print(format_table(metrics))
        with open(f"{outdir}/suggested.txt", encoding="utf-8") as handle:
            print()
            print(handle.read().rstrip())
    if args.output:
        print(f"\nwrote {args.output}")
    return 0
