"""`abliterate convert IN OUT`: measurements between `.safetensors` and legacy `.refuse`.

The direction follows the suffixes. `.refuse` files are read with
`torch.load(weights_only=True)`, never unpickled. `--model DIR` or `--layout layout.json`
checks that the measurements fit that model (hidden size, number of layers).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import AbliterateError
from ..measure import load_measurements, save_measurements

HELP = "convert measurements between .safetensors and the legacy .refuse format"
SUFFIXES = (".safetensors", ".refuse")


def add_arguments(parser) -> None:
    parser.add_argument("input", help="measurements (.safetensors or .refuse)")
    parser.add_argument("output", help="measurements (.safetensors or .refuse)")
    check = parser.add_mutually_exclusive_group()
    check.add_argument("--model", help="check against this model directory's config.json")
    check.add_argument("--layout", help="check against this layout.json (abliterate inspect)")


def model_shape(model: str | None = None, layout: str | None = None) -> tuple[int, int, str]:
    """(hidden_size, num_layers, description) of a model directory or a layout.json."""
    path = Path(layout) if layout else Path(model) / "config.json"
    if not path.is_file():
        raise AbliterateError(
            f"{path} does not exist; expected a model's config.json or a layout.json."
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    data = data.get("text_config", data) if not layout else data
    try:
        return (
            int(data["hidden_size"]),
            int(data.get("num_layers", data.get("num_hidden_layers"))),
            str(path),
        )
    except (KeyError, TypeError, ValueError):
        raise AbliterateError(
            f"{path} has no hidden_size/num_layers; expected a model config or layout."
        ) from None


def run(args) -> int:
    for name in (args.input, args.output):
        if Path(name).suffix not in SUFFIXES:
            raise AbliterateError(f"{name} must end in .safetensors or .refuse.")
    meas = load_measurements(args.input)
    if args.model or args.layout:
        hidden, layers, what = model_shape(args.model, args.layout)
        meas.check_compatible(hidden, layers, what)
    save_measurements(meas, args.output)
    print(
        f"wrote {args.output} ({meas.num_indices} measurement indices, hidden size {meas.hidden_size})"
    )
    return 0
