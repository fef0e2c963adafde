"""`abliterate ablate RECIPE.yml [-j N]`: the whole export without Snakemake.

The seed's `sharded_ablate.py` interface: the recipe names the model, measurements and
output; `--ablate-individual-experts` / `--expert-subset` override its MoE keys.
"""

from __future__ import annotations

from pathlib import Path

from .. import quant
from ..card import CardOptions, is_hub_id
from ..errors import AbliterateError
from ..export import VerificationFailed, export_model
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
        "--full-verify",
        action="store_true",
        help="re-read every tensor and recompute every edit from the source (default: check "
        "each edit in memory before it is written and re-read the shards only for digests)",
    )
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
        "--mxfp4",
        choices=quant.MXFP4_OUTPUTS,
        default=quant.DEFAULT_MXFP4_OUTPUT,
        help="how edited MXFP4 experts (gpt-oss originals) are written: bf16 (default; the "
        "edit holds to bf16 precision, config.json's quantization_config updated) or "
        "requantize (MXFP4 again, same size, but 4-bit rounding puts part of the removed "
        "direction back; docs/quantized.md)",
    )
    parser.add_argument(
        "--allow-external-links",
        action="store_true",
        help="follow links in the model directory that point outside it",
    )
    card = parser.add_argument_group("model card (README.md of the output)")
    card.add_argument(
        "--base-model",
        metavar="OWNER/NAME",
        help="the base model's Hub id for the card's base_model (default: from a Hugging Face "
        "cache path, else the directory name when it is a valid id)",
    )
    card.add_argument(
        "--license", help="the card's license (default: the base model card's license)"
    )
    card.add_argument(
        "--tag",
        action="append",
        default=[],
        dest="tags",
        metavar="TAG",
        help="an extra card tag after 'abliterated' (repeatable)",
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
    if args.base_model is not None and not is_hub_id(args.base_model):
        raise AbliterateError(
            f"--base-model: {args.base_model!r} is not a Hub repo id; expected OWNER/NAME."
        )
    card = CardOptions(base_model=args.base_model, license=args.license, tags=args.tags)
    reports: list[dict] = []
    written: dict = {}  # what the shard jobs checked as they wrote (unused with --full-verify)

    def check(directory: Path) -> dict:
        by_digest = None if args.full_verify else written
        reports.append(
            verify(plan.model_dir, directory, plan, device=args.device, written=by_digest,
                   jobs=max(2, args.jobs))
        )  # fmt: skip
        return reports[-1]

    verify_path = Path(recipe.output).with_name(Path(recipe.output).name + ".verify.json")
    try:
        output = export_model(
            plan,
            recipe.output,
            jobs=args.jobs,
            device=args.device,
            force=args.force,
            hash_shards=not args.no_hash,
            link_mode=args.link,
            allow_external_links=args.allow_external_links,
            card=card,
            check=None if args.no_verify else check,
            written=None if args.no_verify or args.full_verify else written,
            mxfp4=args.mxfp4,
        )
    except VerificationFailed as failure:
        write_report(failure.report, verify_path)
        print(summary(failure.report), end="")
        print(failure, flush=True)
        return 1
    if args.no_verify:
        return 0
    if reports:  # verified before it was published (the card records the result)
        report = {**reports[-1], "output": str(output)}
    else:  # the output already held this export: check it as it is
        report = verify(plan.model_dir, output, plan, device=args.device)
    write_report(report, verify_path)
    print(summary(report), end="")
    return 0 if report["ok"] else 1
