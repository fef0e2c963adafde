"""`abliterate analyze MEASUREMENTS [-o OUTDIR] [-c] [--model DIR --target FILE --benign FILE]`.

Prints the per-index table and the suggestion; with `-o` writes layers.tsv, suggested.yaml
and suggested.txt there, and with `-c/--charts` also the plots (layers.png, rotation.png,
experts.png); `-c` without `-o` writes everything to `<measurements stem>-analysis/`.
With `--model` (and held-out `--target`/`--benign` prompts) the candidate directions are
also ranked by intervention (`abliterate.intervene`): the suggestion is the winner's
tested recipe and interventions.tsv is written; without it the separability rule suggests.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..analyze import format_table, layer_metrics, write_analysis
from ..errors import AbliterateError
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
    group = parser.add_argument_group("ranking by intervention (needs the model)")
    group.add_argument("--model", metavar="DIR", help="the measured model's directory")
    group.add_argument("--target", metavar="FILE", help="held-out target (refused) prompts")
    group.add_argument("--benign", metavar="FILE", help="held-out benign prompts")
    group.add_argument(
        "--candidates", type=int, default=4, help="top indices by separability to try (+ the last)"
    )
    group.add_argument("--prompts", type=int, default=16, help="prompts per class to evaluate")
    group.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated per answer")
    group.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")


def _interventions(args, meas):
    from ..directions import IndexedMeans
    from ..evaluate import EvalSettings
    from ..intervene import InterveneSettings, candidate_indices, rank_by_intervention
    from ..layout import inspect_checkpoint
    from ..model import LoadOptions

    if not args.target or not args.benign:
        raise AbliterateError(
            "analyze --model needs --target and --benign (held-out prompt files) to rank the "
            "directions by intervention."
        )
    if not Path(args.model, "config.json").is_file():
        raise AbliterateError(
            f"--model {args.model}: not a model directory (expected a Hugging Face checkpoint "
            "with a config.json)."
        )
    for flag, path in (("--target", args.target), ("--benign", args.benign)):
        if not Path(path).is_file():
            raise AbliterateError(f"{flag} {path}: prompt file not found.")
    settings = InterveneSettings(
        intervene_prompts=args.prompts,
        intervene_candidates=args.candidates,
        intervene_max_new_tokens=args.max_new_tokens,
    )
    layout = inspect_checkpoint(args.model)
    candidates = candidate_indices(
        layer_metrics(meas),
        meas.num_layers,
        IndexedMeans(meas).num_indices - 1,
        settings.intervene_candidates,
        min_layer_fraction=args.min_layer_fraction,
    )
    return rank_by_intervention(
        args.model,
        layout,
        meas,
        args.target,
        args.benign,
        EvalSettings(load=LoadOptions(device=args.device)),
        candidates,
        prompts=settings.intervene_prompts,
        max_new_tokens=settings.intervene_max_new_tokens,
    )


def run(args) -> int:
    meas = load_measurements(args.measurements)
    interventions = _interventions(args, meas) if args.model else None
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
            interventions=interventions,
        )
        print(format_table(metrics))
        with open(f"{outdir}/suggested.txt", encoding="utf-8") as handle:
            print()
            print(handle.read().rstrip())
    if args.output:
        print(f"\nwrote {args.output}")
    return 0
