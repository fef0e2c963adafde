"""Every matplotlib figure of the workflow: one function per figure, each writes one PNG.

Why one module: figures share a look (size, dpi, titles, labelled axes) and the headless
backend, and the report captions in workflow/report/ describe them one by one.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 120


def _save(fig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=DPI)
    plt.close(fig)
    tmp.replace(path)


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
    cmap = plt.get_cmap("RdBu_r").copy()
    cmap.set_bad("lightgrey")
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


def _ticks(values, most: int = 24):
    values = np.asarray(values)
    step = max(1, int(np.ceil(len(values) / most)))
    return values[::step]
