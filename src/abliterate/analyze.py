"""Per-index metrics of the refusal direction, and a suggested recipe.

Why these metrics: choosing where to measure and which layers to edit is the decision
that makes or breaks an abliteration. Each column of `layers.tsv` answers one question
about measurement index m (d = mean_target - mean_benign, b = mean_benign):

- `cos_means`: cosine between the class means (1 = the classes look alike there);
- `target_norm`, `benign_norm`, `direction_norm` (|d|);
- `snr` = |d| / max(|mean_target|, |mean_benign|): how large the difference is relative
  to the activations it lives in;
- `purity` = |d - (d.b^)b^| / |d|: the share of d orthogonal to the benign mean (a
  difference that only rescales the benign mean is not a new feature);
- `quality` = snr x purity: a large *and* new difference;
- `cos_prev`, `angle_deg`: cosine to the previous index's direction and the angle it
  turned (a stable direction across consecutive indices is one feature carried along);
- `auroc`: separability of the per-prompt projections onto the index's direction
  (target vs benign), 1 = every target prompt projects higher than every benign one.

Suggestion rule (`suggest_recipe`): among indices m >= max(1, ceil(min_layer_fraction x
L)), take the best-separating ones (AUROC within `AUROC_TOLERANCE` of the best; all of
them when there are no per-prompt projections) and among those the highest quality. The
layers to edit run from the layer that first writes the feature at all (the layer before
the first index whose AUROC is clearly above chance: at least `ONSET_AUROC` and 4 standard
errors above 0.5; without projections, whose quality reaches `ONSET_QUALITY` of the best)
to the last layer: a layer that writes even part of the feature keeps the model refusing
if it is left out (measured on both demo organisms, docs/measure.md), and once a layer has
written the feature every later layer could write it again.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch
import yaml

from . import experts
from .directions import EPS
from .errors import AbliterateError
from .files import write_text_atomic
from .layout import config_int, read_config
from .logs import logger
from .measure import Measurements, check_finite_means, unit_directions

AUROC_TOLERANCE = 0.005
ONSET_AUROC = 0.6
ONSET_SIGMAS = 4.0
ONSET_QUALITY = 0.1

COLUMNS = [
    "measurement",
    "cos_means",
    "target_norm",
    "benign_norm",
    "direction_norm",
    "snr",
    "purity",
    "quality",
    "cos_prev",
    "angle_deg",
    "auroc",
]


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Area under the ROC curve of scores `positive` vs `negative` (ties count one half).

    Computed from ranks (Mann-Whitney U), so it is exact and O(n log n).
    """
    positive = positive.flatten().to(torch.float64)
    negative = negative.flatten().to(torch.float64)
    n_pos, n_neg = positive.numel(), negative.numel()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    scores = torch.cat([positive, negative])
    ranks = pd.Series(scores.numpy()).rank(method="average").to_numpy()
    rank_sum = ranks[:n_pos].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = a.norm(), b.norm()
    if na <= EPS or nb <= EPS:
        return float("nan")
    return float((a @ b) / (na * nb))


def layer_metrics(meas: Measurements) -> pd.DataFrame:
    """One row per measurement index with the metrics described in the module docstring."""
    check_finite_means(meas, meas.meta.get("source_file", "the measurements"))
    target = meas.target_mean.to(torch.float64)
    benign = meas.benign_mean.to(torch.float64)
    units = unit_directions(target, benign)
    has_proj = meas.target_proj.shape[-1] > 0 and meas.benign_proj.shape[-1] > 0
    rows = []
    for m in range(meas.num_indices):
        t, b = target[m], benign[m]
        d = t - b
        d_norm = float(d.norm())
        t_norm, b_norm = float(t.norm()), float(b.norm())
        defined = d_norm > EPS
        snr = d_norm / max(t_norm, b_norm) if max(t_norm, b_norm) > EPS else float("nan")
        if defined and b_norm > EPS:
            b_hat = b / b_norm
            purity = float((d - (d @ b_hat) * b_hat).norm() / d_norm)
        else:
            purity = float("nan")
        cos_prev = _cos(units[m], units[m - 1]) if m > 0 and defined else float("nan")
        angle = (
            math.degrees(math.acos(max(-1.0, min(1.0, cos_prev))))
            if not math.isnan(cos_prev)
            else float("nan")
        )
        separability = (
            auroc(meas.target_proj[m], meas.benign_proj[m])
            if has_proj and defined
            else float("nan")
        )
        rows.append(
            {
                "measurement": m,
                "cos_means": _cos(t, b),
                "target_norm": t_norm,
                "benign_norm": b_norm,
                "direction_norm": d_norm,
                "snr": snr if defined else float("nan"),
                "purity": purity,
                "quality": snr * purity if defined else float("nan"),
                "cos_prev": cos_prev,
                "angle_deg": angle,
                "auroc": separability,
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def direction_similarity(meas: Measurements) -> torch.Tensor:
    """[M, M] cosine similarity between the unit directions of every pair of indices."""
    units = unit_directions(meas.target_mean, meas.benign_mean)
    return units @ units.T


def onset_auroc(n_target: int | None, n_benign: int | None) -> float:
    """The AUROC that counts as clearly above chance for these class sizes.

    Under no separation the AUROC has standard error sqrt((n1 + n2 + 1) / (12 n1 n2));
    an index must beat 0.5 by `ONSET_SIGMAS` of them, and reach `ONSET_AUROC` in any case.
    """
    if not n_target or not n_benign:
        return ONSET_AUROC
    se = math.sqrt((n_target + n_benign + 1) / (12 * n_target * n_benign))
    return max(ONSET_AUROC, 0.5 + ONSET_SIGMAS * se)


def suggest_recipe(
    metrics: pd.DataFrame,
    num_layers: int,
    *,
    min_layer_fraction: float = 0.2,
    scale: float = 1.0,
    counts: tuple[int, int] | None = None,
) -> tuple[dict, str]:
    """The seed-format recipe picked by the rule in the module docstring, and why.

    `counts` (target, benign prompts) sets the chance level of the onset test.
    """
    start = max(1, math.ceil(min_layer_fraction * num_layers))
    candidates = metrics[(metrics.measurement >= start) & metrics.quality.notna()]
    if candidates.empty:
        candidates = metrics[metrics.quality.notna()]
    if candidates.empty:
        raise AbliterateError(
            "the measurements have no index with distinct class means (target and benign "
            "means coincide everywhere); expected measurements of two different prompt sets."
        )
    use_auroc = candidates.auroc.notna().any()
    if use_auroc:
        best_auroc = candidates.auroc.max()
        pool = candidates[candidates.auroc >= best_auroc - AUROC_TOLERANCE]
    else:
        pool = candidates
    chosen = pool.loc[pool.quality.idxmax()]
    measurement = int(chosen.measurement)

    valid = metrics[(metrics.measurement >= 1) & metrics.quality.notna()]
    threshold = onset_auroc(*(counts or (None, None)))
    if use_auroc and (valid.auroc >= threshold).any():
        onset = int(valid[valid.auroc >= threshold].measurement.min())
        onset_reason = f"the first index whose AUROC is clearly above chance, >= {threshold:.3f}"
    else:
        floor = ONSET_QUALITY * valid.quality.max()
        onset = int(valid[valid.quality >= floor].measurement.min())
        onset_reason = f"the first index whose quality reaches {ONSET_QUALITY} of the best"
    first_layer = max(0, min(onset - 1, measurement - 1))
    layers = list(range(first_layer, num_layers))
    recipe = {
        "ablate": [
            {"layer": layer, "measurement": measurement, "scale": scale, "sparsity": 0.0}
            for layer in layers
        ]
    }
    why = "\n".join(
        [
            "Suggested recipe (suggested.yaml), picked by this rule:",
            "",
            f"1. Measurement index: among indices {start}..{num_layers} (min_layer_fraction "
            f"{min_layer_fraction} of {num_layers} layers, never the embeddings), "
            + (
                f"those whose separability (AUROC) is within {AUROC_TOLERANCE} of the best "
                f"({best_auroc:.4f}), "
                if use_auroc
                else "(no per-prompt projections: all of them), "
            )
            + "then the highest quality (snr x purity).",
            f"   -> measurement {measurement}: auroc {chosen.auroc:.4f}, quality {chosen.quality:.4f}, "
            f"snr {chosen.snr:.4f}, purity {chosen.purity:.4f}.",
            f"2. Layers: from the layer that first writes the feature at all (the layer "
            f"before {onset_reason}: index {onset}) to the last layer: a layer left out that "
            "writes part of the feature keeps the model refusing, and any later layer could "
            "write it again.",
            f"   -> layers {layers[0]}..{layers[-1]}, each edited with the direction of "
            f"measurement {measurement} at scale {scale}, sparsity 0.0.",
            "",
            "This is a starting point; the sweep (results/{model}/sweep.tsv) measures refusal "
            "and KL of the alternatives.",
        ]
    )
    return recipe, why


def write_analysis(
    meas: Measurements,
    outdir: str | Path,
    *,
    charts: bool = True,
    min_layer_fraction: float = 0.2,
    title: str | None = None,
    require_experts: bool = False,
    require_attribution: bool = False,
    interventions: tuple[pd.DataFrame, dict[int, dict]] | None = None,
) -> pd.DataFrame:
    """Write layers.tsv, suggested.yaml/.txt and (with `charts`) the PNG plots to `outdir`.

    `require_experts` (the workflow on an MoE model) makes missing router statistics an
    error instead of silently skipping experts.png. `interventions` (the ranked table and
    the recipes of `abliterate.intervene.rank_by_intervention`) makes the suggestion the
    intervention winner's recipe, exactly as it was evaluated, and writes
    interventions.tsv; without it (measurements only) the separability rule suggests.
    Measurements with expert attribution also give experts.tsv and (with `charts`)
    expert_share.png; without it that part is skipped with a log line, unless
    `require_attribution` (the workflow with measure.attribution on) makes it an error.
    """
    from . import plots

    outdir = Path(outdir)
    source = meas.meta.get("source_file", "the measurements")
    if require_experts and not meas.has_router_stats:
        raise AbliterateError(
            f"{source} has no router statistics, but the model is an MoE model; expected "
            "expert counts (was its router module found? see the measure log)."
        )
    if require_attribution:
        experts.require_attribution(meas, source, "the analysis (analysis/experts.tsv)")
    outdir.mkdir(parents=True, exist_ok=True)
    metrics = layer_metrics(meas)
    _write_text(outdir / "layers.tsv", metrics.to_csv(sep="\t", index=False, float_format="%.6g"))
    recipe, why = suggest_recipe(
        metrics,
        meas.num_layers,
        min_layer_fraction=min_layer_fraction,
        counts=(meas.target_proj.shape[-1], meas.benign_proj.shape[-1]),
    )
    if interventions is not None:
        from .intervene import suggest_from_interventions

        table, recipes = interventions
        separability_pick = int(recipe["ablate"][0]["measurement"])
        recipe, why = suggest_from_interventions(table, recipes, separability_pick)
        _write_text(
            outdir / "interventions.tsv", table.to_csv(sep="\t", index=False, float_format="%.6g")
        )
    _write_text(outdir / "suggested.yaml", yaml.safe_dump(recipe, sort_keys=False))
    _write_text(outdir / "suggested.txt", why + "\n")
    if charts:
        name = title or meas.meta.get("model") or "model"
        name = Path(str(name)).name or str(name)
        plots.plot_layer_metrics(metrics, outdir / "layers.png", title=name)
        plots.plot_rotation(
            metrics, direction_similarity(meas), outdir / "rotation.png", title=name
        )
        if meas.has_router_stats:
            routed = (meas.target_router_tokens + meas.benign_router_tokens).nonzero().flatten()
            plots.plot_expert_heatmap(
                expert_rate_difference(meas),
                outdir / "experts.png",
                title=name,
                routed_layers=routed.tolist(),
            )
    if meas.has_attribution:
        table = experts.attribution_table(meas)
        _write_text(
            outdir / "experts.tsv", table.to_csv(sep="\t", index=False, float_format="%.6g")
        )
        if charts:
            plots.plot_expert_share(
                experts.share_matrix(meas),
                outdir / "expert_share.png",
                title=name,
                routed_layers=experts.attributed_layers(meas),
            )
    elif meas.has_router_stats:
        experts.log_skipped(meas)
    logger.info("Wrote analysis of %d measurement indices to %s", meas.num_indices, outdir)
    return metrics


def expert_rate_difference(meas: Measurements) -> torch.Tensor:
    """[L, E] selection rate (share of routed tokens) target minus benign; 0 where unrouted."""

    def rates(counts, tokens):
        return counts.to(torch.float64) / tokens.to(torch.float64).clamp_min(1).unsqueeze(-1)

    return rates(meas.target_expert_counts, meas.target_router_tokens) - rates(
        meas.benign_expert_counts, meas.benign_router_tokens
    )


def checkpoint_is_moe(model_dir: str | Path) -> bool:
    """Whether a model directory's config.json describes routed experts."""
    return (config_int(read_config(model_dir), "num_experts") or 0) > 1


def format_table(metrics: pd.DataFrame) -> str:
    """The metrics as a fixed-width table for the terminal."""
    return metrics.to_string(index=False, float_format=lambda x: f"{x:.4g}")


def _write_text(path: Path, text: str) -> None:
    write_text_atomic(path, text)
