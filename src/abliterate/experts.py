"""Expert attribution: which routed experts write the refusal direction, and picking them.

Why: on an MoE model the routed experts are most of the MLP writers, and editing all of
them is a large change while editing none can leave the refusal in place. Measurement
records, per class, each routed expert's mean weighted write (gate weight x expert output)
per selection and how often it is selected (`abliterate.measure`). Here those become the
expert's mean contribution to the residual per routed token,

    c_class[e] = (selections[e] / routed tokens) x mean write[e],

projected onto a unit direction r: `target_proj`, `benign_proj`, and their difference,
the `signal`, is the expert's part of the target-minus-benign difference along r (summed
over the experts it is what the routed experts add to the class difference of a routed
token). An expert's `share` is its signal over the sum of the layer's positive signals;
experts are ranked by signal. `select_experts` turns a ranking into a subset: the `top_k`
highest positive signals, or the fewest top experts whose positive signal reaches a
`coverage` fraction of the layer's total.

The analysis ranks along each layer's own output direction (measurement index layer + 1);
a recipe's `expert_subset: auto:K` / `coverage:F` ranks along the direction the entry
edits with, which is the same when its measurement is layer + 1.
"""

from __future__ import annotations

import pandas as pd
import torch

from .directions import EPS
from .errors import AbliterateError
from .logs import logger

COLUMNS = [
    "layer",
    "expert",
    "target_freq",
    "benign_freq",
    "target_gate",
    "benign_gate",
    "target_proj",
    "benign_proj",
    "signal",
    "share",
    "rank",
]


def attributed_layers(meas) -> list[int]:
    """The layers with recorded expert writes (MoE layers that routed at least one token)."""
    if not getattr(meas, "has_attribution", False):
        return []
    selected = meas.target_expert_selections.sum(-1) + meas.benign_expert_selections.sum(-1)
    return [int(i) for i in selected.nonzero().flatten()]


def _frequency(meas, cls: str, layer: int) -> torch.Tensor:
    """[E] selections per routed token of `cls` at `layer` (summing to top-k)."""
    selections = getattr(meas, f"{cls}_expert_selections")[layer].to(torch.float64)
    tokens = getattr(meas, f"{cls}_router_tokens")[layer].to(torch.float64)
    return selections / tokens.clamp_min(1)


def expert_projections(
    meas, layer: int, direction: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """([E] target, [E] benign) mean contribution per routed token along `direction`."""
    r = direction.to(torch.float64).flatten()
    r = r / r.norm().clamp_min(EPS)
    out = []
    for cls in ("target", "benign"):
        write = getattr(meas, f"{cls}_expert_write")[layer].to(torch.float64)
        out.append(_frequency(meas, cls, layer) * (write @ r))
    return out[0], out[1]


def expert_signal(meas, layer: int, direction: torch.Tensor) -> torch.Tensor:
    """[E] target minus benign contribution along `direction` (see the module docstring)."""
    target, benign = expert_projections(meas, layer, direction)
    return target - benign


def layer_direction(meas, layer: int) -> torch.Tensor | None:
    """The unit direction at the output of `layer` (index layer + 1), None if undefined."""
    diff = (meas.target_mean[layer + 1] - meas.benign_mean[layer + 1]).to(torch.float64)
    norm = diff.norm()
    return diff / norm if norm > EPS else None


def shares(signal: torch.Tensor) -> torch.Tensor:
    """Each expert's signal over the sum of the positive signals (NaN if none is positive)."""
    positive = float(signal.clamp_min(0).sum())
    if positive <= EPS:
        return torch.full_like(signal, float("nan"))
    return signal / positive


def attribution_table(meas) -> pd.DataFrame:
    """One row per attributed layer and routed expert (columns `COLUMNS`), best first per
    layer; empty when the measurements hold no expert writes."""
    rows = []
    for layer in attributed_layers(meas):
        r = layer_direction(meas, layer)
        if r is None:
            continue
        target, benign = expert_projections(meas, layer, r)
        signal = target - benign
        share = shares(signal)
        order = torch.argsort(signal, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(1, len(order) + 1)
        freq_t, freq_b = _frequency(meas, "target", layer), _frequency(meas, "benign", layer)
        for e in order.tolist():
            rows.append(
                {
                    "layer": layer,
                    "expert": e,
                    "target_freq": float(freq_t[e]),
                    "benign_freq": float(freq_b[e]),
                    "target_gate": _gate(meas, "target", layer, e),
                    "benign_gate": _gate(meas, "benign", layer, e),
                    "target_proj": float(target[e]),
                    "benign_proj": float(benign[e]),
                    "signal": float(signal[e]),
                    "share": float(share[e]),
                    "rank": int(rank[e]),
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS)


def _gate(meas, cls: str, layer: int, expert: int) -> float:
    """Mean gate weight when selected; NaN for an expert this class never selected."""
    if int(getattr(meas, f"{cls}_expert_selections")[layer, expert]) == 0:
        return float("nan")
    return float(getattr(meas, f"{cls}_expert_gate")[layer, expert])


def share_matrix(meas, num_experts: int | None = None) -> torch.Tensor:
    """[L, E] share per layer and expert (NaN for layers without attribution)."""
    layers = meas.target_expert_write.shape[0]
    experts = num_experts or meas.target_expert_write.shape[1]
    matrix = torch.full((layers, experts), float("nan"), dtype=torch.float64)
    for layer in attributed_layers(meas):
        r = layer_direction(meas, layer)
        if r is not None:
            matrix[layer] = shares(expert_signal(meas, layer, r))
    return matrix


def select_experts(
    signal: torch.Tensor, *, top_k: int | None = None, coverage: float | None = None
) -> list[int]:
    """The experts to edit, ascending: the `top_k` largest positive signals, or the fewest
    top-ranked experts whose positive signal reaches `coverage` of the positive total.
    Experts whose signal is not positive never count: they do not write the direction
    the target prompts add (an empty list when no expert does)."""
    if (top_k is None) == (coverage is None):
        raise ValueError("give exactly one of top_k and coverage")
    order = torch.argsort(signal, descending=True, stable=True).tolist()
    positive = [e for e in order if float(signal[e]) > EPS]
    if top_k is not None:
        return sorted(positive[:top_k])
    total = sum(float(signal[e]) for e in positive)
    chosen, running = [], 0.0
    for e in positive:
        if running >= coverage * total * (1 - 1e-12):
            break
        chosen.append(e)
        running += float(signal[e])
    return sorted(chosen)


def require_attribution(meas, source: str, what: str) -> None:
    """Raise one sentence when `what` needs expert writes that `meas` lacks."""
    if not getattr(meas, "has_attribution", False):
        raise AbliterateError(
            f"{what} needs expert attribution, but {source} has none (measured before "
            "attribution existed, with measure.attribution false, or on a dense model); "
            "re-run `abliterate measure` on the MoE model."
        )


def log_skipped(meas) -> None:
    """The one log line for measurements without attribution (older files)."""
    source = meas.meta.get("source_file", "the measurements")
    logger.info(
        "Expert attribution skipped: %s holds no per-expert writes (older file or "
        "measure.attribution false).",
        source,
    )
