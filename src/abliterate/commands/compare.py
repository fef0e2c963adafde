"""`abliterate compare A B`: what changed between two checkpoints, and how they answer.

The direction of the `along` columns comes from `--plan plan.json` (each layer's own) or
from `--measurements FILE --measurement INDEX` (one for every layer).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import AbliterateError
from ..prompts import PromptOptions
from .measure import add_load_arguments, load_options

HELP = "compare two checkpoints: weight change per layer/component and side-by-side answers"


def add_arguments(parser) -> None:
    parser.add_argument("model_a", help="the first model directory (usually the source)")
    parser.add_argument("model_b", help="the second model directory (usually the export)")
    direction = parser.add_argument_group("direction of the 'along' columns")
    direction.add_argument("--plan", help="plan.json whose per-layer directions to use")
    direction.add_argument("--measurements", help="measurements file (with --measurement)")
    direction.add_argument(
        "--measurement", type=int, help="measurement index of the direction for every layer"
    )
    parser.add_argument("--tsv", metavar="PATH", help="write the weight table (TSV) here")
    parser.add_argument("--plot", metavar="PATH", help="write the weight plot (PNG) here")
    parser.add_argument("--prompts", metavar="FILE", help="answer these prompts with A and B")
    parser.add_argument("--max-prompts", type=int, help="answer only the first N prompts")
    parser.add_argument("--answers", metavar="PATH", help="write the answers (TSV) here")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--system", help="system prompt for the answers")
    parser.add_argument("--fallback-template", action="store_true")
    add_load_arguments(parser)


def directions_from_args(args, layout=None):
    """The direction(s) the flags name, or None; one sentence for half-given flags."""
    from ..compare import measurement_direction, plan_directions

    if args.plan and (args.measurements or args.measurement is not None):
        raise AbliterateError("give either --plan or --measurements with --measurement, not both.")
    if args.plan:
        return plan_directions(args.plan, args.model_a, layout)
    if (args.measurements is None) != (args.measurement is None):
        raise AbliterateError("--measurements and --measurement go together; give both.")
    if args.measurements:
        return measurement_direction(args.measurements, args.measurement, args.model_a, layout)
    return None


def run(args) -> int:
    from ..compare import (
        answers_text,
        changes_table,
        plot_changes,
        side_by_side,
        weight_changes,
        write_answers_tsv,
        write_changes_tsv,
    )
    from ..prompts import load_prompts

    if args.answers and not args.prompts:
        raise AbliterateError("--answers needs --prompts FILE (the prompts to answer).")
    if args.prompts and not Path(args.prompts).is_file():
        raise AbliterateError(f"--prompts {args.prompts}: file not found.")
    if args.max_prompts is not None and args.max_prompts < 1:
        raise AbliterateError(f"--max-prompts is {args.max_prompts}; expected an integer >= 1.")
    from ..layout import inspect_checkpoint

    for path in (args.model_a, args.model_b):
        if not Path(path).is_dir():
            raise AbliterateError(f"{path}: model directory not found.")
    layout = inspect_checkpoint(args.model_a)
    changes = weight_changes(
        args.model_a, args.model_b, directions_from_args(args, layout), layout=layout
    )
    print(changes_table(changes), end="")
    if args.tsv:
        write_changes_tsv(changes, args.tsv)
    if args.plot:
        plot_changes(
            changes, args.plot, title=f"{Path(args.model_a).name} vs {Path(args.model_b).name}"
        )
    if args.prompts:
        prompts = load_prompts(args.prompts, max_count=None)
        if args.max_prompts is not None:
            prompts = prompts[: args.max_prompts]
        rows = side_by_side(
            args.model_a,
            args.model_b,
            prompts,
            load=load_options(args),
            prompt_options=PromptOptions(
                system=args.system, fallback_template=args.fallback_template
            ),
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
        )
        print()
        print(answers_text(rows), end="")
        if args.answers:
            write_answers_tsv(rows, args.answers)
    return 0
