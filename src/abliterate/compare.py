"""Comparing two checkpoints of one architecture: what an edit changed, and what it did.

Why a module of its own: after an export a person asks two questions, "which weights moved,
and by how much?" and "does it answer differently now?". The first is read from the two
checkpoints tensor by tensor through their headers (a 200 GB pair never sits in memory
at once); the second loads one model at a time and answers a prompt file greedily, so the
two columns of answers differ only because the weights do.

Per layer and component the weight part reports

- `rel_change` = ||W_B - W_A|| / ||W_A|| (Frobenius norms over all of the group's tensors,
  so the 128 experts of a layer are one row),
- `along_A` / `along_B` = ||r^T W|| before and after: the size of what the component
  writes into (or, for readers, reads from) the residual stream along the unit direction
  r, contracting the tensor's hidden axis. An edit at scale 1 takes `along_B` to ~0.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AbliterateError

COLUMNS = ("layer", "component", "tensors", "rel_change", "along_A", "along_B")


@dataclass(frozen=True)
class ComponentChange:
    """One (layer, component) group of tensors compared between checkpoints A and B."""

    layer: int | None  # None for global tensors (the embedding)
    component: str
    tensors: int
    rel_change: float
    along_a: float | None  # None without a direction for this layer
    along_b: float | None

    def row(self) -> dict:
        return {
            "layer": "" if self.layer is None else self.layer,
            "component": self.component,
            "tensors": self.tensors,
            "rel_change": self.rel_change,
            "along_A": "" if self.along_a is None else self.along_a,
            "along_B": "" if self.along_b is None else self.along_b,
        }


# --------------------------------------------------------------------------- directions


def plan_directions(
    plan_path: str | Path, model_dir: str | Path, layout=None
) -> dict[int | None, torch.Tensor]:
    """layer -> the unit direction a plan edits that layer with (None: the embedding).

    The plan must belong to `model_dir`: every key it edits is a target there, with the
    same shape, and its directions have the model's hidden size.
    """
    from .layout import inspect_checkpoint
    from .recipe import Plan

    if not Path(plan_path).is_file():
        raise AbliterateError(f"{plan_path}: plan file not found (CLI --plan).")
    plan = Plan.load(plan_path)
    layout = layout or inspect_checkpoint(model_dir)
    by_key = {t.key: t for t in layout.targets()}
    directions: dict[int | None, torch.Tensor] = {}
    for entry in plan.entries:
        target = by_key.get(entry.key)
        if target is None or tuple(target.shape) != tuple(entry.shape):
            raise AbliterateError(
                f"{plan_path}: edits {entry.key!r} with shape {list(entry.shape)}, which "
                f"{model_dir} does not have; the plan was made for another model."
            )
        if entry.direction.numel() != layout.hidden_size:
            raise AbliterateError(
                f"{plan_path}: directions have {entry.direction.numel()} components but "
                f"{model_dir} has hidden size {layout.hidden_size}; the plan was made for "
                "another model."
            )
        directions.setdefault(entry.layer, entry.direction.to(torch.float32))
    return directions


def measurement_direction(
    measurements_path: str | Path, index: int, model_dir: str | Path, layout=None
) -> torch.Tensor:
    """The unit direction at measurement `index` of a measurements file (float32)."""
    from .directions import direction
    from .layout import inspect_checkpoint
    from .measure import load_measurements

    if not Path(measurements_path).is_file():
        raise AbliterateError(f"{measurements_path}: measurements file not found.")
    hidden_size = (layout or inspect_checkpoint(model_dir)).hidden_size
    meas = load_measurements(measurements_path)
    if meas.hidden_size != hidden_size:
        raise AbliterateError(
            f"{measurements_path}: directions have {meas.hidden_size} components but the "
            f"model's hidden size is {hidden_size}; they were measured on another model."
        )
    if not 0 <= index < meas.num_indices:
        raise AbliterateError(
            f"{measurements_path}: measurement index {index} is out of range (CLI "
            f"--measurement); expected 0..{meas.num_indices - 1}."
        )
    return direction(meas, index).to(torch.float32)


# --------------------------------------------------------------------------- weights


def along_norm(weight: torch.Tensor, r: torch.Tensor, hidden_axis: int) -> float:
    """||r^T W||: the norm of W contracted with unit `r` over its hidden axis."""
    moved = weight.to(torch.float32).movedim(hidden_axis, 0)
    return float(torch.linalg.vector_norm(torch.tensordot(r, moved, dims=([0], [0]))))


def _check_pair(model_a: Path, model_b: Path, tensors_a: dict, tensors_b: dict, keys) -> None:
    for key in keys:
        info_b = tensors_b.get(key)
        if info_b is None:
            raise AbliterateError(
                f"{model_b}: has no tensor {key!r}, which {model_a} has; compare two "
                "checkpoints of the same architecture."
            )
        if tuple(info_b.shape) != tuple(tensors_a[key].shape):
            raise AbliterateError(
                f"{model_b}: tensor {key!r} has shape {list(info_b.shape)} but "
                f"{model_a} has {list(tensors_a[key].shape)}; compare two checkpoints of the "
                "same architecture."
            )


def weight_changes(
    model_a: str | Path,
    model_b: str | Path,
    directions: dict[int | None, torch.Tensor] | torch.Tensor | None = None,
    layout=None,
) -> list[ComponentChange]:
    """Per (layer, component): relative weight change and the part along the direction.

    `directions` is one direction for every layer, a dict layer -> direction (from a
    plan; layers it does not name get no `along` columns), or None. Tensors are read one
    pair at a time from the two checkpoints' shards. `layout` is A's (inspected if None).
    """
    from .layout import inspect_checkpoint
    from .shards import read_checkpoint, read_tensor

    model_a, model_b = Path(model_a), Path(model_b)
    for path in (model_a, model_b):
        if not path.is_dir():
            raise AbliterateError(f"{path}: model directory not found.")
    layout = layout or inspect_checkpoint(model_a)
    tensors_a = read_checkpoint(model_a)
    tensors_b = read_checkpoint(model_b)
    groups: dict[tuple, list] = {}
    for target in layout.globals:
        groups.setdefault((None, target.component), []).append(target)
    for entry in layout.layers:
        for target in entry.targets:
            groups.setdefault((entry.index, target.component), []).append(target)
    _check_pair(model_a, model_b, tensors_a, tensors_b, [t.key for g in groups.values() for t in g])

    def direction_for(layer):
        if directions is None:
            return None
        if isinstance(directions, torch.Tensor):
            return directions
        return directions.get(layer)

    handles: dict[Path, object] = {}

    def read(model: Path, info):
        path = model / info.shard
        if path not in handles:
            handles[path] = open(path, "rb")  # noqa: SIM115 - closed below
        return read_tensor(handles[path], info).to(torch.float32)

    changes = []
    try:
        for (layer, component), targets in groups.items():
            r = direction_for(layer)
            base = delta = along_a = along_b = 0.0
            for target in targets:
                weight_a = read(model_a, tensors_a[target.key])
                weight_b = read(model_b, tensors_b[target.key])
                base += float(torch.linalg.vector_norm(weight_a)) ** 2
                delta += float(torch.linalg.vector_norm(weight_b - weight_a)) ** 2
                if r is not None:
                    along_a += along_norm(weight_a, r, target.hidden_axis) ** 2
                    along_b += along_norm(weight_b, r, target.hidden_axis) ** 2
            changes.append(
                ComponentChange(
                    layer=layer,
                    component=component,
                    tensors=len(targets),
                    rel_change=math.sqrt(delta) / math.sqrt(base) if base else 0.0,
                    along_a=math.sqrt(along_a) if r is not None else None,
                    along_b=math.sqrt(along_b) if r is not None else None,
                )
            )
    finally:
        for handle in handles.values():
            handle.close()
    return changes


def changes_table(changes: Sequence[ComponentChange]) -> str:
    """The weight comparison as an aligned terminal table (changed groups marked with *)."""

    def fmt(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    rows = [[fmt(v) for v in change.row().values()] for change in changes]
    rows = [[c if c else "-" for c in row] for row in rows]
    header = list(COLUMNS)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    for change, row in zip(changes, rows, strict=True):
        line = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
        lines.append((line + ("  *" if change.rel_change > 0 else "")).rstrip())
    changed = sum(1 for c in changes if c.rel_change > 0)
    lines.append(f"{changed} of {len(changes)} layer/component groups changed (*)")
    return "\n".join(lines) + "\n"


def _write_tsv(path: str | Path, header: Sequence[str], rows: Sequence[Sequence]) -> Path:
    """A TSV written beside its final name and renamed, so a partial file never exists."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    tmp.replace(path)
    return path


def write_changes_tsv(changes: Sequence[ComponentChange], path: str | Path) -> Path:
    return _write_tsv(path, COLUMNS, [list(c.row().values()) for c in changes])


def plot_changes(changes: Sequence[ComponentChange], path: str | Path, *, title: str) -> None:
    """Two panels over the layers: relative change, and ||r^T W|| before (A) and after (B)."""
    from .plots import _save, plt

    layered = [c for c in changes if c.layer is not None]
    components = list(dict.fromkeys(c.component for c in layered))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for index, component in enumerate(components):
        rows = [c for c in layered if c.component == component]
        color = f"C{index % 10}"
        layers = [c.layer for c in rows]
        axes[0].plot(layers, [c.rel_change for c in rows], "o-", color=color, label=component)
        with_direction = [c for c in rows if c.along_a is not None]
        if with_direction:
            x = [c.layer for c in with_direction]
            axes[1].plot(x, [c.along_a for c in with_direction], "o--", color=color,
                         label=f"{component} (A)")  # fmt: skip
            axes[1].plot(x, [c.along_b for c in with_direction], "s-", color=color,
                         label=f"{component} (B)")  # fmt: skip
    axes[0].set_title("Relative weight change ||B - A|| / ||A||")
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("relative change")
    axes[1].set_title("Component along the direction ||r^T W||")
    axes[1].set_xlabel("layer")
    axes[1].set_ylabel("norm")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


# --------------------------------------------------------------------------- answers


def greedy_answers(
    model_dir: str | Path,
    prompts: Sequence[str],
    *,
    load=None,
    prompt_options=None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> list[str]:
    """One model's greedy answers to `prompts` (loaded, answered, released)."""
    from .model import decode, greedy_generate, load_model
    from .prompts import PromptOptions

    model, tokenizer, _ = load_model(model_dir, load)
    encoded = (prompt_options or PromptOptions()).encode(tokenizer, list(prompts))
    tokens = greedy_generate(
        model,
        tokenizer,
        [e.ids for e in encoded],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    del model
    return decode(tokenizer, tokens)


def side_by_side(
    model_a: str | Path, model_b: str | Path, prompts: Sequence[str], **options
) -> list[tuple[str, str, str]]:
    """(prompt, answer of A, answer of B); one model in memory at a time."""
    answers_a = greedy_answers(model_a, prompts, **options)
    answers_b = greedy_answers(model_b, prompts, **options)
    return list(zip(prompts, answers_a, answers_b, strict=True))


def answers_text(rows: Sequence[tuple[str, str, str]]) -> str:
    """The answers for the terminal: each prompt, then A's and B's answer under it."""
    lines = []
    for prompt, answer_a, answer_b in rows:
        lines += [f"prompt: {prompt}", f"  A: {answer_a}", f"  B: {answer_b}", ""]
    return "\n".join(lines)


def write_answers_tsv(rows: Sequence[tuple[str, str, str]], path: str | Path) -> Path:
    clean = [[" ".join(str(v).split()) for v in row] for row in rows]
    return _write_tsv(path, ("prompt", "answer_A", "answer_B"), clean)
