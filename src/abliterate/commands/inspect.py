"""`abliterate inspect MODEL_DIR [--json OUT]`: what a recipe can edit in a checkpoint."""

from __future__ import annotations

from ..layout import component_table, inspect_checkpoint

HELP = "read config.json and safetensors headers; list the editable tensors per component"


def add_arguments(parser) -> None:
    parser.add_argument("model_dir", help="Hugging Face model directory (safetensors)")
    parser.add_argument("--json", metavar="OUT", help="write layout.json here")


def run(args) -> int:
    layout = inspect_checkpoint(args.model_dir)
    print(component_table(layout), flush=True)
    if args.json:
        layout.save(args.json)
        print(f"wrote {args.json}")
    return 0
