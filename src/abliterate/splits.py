"""Seeded train / validation / test splits of the prompt sets.

Why three splits: a search that picks the best of many recipes on the prompts it reports
overstates how well the winner works. Trials are scored on validation prompts; the chosen
recipe is scored once on test prompts the search never read; the direction is measured on
the train prompts.

Which file becomes which split (per class, `prompts.{target,benign}`):

- `train`, `validation` and `test` all given: used as they are;
- `train` and `test` given: the test file is split into validation and test, in the
  proportion of `prompts.fractions[1]` to `[2]` (default 20:20, so half and half);
- only `train` given: it is split `prompts.fractions` (default 60/20/20) into all three.

The split is a seeded shuffle (`prompts.seed`), so a rerun gives the same prompts.
Splits are written as JSON lists of strings, which `abliterate.prompts.load_prompts`
reads whatever the source format was.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

from .errors import AbliterateError
from .files import write_text_atomic
from .prompts import load_prompts

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if (
        len(fractions) != 3
        or any(isinstance(f, bool) or not isinstance(f, (int, float)) for f in fractions)
        or any(f <= 0 for f in fractions)
        or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6)
    ):
        raise AbliterateError(
            f"prompts.fractions: expected three positive fractions (train, validation, test) "
            f"that sum to 1, got {list(fractions)!r}."
        )
    return tuple(float(f) for f in fractions)


def split_list(items: Sequence[str], fractions: Sequence[float], seed: int) -> list[list[str]]:
    """Shuffle `items` (seeded) and cut them into len(fractions) consecutive parts.

    Every part gets at least one item (when there are enough), the rounding remainder
    goes to the first part.
    """
    items = list(items)
    if len(items) < len(fractions):
        raise AbliterateError(
            f"{len(items)} prompt(s) cannot be split into {len(fractions)} non-empty parts."
        )
    order = random.Random(seed).sample(items, len(items))
    total = sum(fractions)
    sizes = [max(1, math.floor(len(items) * f / total)) for f in fractions]
    sizes[0] = len(items) - sum(sizes[1:])
    parts, start = [], 0
    for size in sizes:
        parts.append(order[start : start + size])
        start += size
    return parts


def split_prompt_sets(
    train: str | Path | None,
    validation: str | Path | None,
    test: str | Path | None,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    field: str | None = None,
    dataset_split: str = "train",
    cls: str = "target",
) -> dict[str, list[str]]:
    """The three prompt lists of one class from whichever files the config names."""
    fractions = check_fractions(fractions)
    if train is None:
        raise AbliterateError(f"prompts.{cls}.train: a prompt file is required.")

    def read(source):
        return load_prompts(source, field=field, split=dataset_split)

    if validation is not None and test is not None:
        return {"train": read(train), "validation": read(validation), "test": read(test)}
    if validation is not None:
        raise AbliterateError(
            f"prompts.{cls}.validation is set but prompts.{cls}.test is not; give both or neither."
        )
    if test is not None:
        held_out = split_list(read(test), fractions[1:], seed)
        return {"train": read(train), "validation": held_out[0], "test": held_out[1]}
    return dict(zip(SPLITS, split_list(read(train), fractions, seed), strict=True))


def write_splits(splits: dict[str, list[str]], outputs: dict[str, str | Path]) -> None:
    """Each named split as a JSON list of strings (written atomically)."""
    for name, path in outputs.items():
        write_text_atomic(path, json.dumps(splits[name], indent=0, ensure_ascii=False) + "\n")


def split_to_files(outputs: dict[str, str | Path], **kwargs) -> dict[str, list[str]]:
    """`split_prompt_sets(**kwargs)` written to `outputs` (split name -> path)."""
    splits = split_prompt_sets(**kwargs)
    write_splits(splits, outputs)
    return splits
