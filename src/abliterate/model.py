"""Model access: loading a causal LM, its decoder layers, batching, padding and greedy generation.

Why one module: measurement, evaluation, the demo organism and the benchmarks all load a
model and feed it batches of token ids. When each kept its own loader, padding and
generation loop they drifted apart (4-bit loading worked for measurement but not for
evaluation; two pad-id rules). Everything that touches a loaded model's plumbing lives
here; what is *measured* stays in `measure` and `evaluate`.

Conventions: batches are left padded (the last real token of every row is the last
column, which generation and last-position measurement both need); position ids are taken
from the attention mask so padding changes nothing; `trust_remote_code` is only ever set
when the user asks for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from . import quant
from .errors import AbliterateError

DEVICES = ("auto", "cuda", "cpu", "mps")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PADDING_SIDES = ("left", "right")


# --------------------------------------------------------------------------- loading


def option_values(options_class, values: dict) -> dict:
    """The entries of `values` (a config section, `vars(args)`) that name a field of
    `options_class`: config keys and CLI destinations are spelled like the fields."""
    names = {f.name for f in fields(options_class)}
    return {key: value for key, value in values.items() if key in names}


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model; defaults match the workflow schema's `measure:`/`evaluate:`.

    `dtype` "auto" keeps the checkpoint's own dtype (what in-memory evaluation needs to
    edit bit for bit what the export writes). `device_map` ("auto") spreads a model too
    large for one accelerator over several; 4/8-bit loading needs bitsandbytes.
    """

    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    trust_remote_code: bool = False

    @classmethod
    def from_config(cls, section: dict, trust_remote_code: bool = False) -> LoadOptions:
        """The loading keys of a validated workflow section (`measure:` or `evaluate:`)."""
        given = option_values(cls, section)
        return cls(**{**given, "trust_remote_code": bool(trust_remote_code)})


def resolve_device(device: str = "auto") -> str:
    """The device to run on: `auto` picks CUDA, then MPS, then the CPU."""
    if device not in DEVICES:
        raise AbliterateError(
            f"device {device!r} is unknown (measure.device / evaluate.device, CLI --device); "
            f"expected one of {', '.join(DEVICES)}."
        )
    if device != "auto":
        if device == "cuda" and not torch.cuda.is_available():
            raise AbliterateError(
                "device cuda was requested (measure.device / evaluate.device, CLI --device) "
                "but no CUDA device is available."
            )
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _quantization_config(options: LoadOptions, device: str):
    import transformers

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise AbliterateError(
            "load_in_4bit/load_in_8bit need `pip install bitsandbytes`."
        ) from None
    compute = DTYPES.get(options.dtype, torch.float32 if device == "cpu" else torch.bfloat16)
    return transformers.BitsAndBytesConfig(
        load_in_4bit=options.load_in_4bit,
        load_in_8bit=options.load_in_8bit,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_type="nf4",
    )


def load_model(model_dir: str | Path, options: LoadOptions | None = None):
    """Load a causal LM (eval mode, no gradients) and its left-padding tokenizer.

    Returns (model, tokenizer, info); `info` records what was loaded where (model path,
    device, device_map, quantization) for the measurement metadata and the logs.
    """
    import transformers

    options = options or LoadOptions()
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise AbliterateError(
            f"model directory {path} has no config.json; expected a Hugging Face model."
        )
    if options.load_in_4bit and options.load_in_8bit:
        raise AbliterateError("load_in_4bit and load_in_8bit are both set; choose one.")
    if options.dtype != "auto" and options.dtype not in DTYPES:
        raise AbliterateError(
            f"dtype {options.dtype!r} is unknown; expected auto or one of {', '.join(DTYPES)}."
        )
    device = resolve_device(options.device)
    kwargs: dict = {
        "dtype": "auto" if options.dtype == "auto" else DTYPES[options.dtype],
        "trust_remote_code": options.trust_remote_code,
    }
    quantization = None
    if options.load_in_4bit or options.load_in_8bit:
        quantization = "4bit" if options.load_in_4bit else "8bit"
        kwargs["quantization_config"] = _quantization_config(options, device)
        kwargs["device_map"] = options.device_map or device
    else:
        # FP8/MXFP4 checkpoints load dequantized: the in-memory edit needs real-valued weights
        kwargs.update(quant.dequantizing_load_kwargs(path))
        if options.device_map:
            kwargs["device_map"] = options.device_map
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        path, trust_remote_code=options.trust_remote_code
    )
    tokenizer.padding_side = "left"
    info = {
        "model": str(path.resolve()),
        "device": device,
        "device_map": options.device_map,
        "quantization": quantization,
    }
    return model, tokenizer, info


def quantization_of(model) -> str | None:
    """How a loaded model's weights are quantized ("4bit", "8bit", a method name) or None."""
    config = getattr(model.config, "quantization_config", None)
    if config is None:
        return None
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    if get("load_in_4bit"):
        return "4bit"
    if get("load_in_8bit"):
        return "8bit"
    return str(get("quant_method") or "quantized")


# --------------------------------------------------------------------------- structure


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layer list of a causal LM (`model.layers` of its base model)."""
    candidates = [getattr(model, getattr(model, "base_model_prefix", "model"), None), model]
    for base in candidates:
        for path in ("layers", "language_model.layers", "model.layers"):
            node = base
            for part in path.split("."):
                node = getattr(node, part, None) if node is not None else None
            if isinstance(node, torch.nn.ModuleList) and len(node) > 0:
                return node
    raise AbliterateError(
        f"could not find the decoder layers of {type(model).__name__}; expected a "
        "`model.layers` module list."
    )


def base_model(model):
    """The transformer without its head, so no vocabulary-sized logits are computed."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    return base if isinstance(base, torch.nn.Module) else model


def input_device(model) -> torch.device:
    """Where input ids go: the embedding's device (the first device under a device_map)."""
    embeddings = model.get_input_embeddings()
    return embeddings.weight.device


# --------------------------------------------------------------------------- tokens and batches


def pad_id(tokenizer) -> int:
    """The id padding is written with: pad, else eos, else unk, else 0 (masked out anyway)."""
    for value in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        getattr(tokenizer, "unk_token_id", None),
    ):
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def stop_ids(model, tokenizer) -> set[int]:
    """Every end-of-sequence id the generation config or the tokenizer names."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(i) for i in eos)
    return ids


def length_batches(lengths: Sequence[int], batch_size: int, *, by_length: bool = True):
    """Item indices grouped into batches of at most `batch_size`.

    `by_length`: sorted by length first (stable for equal lengths), so each batch pads
    little; otherwise in the given order.
    """
    if batch_size < 1:
        raise AbliterateError(f"batch_size is {batch_size}; expected a positive integer.")
    order = list(range(len(lengths)))
    if by_length:
        order.sort(key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_value: int, side: str = "left"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one padded [B, T] id tensor and its attention mask (on the CPU)."""
    if side not in PADDING_SIDES:
        raise AbliterateError(f"padding side {side!r} is unknown; expected left or right.")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq)
        if not n:
            continue
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[row, cols] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over real tokens only, so left padding shifts nothing."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


# --------------------------------------------------------------------------- generation


def _trim(tokens: Sequence[int], stop: set[int]) -> list[int]:
    """Generated tokens up to (excluding) the first stop token."""
    out: list[int] = []
    for token in tokens:
        if token in stop:
            break
        out.append(int(token))
    return out


@torch.no_grad()
def greedy_generate(
    model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
) -> list[list[int]]:
    """Greedy continuations (token lists, stop token excluded) of already-tokenized prompts.

    Batches keep the prompts' order (left padded), so a variant and the base model see
    the very same batches and their answers can be compared exactly.
    """
    pad = pad_id(tokenizer)
    stop = stop_ids(model, tokenizer)
    device = input_device(model)
    prompts = list(prompt_ids)
    outputs: list[list[int]] = []
    for batch in length_batches([len(p) for p in prompts], batch_size, by_length=False):
        ids, mask = pad_batch([prompts[i] for i in batch], pad)
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=sorted(stop) or None,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        for row in generated[:, ids.shape[1] :].tolist():
            outputs.append(_trim(row, stop))
    return outputs


def decode(tokenizer, token_lists: Sequence[Sequence[int]]) -> list[str]:
    """Each token list as text, special tokens dropped, surrounding whitespace stripped."""
    return [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in token_lists]
