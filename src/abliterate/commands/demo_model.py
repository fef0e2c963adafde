"""`abliterate demo-model OUTDIR --arch ARCH --seed N [--dtype D] [--wording W]`: train a demo organism."""

from __future__ import annotations

from ..demo import ARCH_DTYPE, ARCHS, DTYPES, WORDINGS, build_demo_model

HELP = "train the tiny demo chat model that refuses one fictional category (CPU, < 1 min)"


def add_arguments(parser) -> None:
    parser.add_argument("outdir", help="new (or empty) directory for the Hugging Face model")
    parser.add_argument(
        "--arch",
        default="llama",
        help=f"architecture: {', '.join(ARCHS)} (default: llama)",
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps (default: the full recipe)"
    )
    parser.add_argument(
        "--dtype",
        default=None,
        help=f"saved weight dtype: {' or '.join(DTYPES)} (training is float32; default: "
        f"float32 for {', '.join(ARCH_DTYPE)}, bfloat16 for the others)",
    )
    parser.add_argument(
        "--wording",
        default="a",
        help=f"prompt and answer phrasing: {' or '.join(WORDINGS)} (default: a)",
    )


def run(args) -> int:
    path = build_demo_model(
        args.outdir,
        arch=args.arch,
        seed=args.seed,
        steps=args.steps,
        dtype=args.dtype,
        wording=args.wording,
    )
    print(path)
    return 0
