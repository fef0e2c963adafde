"""`abliterate measure -m MODEL --target FILE --benign FILE -o OUT`: class means per index.

`-o` ending in `.safetensors` writes this project's format (+ a JSON beside it); ending in
`.refuse` writes the legacy torch format the seed's tools read.
"""

from __future__ import annotations

from ..measure import POSITIONS, MeasureOptions, measure_to_file
from ..model import DEVICES, DTYPES, LoadOptions, option_values
from ..prompts import PromptOptions

HELP = "measure the refusal direction: class means at every layer (one forward pass per batch)"


def add_load_arguments(parser) -> None:
    """The model-loading flags (`LoadOptions`), shared by `measure` and `evaluate`."""
    parser.add_argument("--device", default=LoadOptions.device, choices=DEVICES)
    parser.add_argument("--dtype", default=LoadOptions.dtype, choices=["auto", *DTYPES])
    parser.add_argument("--device-map", help="'auto' spreads a large model over GPUs")
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes 4-bit (nf4)")
    quant.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes 8-bit")
    parser.add_argument("--trust-remote-code", action="store_true")


def load_options(args) -> LoadOptions:
    """`LoadOptions` from the flags `add_load_arguments` added (same names as the fields)."""
    return LoadOptions(**option_values(LoadOptions, vars(args)))


def add_arguments(parser) -> None:
    parser.add_argument("model", nargs="?", help="Hugging Face model directory")
    parser.add_argument("-m", "--model", dest="model_option", help="same as the positional MODEL")
    parser.add_argument("-o", "--output", required=True, help="measurements.safetensors or .refuse")
    parser.add_argument(
        "--target", "--data-harmful", required=True, help="prompts to refuse (file or dataset id)"
    )
    parser.add_argument(
        "--benign", "--data-harmless", required=True, help="prompts to answer (file or dataset id)"
    )
    parser.add_argument("--field", help="csv/parquet column, jsonl/json field or dataset column")
    parser.add_argument(
        "--split", default=PromptOptions.split, help="dataset split (hub datasets only)"
    )
    parser.add_argument("--max", type=int, dest="max_count", help="keep at most N prompts per set")
    parser.add_argument(
        "--seed", type=int, default=PromptOptions.seed, help="seed of the --max shuffle"
    )
    parser.add_argument("--system", help="system prompt for every rendered prompt")
    parser.add_argument(
        "--fallback-template",
        action="store_true",
        help="render 'User: ...\\nAssistant:' text when the tokenizer has no chat template",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        help="most tokens one rendered prompt may have (default: the model's context, capped)",
    )
    parser.add_argument(
        "--truncate-prompts",
        action="store_true",
        dest="truncate",
        help="cut longer prompts to --max-tokens instead of refusing them",
    )
    parser.add_argument("--position", choices=POSITIONS, default=MeasureOptions.position)
    parser.add_argument("--batch-size", type=int, default=MeasureOptions.batch_size)
    parser.add_argument("--clip", type=float, help="winsorize each dimension at this quantile")
    add_load_arguments(parser)
    parser.add_argument(
        "--no-attribution",
        action="store_false",
        dest="attribution",
        help="MoE: do not record each routed expert's weighted write (smaller file)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args) -> int:
    model = args.model_option or args.model
    if not model:
        from ..errors import AbliterateError

        raise AbliterateError("no model given; pass the model directory (MODEL or -m MODEL).")
    options = MeasureOptions(
        **option_values(MeasureOptions, vars(args)),
        progress=not args.no_progress,
        load=load_options(args),
        prompts=PromptOptions(**option_values(PromptOptions, vars(args))),
    )
    meas = measure_to_file(model, args.target, args.benign, args.output, options)
    counts = meas.meta["counts"]
    print(
        f"wrote {args.output}: {meas.num_indices} measurement indices, hidden size "
        f"{meas.hidden_size}, {counts['target']} target / {counts['benign']} benign prompts"
    )
    return 0
