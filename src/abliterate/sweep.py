"""Evaluate sweep variants in memory, aggregate their tables, and pick the one to export.

The grid itself (variants, ids, chunks, the recipe of a variant) is `abliterate.grid`;
this module runs it: one job evaluates a chunk of variants on one loaded model
(`evaluate_chunk`), and `aggregate` merges the jobs' tables, draws the figures and
selects the recipe to export (`select_best`).
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd
import yaml

from .errors import AbliterateError
from .evaluate import EvalSettings, Evaluator, render_prompts
from .files import write_text_atomic
from .grid import SWEEP_KEYS, Variant, load_suggested, variant_columns, variant_recipe
from .layout import Layout
from .logs import logger
from .measure import load_measurements
from .model import load_model
from .plots import plot_pareto, plot_routing_shift, plot_sweep_heatmap
from .recipe import EXPERT_COLUMNS, expert_columns, load_recipe, resolve

KL_COLUMNS = {"first_token": "kl_first_token", "multi_token": "kl_multi_token"}


# --------------------------------------------------------------------------------------
# Aggregation and selection
# --------------------------------------------------------------------------------------


def read_chunk_tables(paths: Iterable[str | Path]) -> pd.DataFrame:
    """One table from the per-job tables: the base row once (first), then every variant."""
    frames = [pd.read_csv(p, sep="\t") for p in paths]
    if not frames:
        raise AbliterateError("no evaluation tables to aggregate.")
    table = pd.concat(frames, ignore_index=True)
    base = table[table["variant"] == "base"].head(1)
    rest = table[table["variant"] != "base"].drop_duplicates("variant", keep="first")
    if base.empty:
        raise AbliterateError("the evaluation tables have no 'base' row (the unedited model).")
    return pd.concat([base, rest], ignore_index=True)


def select_best(
    table: pd.DataFrame,
    max_refusal_rate: float = 0.1,
    kl: str = "first_token",
    min_benign_kept: float = 0.0,
) -> tuple[str, str]:
    """Pick the variant to export and say why.

    Rule: among variants whose refusal rate is at or under `max_refusal_rate` and that keep
    at least `min_benign_kept` of the benign answers, the lowest KL (`kl`: first_token or
    multi_token; ties: more benign answers kept, then lower refusal rate, then id). If
    none keeps that many, the most benign answers kept among those meeting the refusal
    target (ties: lowest KL); if none meets the refusal target, the lowest refusal rate
    (ties: most kept, then lowest KL).

    Why the benign gate: first-token KL sees only the first answer token, while "kept"
    sees the whole greedy answer. The lowest-KL trial under the refusal target can change
    several benign answers (one organism: KL 0.032 with 86 % kept, beside KL 0.064 with
    98 % kept, which on the test prompts kept 100 % at KL 0.005).
    """
    if kl not in KL_COLUMNS:
        raise AbliterateError(f"select.kl: expected one of {', '.join(KL_COLUMNS)}, got {kl!r}.")
    column = KL_COLUMNS[kl]
    name = kl.replace("_", "-")
    candidates = table[table["variant"] != "base"]
    if candidates.empty:
        raise AbliterateError("the sweep has no variants to select from.")
    under = candidates[candidates["refusal_rate"] <= max_refusal_rate + 1e-12]
    qualifying = under[under["benign_kept"] >= min_benign_kept - 1e-12]
    kept_rule = f" and benign answers kept >= {min_benign_kept:g}" if min_benign_kept else ""
    if not qualifying.empty:
        ranked = qualifying.sort_values(
            [column, "benign_kept", "refusal_rate", "variant"], ascending=[True, False, True, True]
        )
        best = ranked.iloc[0]
        reason = (
            f"Selected {best['variant']}: lowest {name} KL ({best[column]:.4g}) among "
            f"{len(qualifying)} of {len(candidates)} variants with refusal rate <= "
            f"{max_refusal_rate:g}{kept_rule} (its refusal rate {best['refusal_rate']:.3f}, "
            f"benign answers kept {best['benign_kept']:.3f})."
        )
    elif not under.empty:
        ranked = under.sort_values(
            ["benign_kept", column, "variant"], ascending=[False, True, True]
        )
        best = ranked.iloc[0]
        reason = (
            f"Selected {best['variant']}: none of the {len(under)} variants with refusal rate "
            f"<= {max_refusal_rate:g} kept {min_benign_kept:g} of the benign answers, so the "
            f"one keeping the most was taken ({best['benign_kept']:.3f} kept, refusal rate "
            f"{best['refusal_rate']:.3f}, {name} KL {best[column]:.4g})."
        )
    else:
        ranked = candidates.sort_values(
            ["refusal_rate", "benign_kept", column, "variant"], ascending=[True, False, True, True]
        )
        best = ranked.iloc[0]
        reason = (
            f"Selected {best['variant']}: no variant reached refusal rate <= {max_refusal_rate:g}, "
            f"so the lowest refusal rate was taken ({best['refusal_rate']:.3f}, "
            f"{name} KL {best[column]:.4g}, benign answers kept "
            f"{best['benign_kept']:.3f})."
        )
    return str(best["variant"]), reason


def write_table(table: pd.DataFrame, path: str | Path) -> None:
    write_text_atomic(path, table.to_csv(sep="\t", index=False, float_format="%.6g"))


def write_best(recipe: dict, reason: str, yaml_path: str | Path, txt_path: str | Path) -> None:
    """`best.yaml` (a complete recipe, consumable by the export rules) and `best.txt`."""
    header = "# Selected by abliterate aggregate. " + reason + "\n"
    for path, text in (
        (Path(yaml_path), header + yaml.safe_dump(recipe, sort_keys=False)),
        (Path(txt_path), reason + "\n"),
    ):
        write_text_atomic(path, text)


def read_chunk_details(paths: Iterable[str | Path]) -> tuple[dict, dict]:
    """Recipes and sample answers of every variant (and the base) from the per-job JSON."""
    recipes: dict[str, dict] = {}
    samples: dict[str, dict] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        recipes.update(data.get("recipes", {}))
        for name, value in data.get("samples", {}).items():
            samples.setdefault(name, value)
    return recipes, samples


def read_chunk_routing(paths: Iterable[str | Path]) -> dict:
    """Per-layer routing shift of every variant from the per-job JSON (MoE models; empty
    for dense ones): {variant: {"benign" | "target": {layer: {"kl", "topk_changed"}}}}."""
    routing: dict[str, dict] = {}
    for path in paths:
        for name, classes in json.loads(Path(path).read_text()).get("routing", {}).items():
            routing.setdefault(
                name,
                {cls: {int(k): v for k, v in layers.items()} for cls, layers in classes.items()},
            )
    return routing


# --------------------------------------------------------------------------------------
# Running: one evaluation job (a chunk of variants), and the aggregation
# --------------------------------------------------------------------------------------


def _prompt_sets(tokenizer, target_prompts, benign_prompts, settings: EvalSettings, config=None):
    """The held-out target and benign prompts, rendered as the measurement rendered them."""
    held_out = replace(settings.prompts, max_count=settings.max_prompts)

    def prompt_set(path):
        return render_prompts(tokenizer, held_out.load(path), held_out, config)

    return prompt_set(target_prompts), prompt_set(benign_prompts)


def _evaluate_plans(evaluator: Evaluator, plans: dict, recipes: dict, columns: dict):
    """Rows (base first) and sample answers; identical recipes (e.g. "suggested" == "all")
    are evaluated once and their row repeated under each name."""
    base = evaluator.evaluate_base()
    empty = {k: None for k in next(iter(columns.values()), {})}
    rows = [{**empty, **base.row()}]
    samples = {"base": base.samples}
    routing = {"base": base.routing} if base.routing is not None else {}
    done: dict[str, dict] = {}
    for name, plan in plans.items():
        same = json.dumps(recipes[name], sort_keys=True, default=str)
        if same in done:
            logger.info("%s: same recipe as %s, not evaluated again", name, done[same]["variant"])
            row = {**done[same], "variant": name, "seconds": 0.0}
        else:
            result = evaluator.evaluate(name, plan)
            row = result.row()
            done[same] = row
            samples[name] = result.samples
            if result.routing is not None:
                routing[name] = result.routing
        samples.setdefault(name, samples[done[same]["variant"]])
        if routing and name not in routing:
            routing[name] = routing[done[same]["variant"]]
        rows.append({**columns.get(name, {}), **row})
    return rows, samples, routing


def _table(rows: list[dict]) -> pd.DataFrame:
    """The rows as a table, variant and grid columns first."""
    table = pd.DataFrame(rows)
    front = ["variant", *SWEEP_KEYS, "measurement_resolved", "layers_resolved", *EXPERT_COLUMNS]
    return table[[c for c in front if c in table] + [c for c in table if c not in front]]


def evaluate_recipes(
    model_dir: str | Path,
    recipes: dict[str, dict],
    *,
    layout: Layout,
    measurements,
    target_prompts: str | Path,
    benign_prompts: str | Path,
    table_path: str | Path | None = None,
    details_path: str | Path | None = None,
    columns: dict[str, dict] | None = None,
    settings: EvalSettings | None = None,
) -> pd.DataFrame:
    """Load the model once; evaluate the base model and every named recipe in memory.

    Steps: resolve every recipe to a plan (before the model is loaded, so a bad recipe
    fails in seconds, not after a long load), load the model, render the prompts, evaluate
    the base and each plan, then write the table (base row first) and a JSON with each
    recipe and its sample answers when paths are given; returns the table.
    `settings` is an `abliterate.evaluate.EvalSettings` (default: its defaults).
    """
    settings = settings or EvalSettings()
    plans = {name: resolve(load_recipe(r), layout, measurements) for name, r in recipes.items()}
    # MoE: which routed experts each plan edits (the strategy's effect, auto:K resolved)
    columns = {
        name: {**(columns or {}).get(name, {}), **expert_columns(plan, layout)}
        for name, plan in plans.items()
    }
    model, tokenizer, _ = load_model(model_dir, settings.load)
    target, benign = _prompt_sets(tokenizer, target_prompts, benign_prompts, settings, model.config)
    evaluator = Evaluator(model, tokenizer, target, benign, settings, model_dir=model_dir)
    rows, samples, routing = _evaluate_plans(evaluator, plans, recipes, columns)
    table = _table(rows)
    if table_path:
        write_table(table, table_path)
    if details_path:
        details = {"recipes": recipes, "samples": samples}
        if routing:  # MoE models: per-layer routing shift (sweep.tsv has the layer means)
            details["routing"] = routing
        write_text_atomic(details_path, json.dumps(details, indent=1))
    return table


def evaluate_chunk(
    model_dir: str | Path,
    variant_list: Sequence[Variant],
    *,
    layout_path: str | Path,
    measurements_path: str | Path,
    suggested_path: str | Path | None = None,
    base_recipe: dict | None = None,
    **kwargs,
) -> pd.DataFrame:
    """One sweep job: the variants' recipes (seed format + options), evaluated in memory."""
    layout = Layout.load(layout_path)
    suggested = load_suggested(suggested_path) if suggested_path else None
    recipes, columns = {}, {}
    for variant in variant_list:
        recipe = variant_recipe(
            variant, num_layers=layout.num_layers, suggested=suggested, base=base_recipe
        )
        recipes[variant.id] = {
            "model": str(model_dir),
            "measurements": str(measurements_path),
            **recipe,
        }
        columns[variant.id] = variant_columns(variant, recipe)
    return evaluate_recipes(
        model_dir,
        recipes,
        layout=layout,
        measurements=load_measurements(measurements_path),
        columns=columns,
        **kwargs,
    )


def heatmap_axes(table: pd.DataFrame) -> list[str]:
    """The (up to) two swept parameters a heatmap shows: those with the most levels."""
    variants_only = table[table["variant"] != "base"]
    levels = {k: variants_only[k].astype(str).nunique() for k in SWEEP_KEYS if k in variants_only}
    varying = [k for k in SWEEP_KEYS if levels.get(k, 0) > 1]
    return sorted(varying, key=lambda k: -levels[k])[:2]


def samples_html(samples: dict, best: str, reason: str) -> str:
    """Sample answers before (base) and after (the selected variant), as an HTML page."""
    parts = [
        "<html><head><meta charset='utf-8'><title>Sample answers</title>",
        "<style>body{font-family:sans-serif} table{border-collapse:collapse;margin-bottom:2em}"
        "td,th{border:1px solid #bbb;padding:4px 8px;vertical-align:top}"
        ".refusal{color:#b00}</style></head><body>",
        f"<h1>Sample answers: base vs {html.escape(best)}</h1>",
        f"<p>{html.escape(reason)}</p>",
    ]
    for cls in ("target", "benign"):
        before = samples.get("base", {}).get(cls, [])
        after = samples.get(best, {}).get(cls, [])
        parts.append(
            f"<h2>{cls} prompts</h2><table><tr><th>prompt</th><th>base</th><th>selected</th></tr>"
        )
        for b, a in zip(before, after, strict=False):

            def cell(item):
                css = " class='refusal'" if item["refusal"] else ""
                return f"<td{css}>{html.escape(item['answer']) or '<i>(empty)</i>'}</td>"

            parts.append(f"<tr><td>{html.escape(b['prompt'])}</td>{cell(b)}{cell(a)}</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def aggregate(
    table_paths: Sequence[str | Path],
    details_paths: Sequence[str | Path],
    *,
    table_out: str | Path,
    best_yaml: str | Path,
    best_txt: str | Path,
    pareto_png: str | Path | None = None,
    heatmap_png: str | Path | None = None,
    samples_out: str | Path | None = None,
    routing_json: str | Path | None = None,
    routing_png: str | Path | None = None,
    max_refusal_rate: float = 0.1,
    min_benign_kept: float = 0.0,
    kl: str = "first_token",
) -> tuple[str, str]:
    """sweep.tsv, plots, best.yaml/best.txt (and the samples page) from the chunk outputs.

    On MoE models `routing_json` receives every variant's per-layer routing shift and
    `routing_png` its figure (`plots.plot_routing_shift`); a dense model has none, and
    asking for them there is an error rather than an empty file.
    """
    table = read_chunk_tables(table_paths)
    recipes, samples = read_chunk_details(details_paths)
    best, reason = select_best(table, max_refusal_rate, kl, min_benign_kept)
    if best not in recipes:
        raise AbliterateError(f"the evaluation details have no recipe for variant {best!r}.")
    table.insert(1, "selected", table["variant"] == best)
    write_table(table, table_out)
    write_best(recipes[best], reason, best_yaml, best_txt)
    kl_column = KL_COLUMNS[kl]
    if pareto_png:
        plot_pareto(
            table, pareto_png, kl_column=kl_column, best=best, max_refusal_rate=max_refusal_rate
        )
    if heatmap_png:
        plot_sweep_heatmap(
            table, heatmap_png, axes=heatmap_axes(table), best=best, kl_column=kl_column
        )
    if samples_out:
        write_text_atomic(samples_out, samples_html(samples, best, reason))
    if routing_json or routing_png:
        routing = read_chunk_routing(details_paths)
        if not routing:
            raise AbliterateError(
                "the evaluation details hold no routing shift (a dense model, or routers "
                "the evaluator could not read); routing.json/routing.png need an MoE model."
            )
        if routing_json:
            write_text_atomic(routing_json, json.dumps(routing, indent=1) + "\n")
        if routing_png:
            plot_routing_shift(table, routing, routing_png, best=best)
    return best, reason
