"""`abliterate chat MODEL`: talk to a model (chat template, streamed, greedy by default)."""

from __future__ import annotations

from .measure import add_load_arguments, load_options

HELP = "chat with a model in the terminal (/clear, /system TEXT, /exit); greedy by default"


def add_arguments(parser) -> None:
    from ..chat import SamplingOptions

    parser.add_argument("model", help="Hugging Face model directory")
    parser.add_argument("--system", help="system prompt (change it in the chat with /system)")
    parser.add_argument("--max-new-tokens", type=int, default=SamplingOptions.max_new_tokens)
    parser.add_argument(
        "--temperature",
        type=float,
        default=SamplingOptions.temperature,
        help="0 (default): greedy; > 0: sample at this temperature",
    )
    parser.add_argument("--top-p", type=float, help="nucleus sampling (with --temperature)")
    parser.add_argument("--top-k", type=int, help="top-k sampling (with --temperature)")
    parser.add_argument("--seed", type=int, help="seed for sampling")
    parser.add_argument(
        "--fallback-template",
        action="store_true",
        help="chat as 'User: ...\\nAssistant:' text when the tokenizer has no chat template",
    )
    add_load_arguments(parser)


def run(args) -> int:
    from ..chat import ChatSession, SamplingOptions, run_chat
    from ..logs import logger
    from ..model import load_model

    sampling = SamplingOptions(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    model, tokenizer, info = load_model(args.model, load_options(args))
    quantized = f", {info['quantization']}" if info["quantization"] else ""
    logger.info("Loaded %s on %s%s", args.model, info["device"], quantized)
    session = ChatSession(
        model,
        tokenizer,
        system=args.system,
        sampling=sampling,
        fallback_template=args.fallback_template,
    )
    run_chat(session)
    return 0
