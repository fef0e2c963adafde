"""Rank candidate refusal directions by a direct intervention, not only by separability.

Why: separability (AUROC, quality; `abliterate.analyze`) says where the classes *differ*,
not which direction the model *uses* to refuse. They can disagree: a class-dependent
activation the next norm almost zeroes separates the classes perfectly and steers nothing,
and on a gpt-oss-style model the only direction that removed the refusal was the last
hidden state after the final norm (index L + 1), which separability never ranks. So the
analysis also asks the model: for each of a few candidate measurement indices, project
that direction out of every writer to the residual stream (the embeddings and, on every
layer, attention output, dense/shared MLP down, routed experts' down projections and
their biases), generate short answers to a small validation subset, and count refusals
and changed benign answers. One model load; each candidate is edited in memory, measured
and restored bit-exactly (`abliterate.evaluate.Evaluator`, through
`abliterate.sweep.evaluate_recipes`).

Ranking rule (`rank_table`): the lowest `refusal_rate + (1 - benign_kept)`, ties by the
lower first-token KL, then the lower index. Why this sum: a direction is only "the"
refusal direction if removing it stops the refusals *and* leaves benign answers as they
were; either failure counts the same per prompt (one refused target prompt, one changed
benign answer), so neither a direction that breaks the model (benign answers change) nor
one that changes nothing (refusals stay) wins. KL only breaks ties: on a small subset the
two rates are coarse (steps of 1/n), and among equally good directions the one that moves
the benign next-token distribution least is the gentler edit.

Candidates (`candidate_indices`): the top-k indices by separability (the same order the
separability rule uses: AUROC, then quality) plus always the last measured index (L + 1
when the final norm was measured, else L), so the post-final-norm direction is always
tried. Cost: one model load plus (k + 2) evaluations (the base and each candidate) of
`2 x prompts` short generations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from .errors import AbliterateError
from .logs import logger

COLUMNS = ["measurement", "refusal_rate", "benign_kept", "kl_first_token", "score"]
DENSE_WRITERS = ("attn_out", "mlp_down")
MOE_WRITERS = ("attn_out", "mlp_down", "shared_down", "expert_down")

# Options of every intervention recipe: a plain projection of the direction itself (no
# re-orthogonalization, no norm restoration), at full strength, biases included: the most
# direct test of "does the model need this direction to refuse".
RECIPE_OPTIONS = {
    "projected": False,
    "biprojected": False,
    "norm_preserve": False,
    "norm_scaled": False,
    "ensemble": 0,
    "biases": True,
    "scale": 1.0,
    "components": None,
    "ablate_individual_experts": False,
    "expert_subset": None,
}


@dataclass(frozen=True)
class InterveneSettings:
    """How `analyze` ranks directions by intervention; defaults match the workflow schema's
    `analyze:` keys (`intervene_*`)."""

    intervene: bool = True
    intervene_prompts: int = 16
    intervene_candidates: int = 4
    intervene_max_new_tokens: int = 8

    def __post_init__(self) -> None:
        for name in ("intervene_prompts", "intervene_candidates", "intervene_max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AbliterateError(f"analyze.{name} is {value!r}; expected an integer >= 1.")

    @classmethod
    def from_config(cls, section: dict) -> InterveneSettings:
        """The settings of a (possibly partial) `analyze:` section; missing keys default."""
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in section.items() if k in names})


def intervention_recipe(index: int, num_layers: int, moe: bool, *, embed: bool = True) -> dict:
    """The seed-format recipe that projects measurement `index` out of every writer.

    One entry per layer with its own `components`: attention output, dense MLP down and,
    on an MoE model, shared and routed experts' down projections (a layer lacking one of
    them simply has no such tensor; `recipe.resolve` selects what the layer has), plus the
    embedding on layer 0 (it writes the residual stream before any layer). `embed: False`
    leaves the embedding out (a model whose embedding is tied to the head would otherwise
    also have its output head edited).
    """
    if num_layers < 1:
        raise AbliterateError(f"intervention_recipe: num_layers is {num_layers}; expected >= 1.")
    if index < 0 or index > num_layers + 1:
        raise AbliterateError(
            f"intervention_recipe: measurement {index} is out of range; a model with "
            f"{num_layers} layers has indices 0-{num_layers + 1}."
        )
    writers = list(MOE_WRITERS if moe else DENSE_WRITERS)
    entries = [
        {
            "layer": layer,
            "measurement": int(index),
            "scale": 1.0,
            "sparsity": 0.0,
            "components": (["embed"] if layer == 0 and embed else []) + writers,
        }
        for layer in range(num_layers)
    ]
    return {"ablate": entries, **RECIPE_OPTIONS}


def separability_order(metrics: pd.DataFrame, num_layers: int, min_layer_fraction: float = 0.2):
    """Measurement indices from the best separating down: AUROC, then quality (the two
    numbers the separability rule uses), indices below `min_layer_fraction` left out."""
    start = max(1, math.ceil(min_layer_fraction * num_layers))
    usable = metrics[(metrics.measurement >= start) & metrics.quality.notna()]
    if usable.empty:
        usable = metrics[metrics.quality.notna()]
    keys = ["auroc", "quality"] if usable.auroc.notna().any() else ["quality"]
    ranked = usable.sort_values(keys, ascending=False, na_position="last", kind="stable")
    return [int(m) for m in ranked.measurement]


def candidate_indices(
    metrics: pd.DataFrame,
    num_layers: int,
    last_index: int,
    k: int = 4,
    *,
    min_layer_fraction: float = 0.2,
) -> list[int]:
    """The top-`k` indices by separability plus always `last_index` (the last measured:
    L + 1 after the final norm when measured), ascending, each once."""
    if k < 1:
        raise AbliterateError(f"analyze.intervene_candidates is {k!r}; expected >= 1.")
    top = separability_order(metrics, num_layers, min_layer_fraction)[:k]
    return sorted({*top, int(last_index)})


def rank_table(table: pd.DataFrame) -> pd.DataFrame:
    """The intervention table with `score` = refusal_rate + (1 - benign_kept), sorted by
    the ranking rule of the module docstring (best first)."""
    missing = [c for c in COLUMNS[:-1] if c not in table]
    if missing:
        raise AbliterateError(
            f"the intervention table lacks column {missing[0]!r}; expected {', '.join(COLUMNS[:-1])}."
        )
    if table.empty:
        raise AbliterateError("the intervention table has no candidates to rank.")
    ranked = table.copy()
    ranked["score"] = ranked["refusal_rate"] + (1.0 - ranked["benign_kept"])
    ranked = ranked.sort_values(
        ["score", "kl_first_token", "measurement"], ascending=True, kind="stable"
    )
    return ranked.reset_index(drop=True)


def rank_by_intervention(
    model_dir: str | Path,
    layout,
    measurements,
    target_prompts: str | Path,
    benign_prompts: str | Path,
    settings=None,
    candidates: list[int] | None = None,
    *,
    prompts: int = 16,
    max_new_tokens: int = 8,
) -> tuple[pd.DataFrame, dict[int, dict]]:
    """Evaluate each candidate's `intervention_recipe` on a small validation subset.

    Returns the ranked table (columns `COLUMNS` plus the base model's refusal rate as
    `base_refusal_rate`) and each candidate's recipe. `settings` is an
    `abliterate.evaluate.EvalSettings` whose prompt count and generation length are capped
    at `prompts` and `max_new_tokens` (a validation *subset*: a few seconds per candidate).
    """
    from .directions import IndexedMeans
    from .evaluate import EvalSettings
    from .sweep import evaluate_recipes

    if not (Path(model_dir) / "config.json").is_file():
        raise AbliterateError(
            f"model {model_dir}: not a model directory (expected a Hugging Face checkpoint "
            "with a config.json)."
        )
    for label, path in (("target prompts", target_prompts), ("benign prompts", benign_prompts)):
        if not Path(path).is_file():
            raise AbliterateError(f"{label} {path}: file not found.")
    last = IndexedMeans(measurements).num_indices - 1
    if candidates is None:
        candidates = [last]
    settings = settings or EvalSettings()
    limit = min(prompts, settings.max_prompts or prompts)
    settings = replace(
        settings,
        max_prompts=limit,
        max_new_tokens=min(max_new_tokens, settings.max_new_tokens),
        samples=0,
    )
    embed = not bool(layout.tie_word_embeddings)
    recipes = {
        f"m{m}": intervention_recipe(m, layout.num_layers, bool(layout.is_moe), embed=embed)
        for m in candidates
    }
    table = evaluate_recipes(
        model_dir,
        recipes,
        layout=layout,
        measurements=measurements,
        target_prompts=target_prompts,
        benign_prompts=benign_prompts,
        settings=settings,
    )
    base = table[table["variant"] == "base"].iloc[0]
    rows = table[table["variant"] != "base"].copy()
    rows.insert(0, "measurement", [int(v[1:]) for v in rows["variant"]])
    ranked = rank_table(rows[COLUMNS[:-1]])
    ranked["base_refusal_rate"] = float(base["refusal_rate"])
    for row in ranked.itertuples():
        logger.info(
            "intervention at measurement %d: refusal rate %.3f, benign kept %.3f, KL %.4g",
            row.measurement,
            row.refusal_rate,
            row.benign_kept,
            row.kl_first_token,
        )
    return ranked, {int(k[1:]): v for k, v in recipes.items()}


def suggest_from_interventions(
    ranked: pd.DataFrame, recipes: dict[int, dict], separability_pick: int | None = None
) -> tuple[dict, str]:
    """The winner's recipe (exactly the one that was evaluated, so `abliterate ablate` of
    it reproduces the tested edit) and the text saying why, with every candidate's numbers."""
    ranked = rank_table(ranked)
    best = ranked.iloc[0]
    measurement = int(best["measurement"])
    if measurement not in recipes:
        raise AbliterateError(f"no intervention recipe for measurement {measurement}.")
    recipe = recipes[measurement]
    layers = [e["layer"] for e in recipe["ablate"]]
    components = sorted({c for e in recipe["ablate"] for c in e.get("components") or []})
    lines = [
        "Suggested recipe (suggested.yaml), picked by intervention:",
        "",
        "Each candidate measurement index (the top indices by separability, plus always the "
        "last measured one) was projected out of every writer to the residual stream "
        f"({', '.join(components)}; layers {layers[0]}..{layers[-1]}, plain projection, "
        "biases included) and evaluated in memory on a small validation subset.",
        "Rule: the lowest refusal_rate + (1 - benign_kept); ties by the lower first-token KL.",
        "",
        f"   -> measurement {measurement}: refusal rate {best['refusal_rate']:.3f}, benign "
        f"answers kept {best['benign_kept']:.3f}, first-token KL {best['kl_first_token']:.4g}.",
    ]
    if "base_refusal_rate" in ranked:
        lines.append(f"   (unedited model: refusal rate {float(best['base_refusal_rate']):.3f})")
    if separability_pick is not None:
        agree = "agrees" if separability_pick == measurement else "disagrees"
        lines.append(
            f"   The separability rule alone would pick measurement {separability_pick} ({agree})."
        )
    lines += ["", "Candidates (interventions.tsv):", ""]
    lines.append(ranked[COLUMNS].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    lines += [
        "",
        "This is a starting point; the sweep or search measures refusal and KL of the "
        "alternatives on more prompts.",
    ]
    return recipe, "\n".join(lines)


def workflow_interventions(
    *,
    model_dir: str | Path,
    layout_path: str | Path,
    measurements,
    validation: dict[str, str | Path],
    analyze_config: dict,
    evaluate_config: dict,
    prompts_config: dict,
    trust_remote_code: bool = False,
) -> tuple[pd.DataFrame, dict[int, dict]] | None:
    """The workflow's ranking (rule analyze): on the validation prompts of both classes,
    evaluated with the config's `evaluate:` settings (loading, refusal markers or judge),
    capped by `analyze.intervene_*`; None when `analyze.intervene` is false."""
    from .analyze import layer_metrics
    from .directions import IndexedMeans
    from .layout import Layout
    from .search_steps import check_judge, eval_settings

    settings = InterveneSettings.from_config(analyze_config)
    if not settings.intervene:
        return None
    check_judge(evaluate_config)
    candidates = candidate_indices(
        layer_metrics(measurements),
        measurements.num_layers,
        IndexedMeans(measurements).num_indices - 1,
        settings.intervene_candidates,
        min_layer_fraction=analyze_config.get("min_layer_fraction", 0.2),
    )
    return rank_by_intervention(
        model_dir,
        Layout.load(layout_path),
        measurements,
        validation["target"],
        validation["benign"],
        eval_settings(evaluate_config, prompts_config, trust_remote_code),
        candidates,
        prompts=settings.intervene_prompts,
        max_new_tokens=settings.intervene_max_new_tokens,
    )


__all__ = [
    "COLUMNS",
    "InterveneSettings",
    "candidate_indices",
    "intervention_recipe",
    "rank_by_intervention",
    "rank_table",
    "separability_order",
    "suggest_from_interventions",
    "workflow_interventions",
]
