"""`abliterate ablate RECIPE.yml [-j N]`: the whole export without Snakemake.

The seed's `sharded_ablate.py` interface: the recipe names the model, measurements and
output; `--ablate-individual-experts` / `--expert-subset` override its MoE keys.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import AbliterateError
from ..export import export_model
from ..files import LINK_MODES
from ..recipe import build_plan, load_recipe
from ..verify import summary, verify, write_report
from .plan import add_recipe_arguments, recipe_overrides

HELP = "abliterate a sharded checkpoint: plan, edit shard by shard, assemble, verify"


def add_arguments(parser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument("--output", help="output directory (default: the recipe's 'output')")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="shards edited in parallel")
    parser.add_argument("--device", default=None, help="compute device (cpu, cuda, ...)")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    parser.add_argument("--no-verify", action="store_true", help="skip the verification pass")
    parser.add_argument(
        "--no-hash", action="store_true", help="leave shard SHA-256s out of manifest.json"
    )
    parser.add_argument(
        "--link",
        choices=LINK_MODES,
        default="auto",
        help="how unedited shards reach the output: auto (reflink where the file system can, "
        "else copy), reflink, copy, or hardlink (shares the source's inodes: an in-place write "
        "to the output then changes the source)",
    )
    parser.add_argument(
        "--allow-external-links",
        action="store_true",
        help="follow links in the model directory that point outside it",
    )


def run(args) -> int:
    overrides = recipe_overrides(args)
    recipe = load_recipe(args.recipe, {**overrides, "output": args.output})
    if not recipe.output:
        raise AbliterateError(
            f"{args.recipe}: recipe key 'output' is required (or pass --output DIR)."
        )
    if args.jobs < 1:
        raise AbliterateError(f"-j/--jobs must be at least 1, got {args.jobs}.")
    plan = build_plan(recipe, model=args.model, measurements=args.measurements, layout=args.layout)
    print(plan.describe().splitlines()[-1], flush=True)
    output = export_model(
        plan,
        recipe.output,
        jobs=args.jobs,
        device=args.device,
        force=args.force,
        hash_shards=not args.no_hash,
        link_mode=args.link,
        allow_external_links=args.allow_external_links,
    )
    if args.no_verify:
        return 0
    report = verify(plan.model_dir, output, plan, device=args.device)
    write_report(report, Path(output).with_name(Path(output).name + ".verify.json"))
    print(summary(report), end="")
    return 0 if report["ok"] else 1
