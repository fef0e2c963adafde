"""`abliterate demo-model OUTDIR --arch {llama,glm4_moe} --seed N`: train a demo organism."""

from __future__ import annotations

from ..demo import ARCHS, build_demo_model

HELP = "train the tiny demo chat model that refuses one fictional category (CPU, < 1 min)"


def add_arguments(parser) -> None:
    parser.add_argument("outdir", help="new (or empty) directory for the Hugging Face model")
    parser.add_argument(
        "--arch",
        default="llama",
        help=f"architecture: {' or '.join(ARCHS)} (default: llama)",
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps (default: the full recipe)"
    )


def run(args) -> int:
    path = build_demo_model(args.outdir, arch=args.arch, seed=args.seed, steps=args.steps)
    print(path)
    return 0
