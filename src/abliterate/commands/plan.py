"""`abliterate plan RECIPE`: print (and optionally save) the explicit per-tensor plan."""

from __future__ import annotations

from ..recipe import build_plan


def add_recipe_arguments(parser) -> None:
    """The recipe argument and the seed's MoE flags, shared with `abliterate ablate`."""
    parser.add_argument("recipe", help="recipe YAML (the seed's format plus options)")
    parser.add_argument("--model", help="model directory (default: the recipe's 'model')")
    parser.add_argument(
        "--measurements", help="measurements file (default: the recipe's 'measurements')"
    )
    parser.add_argument("--layout", help="layout.json from `abliterate inspect --json`")
    parser.add_argument(
        "--ablate-individual-experts",
        action="store_true",
        default=None,
        help="also edit every routed expert's down_proj (MoE)",
    )
    parser.add_argument(
        "--expert-subset", metavar='"0,1,2,3"', help="only these routed experts (0-based)"
    )


def recipe_overrides(args) -> dict:
    return {
        "ablate_individual_experts": args.ablate_individual_experts,
        "expert_subset": args.expert_subset,
    }


HELP = "resolve a recipe against the model and measurements; print every tensor edit"


def add_arguments(parser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument("--save", metavar="PLAN_JSON", help="write plan.json (+ .safetensors)")


def run(args) -> int:
    plan = build_plan(
        args.recipe,
        model=args.model,
        measurements=args.measurements,
        layout=args.layout,
        overrides=recipe_overrides(args),
    )
    print(plan.describe(), flush=True)
    if args.save:
        plan.save(args.save)
        print(f"wrote {args.save}")
    return 0
