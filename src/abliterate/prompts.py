"""Prompt sets and their rendering as a chat turn.

Why a module of its own: the measured activations are only meaningful when every prompt
is rendered exactly as the model sees a real request (system prompt, one user turn, the
generation prompt), and when the set itself is pinned (a seeded shuffle, a sha256 of the
exact texts in the measurement metadata).

Sources: `.txt` (one prompt per non-blank line), `.json` (a list of strings, or of
objects with the text under `field`, default `text`), `.jsonl` (one string or object per
line), `.csv` / `.parquet` (the column `field`), or a Hugging Face dataset id when the
name is not a local path (needs the `datasets` package and network; never used in tests).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from .errors import AbliterateError

FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".parquet")
DEFAULT_FIELD = "text"

# The documented plain-text format used when a tokenizer has no chat template and the
# user switched `prompts.fallback_template` on (CLI: --fallback-template).
FALLBACK_SYSTEM = "System: {system}\n\n"
FALLBACK_TURN = "User: {prompt}\nAssistant:"


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids of one rendered prompt and how many of them follow the user's text.

    `tail` counts the template tokens after the instruction (end of the user turn and the
    generation prompt); the `post_instruction` measurement position averages over them.
    """

    ids: list[int]
    tail: int


@dataclass(frozen=True)
class PromptOptions:
    """How prompt sets are read and rendered; defaults match the workflow schema's `prompts:`.

    Measurement and evaluation share one instance, so held-out prompts are rendered
    exactly as the training prompts were measured. `max_count` is the schema's `max`.
    """

    field: str | None = None
    split: str = "train"
    max_count: int | None = None
    seed: int = 0
    system: str | None = None
    fallback_template: bool = False

    @classmethod
    def from_config(cls, section: dict) -> PromptOptions:
        """The options of a validated `prompts:` section (prompt paths are the workflow's)."""
        return cls(
            field=section["field"],
            split=section["split"],
            max_count=section["max"],
            seed=section["seed"],
            system=section["system"],
            fallback_template=section["fallback_template"],
        )

    def load(self, source: str | Path) -> list[str]:
        """`load_prompts(source)` with these options."""
        return load_prompts(
            source, field=self.field, split=self.split, max_count=self.max_count, seed=self.seed
        )

    def encode(self, tokenizer, prompts: list[str]) -> list[EncodedPrompt]:
        """`encode(tokenizer, prompts)` with this system prompt and template fallback."""
        return encode(
            tokenizer, prompts, system=self.system, fallback_template=self.fallback_template
        )


def load_prompts(
    source: str | Path,
    *,
    field: str | None = None,
    split: str = "train",
    max_count: int | None = None,
    seed: int = 0,
) -> list[str]:
    """Read a prompt set; with `max_count`, keep a seeded random subset of that size."""
    if max_count is not None and (isinstance(max_count, bool) or max_count < 1):
        raise AbliterateError(
            f"prompt count limit {max_count!r} for {source} is invalid (prompts.max, CLI --max); "
            "expected an integer >= 1."
        )
    path = Path(source)
    if path.suffix.lower() in FILE_SUFFIXES or path.exists():
        if not path.exists():
            raise AbliterateError(f"prompt file {path} does not exist.")
        if path.is_dir():
            raise AbliterateError(f"prompt file {path} is a directory; expected a file.")
        prompts = _read_file(path, field)
    else:
        prompts = _read_hub_dataset(str(source), split, field)
    prompts = [p.strip() for p in prompts]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise AbliterateError(f"prompt set {source} contains no prompts; expected at least one.")
    if max_count is not None and max_count < len(prompts):
        prompts = random.Random(seed).sample(prompts, max_count)
    return prompts


def prompt_sha256(prompts: list[str]) -> str:
    """A fingerprint of the exact prompt texts, in order (recorded in measurement metadata)."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(prompt.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def _read_file(path: Path, field: str | None) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(_read_text(path))
        except json.JSONDecodeError as error:
            raise AbliterateError(f"prompt file {path} is not valid JSON ({error}).") from None
        if not isinstance(data, list):
            raise AbliterateError(f"prompt file {path} must hold a JSON list of prompts.")
        return [_text_of(item, field, f"{path} item {i}") for i, item in enumerate(data)]
    if suffix == ".jsonl":
        texts = []
        for number, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                raise AbliterateError(f"line {number} of {path} is not valid JSON.") from None
            texts.append(_text_of(item, field, f"{path} line {number}"))
        return texts
    if suffix in (".csv", ".parquet"):
        return _read_table(path, field)
    return _read_text(path).splitlines()


def _read_parquet(path: Path):
    """A Parquet table; a file pyarrow cannot read gets one sentence, not its traceback."""
    import pandas as pd

    try:
        return pd.read_parquet(path)
    except ImportError:
        raise
    except Exception as error:  # pyarrow raises its own types (ArrowInvalid, OSError ...)
        raise AbliterateError(
            f"prompt file {path} is not a readable Parquet file ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'})."
        ) from None


def _read_text(path: Path) -> str:
    """The file as UTF-8 text, or one sentence saying where it stops being text.

    Why: a binary or Latin-1 file handed in as a prompt set would otherwise end the run
    with a bare UnicodeDecodeError that names neither the file nor the place.
    """
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise AbliterateError(
            f"prompt file {path} is not UTF-8 text (byte {error.start} is 0x{raw[error.start]:02x}); "
            "expected a UTF-8 text, JSON, JSONL, CSV or Parquet file."
        ) from None


def _text_of(item, field: str | None, where: str) -> str:
    if isinstance(item, str):
        return item
    key = field or DEFAULT_FIELD
    if isinstance(item, dict) and isinstance(item.get(key), str):
        return item[key]
    raise AbliterateError(
        f"{where} has no text field {key!r}; expected a string or an object with it."
    )


def _read_table(path: Path, field: str | None) -> list[str]:
    import pandas as pd

    if field is None:
        raise AbliterateError(
            f"prompt file {path} is a table; name its text column with prompts.field (--field)."
        )
    try:
        if path.suffix.lower() == ".csv":
            frame = pd.read_csv(io.StringIO(_read_text(path)))
        else:
            frame = _read_parquet(path)
    except ImportError:
        raise AbliterateError(
            f"reading {path} needs pyarrow; install it (pip install pyarrow) or use csv/jsonl."
        ) from None
    if field not in frame.columns:
        raise AbliterateError(
            f"prompt file {path} has no column {field!r}; its columns are {list(frame.columns)}."
        )
    return frame[field].dropna().astype(str).tolist()


def _read_hub_dataset(name: str, split: str, field: str | None) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise AbliterateError(
            f"prompt set {name} is neither a local file nor loadable: it looks like a Hugging "
            "Face dataset id, which needs `pip install datasets`."
        ) from None
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as error:  # the hub raises many types; the user needs one sentence
        raise AbliterateError(f"could not load dataset {name} split {split!r}: {error}") from None
    column = field or DEFAULT_FIELD
    if column not in dataset.column_names:
        raise AbliterateError(
            f"dataset {name} has no column {column!r}; its columns are {dataset.column_names}."
        )
    return [str(text) for text in dataset[column] if text is not None]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(
    tokenizer,
    prompts: list[str],
    *,
    system: str | None = None,
    fallback_template: bool = False,
) -> list[str]:
    """Each prompt as the text the model sees: one user turn plus the generation prompt."""
    if has_chat_template(tokenizer):
        return [_render_chat(tokenizer, prompt, system) for prompt in prompts]
    if not fallback_template:
        name = getattr(tokenizer, "name_or_path", "") or "the model"
        raise AbliterateError(
            f"the tokenizer of {name} has no chat template; set prompts.fallback_template: true "
            "(CLI --fallback-template) to render prompts as 'User: ...\\nAssistant:' text."
        )
    head = FALLBACK_SYSTEM.format(system=system) if system else ""
    return [head + FALLBACK_TURN.format(prompt=prompt) for prompt in prompts]


def _render_chat(tokenizer, prompt: str, system: str | None) -> str:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


DEFAULT_MAX_TOKENS = 4096  # cap on the model's own context: longer prompts are rare and slow


def prompt_token_limit(model_config, requested: int | None = None) -> int:
    """The most tokens one rendered prompt may have: the configured limit, else the model's
    context length capped at DEFAULT_MAX_TOKENS.

    Why a limit at all: one stray 262k-token document in a prompt set would otherwise run
    for minutes (quadratic attention) with only a transformers warning, and its activations
    would dominate nothing useful since measurement reads one position per prompt.
    """
    if requested is not None:
        return int(requested)
    context = None
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(model_config, key, None)
        if isinstance(value, int) and value > 0:
            context = value
            break
    return min(context, DEFAULT_MAX_TOKENS) if context else DEFAULT_MAX_TOKENS


def encode(
    tokenizer,
    prompts: list[str],
    *,
    system: str | None = None,
    fallback_template: bool = False,
    max_tokens: int | None = None,
    truncate: bool = False,
) -> list[EncodedPrompt]:
    """Render and tokenize each prompt, counting the template tokens after its text.

    A chat template writes its own special tokens (BOS included), so templated text is
    tokenized without adding any; the plain fallback text gets the tokenizer's usual ones.
    A prompt that renders to more than `max_tokens` tokens is an error, or with `truncate`
    its own text is cut (keeping its start) until the rendered prompt fits, so the chat
    template around it stays whole.
    """
    encoded = []
    for prompt in prompts:
        item = _encode_one(tokenizer, prompt, system, fallback_template)
        if max_tokens is not None and len(item.ids) > max_tokens:
            if not truncate:
                raise AbliterateError(
                    f"prompt {prompt[:40]!r} is {len(item.ids)} tokens long, more than "
                    f"prompts.max_tokens = {max_tokens}; shorten it, raise the limit, or set "
                    "prompts.truncate: true (CLI --truncate-prompts) to cut it to fit."
                )
            item = _truncated(tokenizer, prompt, system, fallback_template, max_tokens)
        encoded.append(item)
    return encoded


def _encode_one(tokenizer, prompt: str, system: str | None, fallback: bool) -> EncodedPrompt:
    templated = has_chat_template(tokenizer)
    (text,) = render(tokenizer, [prompt], system=system, fallback_template=fallback)
    ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
    if not ids:
        raise AbliterateError(f"prompt {prompt[:40]!r} renders to no tokens.")
    end = text.rfind(prompt)
    tail = 1
    if end >= 0:
        head = text[: end + len(prompt)]
        head_ids = tokenizer(head, add_special_tokens=not templated)["input_ids"]
        tail = max(1, len(ids) - len(head_ids))
    return EncodedPrompt(ids=list(ids), tail=min(tail, len(ids)))


def _truncated(tokenizer, prompt, system, fallback, max_tokens: int) -> EncodedPrompt:
    """The prompt with its text cut at a token boundary so the rendered whole fits."""
    text_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    keep = len(text_ids)
    while keep > 0:
        item = _encode_one(tokenizer, prompt, system, fallback)
        excess = len(item.ids) - max_tokens
        if excess <= 0:
            return item
        keep = min(keep - 1, keep - excess)
        prompt = tokenizer.decode(text_ids[:keep]) if keep > 0 else ""
    raise AbliterateError(
        f"prompts.max_tokens = {max_tokens} leaves no room for a prompt's text after the "
        "chat template; raise the limit."
    )
