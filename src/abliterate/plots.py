"""Every matplotlib figure of the workflow: one function per figure, each writes one PNG.

Why one module: figures share a look (size, dpi, titles, labelled axes) and the headless
backend, and the report captions in workflow/report/ describe them one by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .files import replacing  # noqa: E402
from .grid import SWEEP_KEYS  # noqa: E402

DPI = 120


def _save(fig, path: str | Path) -> None:
    """Write the figure as PNG through a temp file + rename, then free it."""
    fig.tight_layout()
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=DPI)
    finally:
        plt.close(fig)


def plot_layer_metrics(metrics, path: str | Path, *, title: str = "model") -> None:
    """Four panels per measurement index: norms, snr/purity/quality, AUROC, cosine of means."""
    m = metrics["measurement"].to_numpy()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    ax = axes[0, 0]
    ax.plot(m, metrics["target_norm"], "o-", label="|target mean|")
    ax.plot(m, metrics["benign_norm"], "s-", label="|benign mean|")
    ax.plot(m, metrics["direction_norm"], "^-", label="|target - benign|")
    ax.set_title("Mean norms")
    ax.set_ylabel("L2 norm")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    ax.plot(m, metrics["snr"], "o-", label="signal-to-noise")
    ax.plot(m, metrics["purity"], "s-", label="purity (orthogonal to benign)")
    ax.plot(m, metrics["quality"], "^-", label="quality = snr x purity", linewidth=2)
    ax.set_title("Direction quality")
    ax.set_ylabel("ratio")
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    ax.plot(m, metrics["auroc"], "o-", color="tab:green")
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_ylim(0.4, 1.02)
    ax.set_title("Separability of per-prompt projections")
    ax.set_ylabel("AUROC (target vs benign)")
    ax = axes[1, 1]
    ax.plot(m, metrics["cos_means"], "o-", color="tab:purple")
    ax.set_title("Similarity of the class means")
    ax.set_ylabel("cosine(target mean, benign mean)")
    for ax in axes[1]:
        ax.set_xlabel("measurement index (residual entering layer m)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.set_xticks(_ticks(m))
    fig.suptitle(f"{title}: refusal direction per measurement index")
    _save(fig, path)


def plot_rotation(metrics, similarity, path: str | Path, *, title: str = "model") -> None:
    """Angle between consecutive directions, and the cosine matrix of all index pairs."""
    m = metrics["measurement"].to_numpy()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    left.bar(m, metrics["angle_deg"].fillna(0.0), color="tab:orange")
    left.set_title("Rotation from the previous index")
    left.set_xlabel("measurement index")
    left.set_ylabel("angle to previous direction (degrees)")
    left.set_xticks(_ticks(m))
    left.grid(alpha=0.3, axis="y")
    sim = np.asarray(similarity, dtype=float)
    image = right.imshow(sim, vmin=-1, vmax=1, cmap="RdBu_r", origin="lower")
    right.set_title("Cosine between directions")
    right.set_xlabel("measurement index")
    right.set_ylabel("measurement index")
    right.set_xticks(_ticks(m))
    right.set_yticks(_ticks(m))
    fig.colorbar(image, ax=right, label="cosine similarity")
    fig.suptitle(f"{title}: how the direction rotates through the layers")
    _save(fig, path)


def plot_expert_heatmap(
    difference, path: str | Path, *, title: str = "model", routed_layers=None
) -> None:
    """Layer x expert heatmap of selection rate, target minus benign (MoE only).

    Layers not in `routed_layers` (dense layers without a router) are drawn grey.
    """
    diff = np.asarray(difference, dtype=float)
    limit = max(float(np.abs(diff).max()), 1e-6)
    if routed_layers is not None:
        dense = np.ones(diff.shape[0], dtype=bool)
        dense[list(routed_layers)] = False
        diff = np.ma.masked_array(diff, mask=np.repeat(dense[:, None], diff.shape[1], axis=1))
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="lightgrey")
    width = min(20, 7 + 0.25 * diff.shape[1])
    height = min(14, 3 + 0.3 * diff.shape[0])
    fig, ax = plt.subplots(figsize=(width, height))
    image = ax.imshow(diff, aspect="auto", cmap=cmap, vmin=-limit, vmax=limit, origin="lower")
    ax.set_xlabel("routed expert")
    ax.set_ylabel("decoder layer")
    ax.set_yticks(_ticks(np.arange(diff.shape[0])))
    ax.set_xticks(_ticks(np.arange(diff.shape[1])))
    fig.colorbar(image, ax=ax, label="selection rate: target - benign")
    ax.set_title(
        f"{title}: expert selection, target minus benign\n"
        "red = chosen more for target prompts, blue = for benign, grey = dense layer"
    )
    _save(fig, path)


def plot_expert_share(share, path: str | Path, *, title: str = "model", routed_layers=None):
    """Layer x expert heatmap of each expert's share of the layer's refusal signal (the
    target-minus-benign write along the layer's direction, `abliterate.experts`).

    NaN cells (dense layers, layers with no positive signal) are drawn grey.
    """
    values = np.asarray(share, dtype=float)
    if routed_layers is not None:
        dense = np.ones(values.shape[0], dtype=bool)
        dense[list(routed_layers)] = False
        values[dense] = np.nan
    finite = values[np.isfinite(values)]
    limit = max(float(np.abs(finite).max()) if finite.size else 0.0, 1e-6)
    masked = np.ma.masked_invalid(values)
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="lightgrey")
    width = min(20, 7 + 0.25 * values.shape[1])
    height = min(14, 3 + 0.3 * values.shape[0])
    fig, ax = plt.subplots(figsize=(width, height))
    image = ax.imshow(masked, aspect="auto", cmap=cmap, vmin=-limit, vmax=limit, origin="lower")
    ax.set_xlabel("routed expert")
    ax.set_ylabel("decoder layer")
    ax.set_yticks(_ticks(np.arange(values.shape[0])))
    ax.set_xticks(_ticks(np.arange(values.shape[1])))
    fig.colorbar(image, ax=ax, label="share of the layer's refusal signal")
    ax.set_title(
        f"{title}: which experts write the refusal direction\n"
        "red = writes it for target prompts (share of the positive signal), grey = no data"
    )
    _save(fig, path)


def _ticks(values, most: int = 24):
    values = np.asarray(values)
    step = max(1, int(np.ceil(len(values) / most)))
    return values[::step]


# ---- sweep figures (evaluation) --------------------------------------------------------


def _sweep_label(row, varying: list[str]) -> str:
    """A short point label naming only the swept parameters that vary."""
    short = {
        "scale": "s",
        "sparsity": "p",
        "measurement": "m",
        "layers": "L",
        "components": "c",
        "norm_preserve": "np",
        "experts": "e",
        "gate_scale": "g",
        "router_suppress": "rs",
    }
    parts = []
    for key in varying:
        value = row[key]
        if key == "norm_preserve":
            value = int(str(value) in ("True", "true", "1"))
        value = "sug" if value == "suggested" else value
        parts.append(
            f"{short[key]}-{value}"
            if key in ("components", "experts", "router_suppress")
            else f"{short[key]}{value}"
        )
    return " ".join(parts) or str(row["variant"])


def pareto_front(kl: Sequence[float], refusal: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both KL and refusal rate (lower is
    better), ordered by KL: the lower-left frontier of the sweep."""
    order = sorted(range(len(kl)), key=lambda i: (kl[i], refusal[i]))
    front, lowest = [], float("inf")
    for i in order:
        if refusal[i] < lowest:
            front.append(i)
            lowest = refusal[i]
    return front


def _variant_key(ax, variants, varying: list[str], x, y, best: str | None) -> None:
    """The side panel naming each numbered point: its swept values, refusal rate and KL."""
    lines = []
    for i, row in variants.iterrows():
        mark = "*" if row["variant"] == best else " "
        lines.append(f"{mark}{i + 1:>2} {_sweep_label(row, varying):<24} {y[i]:.2f} {x[i]:.3g}")
    ax.axis("off")
    ax.set_title("variants: refusal, KL", fontsize=9, loc="left")
    ax.text(
        0.0,
        1.0,
        "\n".join(lines),
        va="top",
        ha="left",
        family="monospace",
        fontsize=7.5 if len(lines) <= 24 else 6,
        transform=ax.transAxes,
    )


def _number_points(ax, x, y) -> None:
    """Number the points (variants at the same spot share one label)."""
    spots: dict[tuple[float, float], list[int]] = {}
    for i in range(len(x)):
        spots.setdefault((round(x[i], 12), round(y[i], 6)), []).append(i + 1)
    for (px, py), numbers in spots.items():
        ax.annotate(
            ",".join(map(str, numbers)),
            (px, py),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )


def _kl_axis(ax, x, kl_column: str) -> None:
    """Symmetric-log KL axis from 0, linear below half the smallest positive KL."""
    linthresh = max(1e-4, float(x[x > 0].min()) / 2 if (x > 0).any() else 1e-4)
    ax.set_xscale("symlog", linthresh=linthresh)
    ax.set_xlim(left=0, right=max(float(x.max()) * 2, linthresh * 10))
    ax.set_xlabel(f"KL(base || edited), {kl_column.removeprefix('kl_').replace('_', '-')} (nats)")


def plot_pareto(
    table,
    path: str | Path,
    *,
    kl_column: str = "kl_first_token",
    best: str | None = None,
    max_refusal_rate: float | None = None,
) -> None:
    """Refusal rate against KL from the base model, one labelled point per variant.

    The lower-left frontier (no other variant is better on both) is drawn as a line; the
    selected variant is starred and the refusal-rate target drawn as a dashed line.
    """
    variants = table[table["variant"] != "base"].reset_index(drop=True)
    keys = [k for k in SWEEP_KEYS if k in variants]
    varying = [k for k in keys if variants[k].astype(str).nunique() > 1]
    fig, (ax, key) = plt.subplots(
        1, 2, figsize=(11.5, 5.8), gridspec_kw={"width_ratios": [2.6, 1.4]}
    )
    x = variants[kl_column].astype(float)
    y = variants["refusal_rate"].astype(float)
    ax.scatter(x, y, s=36, color="tab:blue", zorder=3, label="variants")
    front = pareto_front(list(x), list(y))
    ax.plot(x[front], y[front], color="tab:blue", alpha=0.4, zorder=2, label="Pareto front")
    _number_points(ax, x, y)
    _variant_key(key, variants, varying, x, y, best)
    base = table[table["variant"] == "base"]
    if not base.empty:
        ax.scatter(
            [0.0],
            [float(base["refusal_rate"].iloc[0])],
            marker="s",
            color="gray",
            s=50,
            zorder=3,
            label="base model",
            clip_on=False,
        )
    if best is not None and best in set(variants["variant"]):
        i = int(variants.index[variants["variant"] == best][0])
        ax.scatter([x[i]], [y[i]], marker="*", s=260, color="tab:red", zorder=4, label="selected")
    if max_refusal_rate is not None:
        ax.axhline(
            max_refusal_rate,
            color="tab:red",
            linestyle="--",
            linewidth=1,
            label=f"refusal target {max_refusal_rate:g}",
        )
    _kl_axis(ax, x, kl_column)
    ax.set_ylabel("refusal rate on held-out target prompts")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("Sweep: refusal rate vs divergence from the base model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    _save(fig, path)


def plot_sweep_heatmap(
    table,
    path: str | Path,
    *,
    axes: list[str],
    best: str | None = None,
    kl_column: str = "kl_first_token",
) -> None:
    """Refusal rate and KL over a two-parameter grid (one parameter: a single row).

    Parameters other than the two shown are held at the selected variant's values, so
    the grid is a slice through the best point rather than an average over unlike runs.
    """
    variants = table[table["variant"] != "base"].copy()
    keys = [k for k in SWEEP_KEYS if k in variants]
    if best is not None and best in set(variants["variant"]):
        anchor = variants[variants["variant"] == best].iloc[0]
        for key in keys:
            if key not in axes:
                value = anchor[key]
                if value is None or value != value:  # unset (e.g. gate_scale: the recipe's)
                    variants = variants[variants[key].isna()]
                else:
                    variants = variants[variants[key].astype(str) == str(value)]
    row_key = axes[0] if axes else None
    col_key = axes[1] if len(axes) > 1 else None

    def levels(key):
        values = list(variants[key].astype(str).unique())
        try:
            return sorted(values, key=float)
        except ValueError:
            return sorted(values)

    rows = levels(row_key) if row_key else ["all"]
    cols = levels(col_key) if col_key else ["all"]
    kl_title = f"KL from base ({kl_column.removeprefix('kl_').replace('_', '-')})"
    # refusal rate on its full 0-1 scale; KL from 0 (no change) to the largest value seen
    metrics = [("refusal_rate", "refusal rate", "Reds", 1.0), (kl_column, kl_title, "Blues", None)]
    fig, panels = plt.subplots(1, 2, figsize=(4 + 1.6 * len(cols) * 2, 2.2 + 0.7 * len(rows)))
    for ax, (metric, title, cmap, top) in zip(panels, metrics, strict=True):
        grid = np.full((len(rows), len(cols)), np.nan)
        for _, item in variants.iterrows():
            r = rows.index(str(item[row_key])) if row_key else 0
            c = cols.index(str(item[col_key])) if col_key else 0
            grid[r, c] = float(item[metric])
        top = top if top is not None else max(float(np.nanmax(grid)), 1e-9)
        image = ax.imshow(grid, cmap=cmap, aspect="auto", vmin=0.0, vmax=top)
        fig.colorbar(image, ax=ax, shrink=0.8)
        for r in range(len(rows)):
            for c in range(len(cols)):
                if not np.isnan(grid[r, c]):
                    dark = image.norm(grid[r, c]) > 0.6
                    ax.text(
                        c,
                        r,
                        f"{grid[r, c]:.3g}",
                        ha="center",
                        va="center",
                        fontsize=9,
                        color="white" if dark else "black",
                    )
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel(col_key or "")
        ax.set_ylabel(row_key or "")
        ax.set_title(title)
    fig.suptitle(
        "Sweep grid"
        + (" (other parameters at the selected variant's values)" if len(keys) > len(axes) else ""),
        fontsize=10,
    )
    _save(fig, path)


def plot_routing_shift(table, per_layer: dict, path: str | Path, *, best: str | None) -> None:
    """How far each variant moves the expert routing (MoE models; `abliterate.routing`).

    `per_layer` is {variant: {"benign" | "target": {layer: {"kl", "topk_changed"}}}}.

    Left: the selected variant's routing KL per MoE layer on benign and target prompts, with
    the share of top-k choices changed on a second axis, so the layers an edit re-routes
    stand out. Right: every variant's mean routing KL on target prompts against its refusal
    rate, to show whether the variants that remove refusals do it by re-routing.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 4.8))
    shift = per_layer.get(best or "", {})
    styles = {"benign": ("tab:blue", "-"), "target": ("tab:red", "--")}
    changed_axis = left.twinx()
    for cls, (color, style) in styles.items():
        values = shift.get(cls, {})  # {layer (int): {"kl", "topk_changed"}}
        layers = sorted(values)
        if not layers:
            continue
        kl = [values[i]["kl"] for i in layers]
        changed = [values[i]["topk_changed"] for i in layers]
        left.plot(layers, kl, style, color=color, marker="o", label=f"KL, {cls} prompts")
        changed_axis.plot(
            layers, changed, style, color=color, alpha=0.35, marker="s",
            label=f"top-k changed, {cls}",
        )  # fmt: skip
    left.set_xlabel("MoE layer")
    left.xaxis.get_major_locator().set_params(integer=True)
    left.set_ylabel("router KL(base || edited) (nats)")
    changed_axis.set_ylabel("share of top-k choices changed")
    changed_axis.set_ylim(-0.02, 1.02)
    left.set_title("Routing shift per MoE layer" + (f"\n{best}" if best else ""), fontsize=9)
    left.grid(alpha=0.3)
    handles = left.get_legend_handles_labels()
    extra = changed_axis.get_legend_handles_labels()
    left.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, loc="best")
    variants = table[table["variant"] != "base"].reset_index(drop=True)
    if "routing_kl_target" in variants:
        x = variants["routing_kl_target"].astype(float)
        y = variants["refusal_rate"].astype(float)
        colour = variants.get("topk_changed_target", x * 0).astype(float)
        points = right.scatter(x, y, c=colour, cmap="viridis", vmin=0, vmax=1, s=36, zorder=3)
        fig.colorbar(points, ax=right, shrink=0.8, label="top-k changed, target prompts")
        _number_points(right, x, y)
        if best is not None and best in set(variants["variant"]):
            i = int(variants.index[variants["variant"] == best][0])
            right.scatter([x[i]], [y[i]], marker="*", s=260, color="tab:red", zorder=4)
        base = table[table["variant"] == "base"]
        if not base.empty:
            right.scatter([0.0], [float(base["refusal_rate"].iloc[0])], marker="s",
                          color="gray", s=50, zorder=3, label="base model", clip_on=False)  # fmt: skip
            right.legend(fontsize=8, loc="best")
        right.set_xlim(left=0, right=max(float(x.max()) * 1.15, 1e-6))
        right.set_xlabel("mean router KL on target prompts (nats)")
    right.set_ylabel("refusal rate on held-out target prompts")
    right.set_ylim(-0.03, 1.03)
    right.set_title(
        "Variants: refusal rate vs routing shift\n(numbers as in pareto.png)", fontsize=9
    )
    right.grid(alpha=0.3)
    _save(fig, path)
