"""Sweep grids of edit recipes, aggregate their evaluations, and pick the one to export.

Why a static grid: Snakemake must know every job when it builds the DAG, before the
analysis has run. A variant therefore keeps "suggested" as a symbolic value in its id
(`msug`, `Lsug`) and is resolved against `analysis/suggested.yaml` only when it is
evaluated; the resolved measurement index and layer range are recorded in the table.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd
import yaml

from .errors import AbliterateError
from .files import write_text_atomic
from .logs import logger

SWEEP_KEYS = (
    "scale",
    "sparsity",
    "measurement",
    "layers",
    "components",
    "norm_preserve",
    "experts",
)
KL_COLUMNS = {"first_token": "kl_first_token", "multi_token": "kl_multi_token"}
_RANGE = re.compile(r"^(\d+)-(\d+)$")
_SUBSET = re.compile(r"^\d+(,\d+)*$")
_COMPONENT = re.compile(r"^[a-z_]+(\+[a-z_]+)*$")


def format_number(value: float, min_decimals: int = 1) -> str:
    """Shortest stable decimal text for a grid value: 0.3 -> '0.3', never
    '0.30000000000000004'; at least `min_decimals` decimals (1 -> '1.0')."""
    value = round(float(value), 6)
    if value == 0:
        value = 0.0  # no "-0.0"
    text = f"{value:.6f}".rstrip("0")
    whole, _, decimals = text.partition(".")
    return f"{whole}.{decimals.ljust(min_decimals, '0')}"


@dataclass(frozen=True)
class Variant:
    """One point of the sweep grid, with symbolic values kept symbolic."""

    scale: float = 1.0
    sparsity: float = 0.0
    measurement: int | str = "suggested"
    layers: str = "suggested"
    components: str = "default"
    norm_preserve: bool = True
    experts: str = "none"

    @property
    def id(self) -> str:
        """Readable and stable, e.g. `s1.0_p0.00_m3_L1-4_np1_c-default_e-none`."""
        measurement = "sug" if self.measurement == "suggested" else str(self.measurement)
        layers = "sug" if self.layers == "suggested" else self.layers
        experts = self.experts.replace(",", "+")
        return (
            f"s{format_number(self.scale)}_p{format_number(self.sparsity, 2)}_m{measurement}"
            f"_L{layers}_np{int(self.norm_preserve)}_c-{self.components}_e-{experts}"
        )

    def params(self) -> dict:
        return asdict(self)


def _check_value(key: str, value) -> object:
    """Validate one grid value (the schema checks types; this checks meaning)."""
    where = f"sweep.{key}"
    if key in ("scale", "sparsity"):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise AbliterateError(f"{where}: expected numbers, got {value!r}.")
        if key == "sparsity" and not 0 <= value < 1:
            raise AbliterateError(f"{where}: expected values in [0, 1), got {value!r}.")
        return float(value)
    if key == "measurement":
        if value == "suggested" or (
            isinstance(value, int) and not isinstance(value, bool) and value >= 0
        ):
            return value
        raise AbliterateError(
            f"{where}: expected measurement indices (>= 0) or 'suggested', got {value!r}."
        )
    if key == "layers":
        text = str(value)
        match = _RANGE.match(text)
        if text in ("suggested", "all") or (match and int(match[1]) <= int(match[2])):
            return text
        raise AbliterateError(
            f"{where}: expected 'suggested', 'all' or a range like '2-5', got {value!r}."
        )
    if key == "components":
        text = str(value)
        if text == "default":
            return text
        if _COMPONENT.match(text):
            from .recipe import COMPONENTS  # lazily: the Snakefile imports this module

            unknown = [n for n in text.split("+") if n != "default" and n not in COMPONENTS]
            if not unknown:
                return text
            raise AbliterateError(
                f"{where}: unknown component {unknown[0]!r} in {text!r}; expected 'default' "
                f"or '+'-joined names from {', '.join(COMPONENTS)}."
            )
        raise AbliterateError(
            f"{where}: expected 'default' or '+'-joined component names such as "
            f"'attn_out+mlp_down', got {value!r}."
        )
    if key == "norm_preserve":
        if isinstance(value, bool):
            return value
        raise AbliterateError(f"{where}: expected true/false, got {value!r}.")
    if key == "experts":
        text = str(value).replace(" ", "")
        if text in ("none", "all") or _SUBSET.match(text):
            return text
        raise AbliterateError(
            f"{where}: expected 'none', 'all' or a subset like '0,1,2,3', got {value!r}."
        )
    raise AbliterateError(
        f"sweep.{key}: unknown sweep parameter; expected one of {', '.join(SWEEP_KEYS)}."
    )


def variants(sweep: dict, moe: bool = True) -> list[Variant]:
    """Every grid point of the config's `sweep:` block, in a stable order, ids unique.

    For a dense model (`moe=False`) the expert strategies collapse to "none": without
    routed experts, "all" or a subset would repeat the "none" variant.
    """
    defaults = Variant()
    grids: list[list] = []
    for key in SWEEP_KEYS:
        values = sweep.get(key, [getattr(defaults, key)])
        if not isinstance(values, (list, tuple)) or not values:
            raise AbliterateError(f"sweep.{key}: expected a non-empty list, got {values!r}.")
        values = [_check_value(key, v) for v in values]
        grids.append(["none"] if key == "experts" and not moe else values)
    seen: dict[str, Variant] = {}
    for combo in itertools.product(*grids):
        variant = Variant(**dict(zip(SWEEP_KEYS, combo, strict=True)))
        seen.setdefault(variant.id, variant)
    return list(seen.values())


def varying_parameters(variant_list: Sequence[Variant]) -> list[str]:
    """Grid parameters that take more than one value, in SWEEP_KEYS order."""
    return [k for k in SWEEP_KEYS if len({getattr(v, k) for v in variant_list}) > 1]


def chunks(variant_list: Sequence[Variant], size: int) -> list[list[Variant]]:
    """Consecutive groups of `size` variants: one evaluation job (one model load) each."""
    return [list(variant_list[i : i + size]) for i in range(0, len(variant_list), size)]


def find_variants(variant_list: Sequence[Variant], ids: Iterable[str]) -> list[Variant]:
    by_id = {v.id: v for v in variant_list}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise AbliterateError(
            f"unknown sweep variant {missing[0]!r}; the config's grid does not contain it."
        )
    return [by_id[i] for i in ids]


# --------------------------------------------------------------------------------------
# Variant -> recipe (the seed's YAML format + options)
# --------------------------------------------------------------------------------------


def load_suggested(path: str | Path) -> dict:
    """`analysis/suggested.yaml` (seed format); it must name at least one ablate entry."""
    path = Path(path)
    if not path.is_file():
        raise AbliterateError(f"{path}: suggested recipe not found (run the analyze step first).")
    data = yaml.safe_load(path.read_text()) or {}
    entries = data.get("ablate") if isinstance(data, dict) else None
    if not entries or not all(
        isinstance(e, dict) and "layer" in e and "measurement" in e for e in entries
    ):
        raise AbliterateError(
            f"{path}: expected an 'ablate' list of {{layer, measurement, ...}} entries."
        )
    return data


def resolve_layers(spec: str, suggested: dict | None, num_layers: int) -> list[int]:
    if spec == "suggested":
        if suggested is None:
            raise AbliterateError(
                "sweep.layers uses 'suggested' but no suggested recipe was given."
            )
        return sorted({int(e["layer"]) for e in suggested["ablate"]})
    if spec == "all":
        return list(range(num_layers))
    first, last = (int(n) for n in _RANGE.match(spec).groups())
    if last >= num_layers:
        raise AbliterateError(
            f"sweep.layers: range '{spec}' reaches layer {last}, but the model has {num_layers} "
            f"layers (0-{num_layers - 1})."
        )
    return list(range(first, last + 1))


def resolve_measurement(value: int | str, suggested: dict | None, num_layers: int) -> int:
    if value == "suggested":
        if suggested is None:
            raise AbliterateError(
                "sweep.measurement uses 'suggested' but no suggested recipe was given."
            )
        counts: dict[int, int] = {}
        for entry in suggested["ablate"]:
            counts[int(entry["measurement"])] = counts.get(int(entry["measurement"]), 0) + 1
        return max(counts, key=lambda m: (counts[m], -m))
    if value > num_layers:
        raise AbliterateError(
            f"sweep.measurement: index {value} is out of range; the model has measurement "
            f"indices 0-{num_layers}."
        )
    return int(value)


def variant_recipe(
    variant: Variant,
    *,
    num_layers: int,
    suggested: dict | None = None,
    base: dict | None = None,
) -> dict:
    """The complete recipe a variant stands for, in the seed's format plus options.

    `base` holds the config's `recipe:` options (gate_scale, projected, ...) that the
    grid does not sweep; its own `ablate` list is ignored.
    """
    recipe = {k: v for k, v in (base or {}).items() if k != "ablate"}
    layers = resolve_layers(variant.layers, suggested, num_layers)
    measurement = resolve_measurement(variant.measurement, suggested, num_layers)
    recipe["ablate"] = [
        {
            "layer": layer,
            "measurement": measurement,
            "scale": float(format_number(variant.scale)),
            "sparsity": float(format_number(variant.sparsity, 2)),
        }
        for layer in layers
    ]
    recipe["norm_preserve"] = variant.norm_preserve
    recipe["components"] = (
        None if variant.components == "default" else variant.components.split("+")
    )
    if variant.experts == "none":
        recipe["ablate_individual_experts"] = False
        recipe["expert_subset"] = None
    elif variant.experts == "all":
        recipe["ablate_individual_experts"] = True
        recipe["expert_subset"] = None
    else:
        recipe["ablate_individual_experts"] = True
        recipe["expert_subset"] = [int(e) for e in variant.experts.split(",")]
    return recipe


def describe_layers(layers: Sequence[int]) -> str:
    """Compact text for a layer list: [1, 2, 3, 5] -> '1-3,5'."""
    parts, run = [], []
    for layer in sorted(layers):
        if run and layer == run[-1] + 1:
            run.append(layer)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [layer]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def variant_columns(variant: Variant, recipe: dict) -> dict:
    """The parameter columns of a variant's row: grid values plus their resolution."""
    return {
        **{k: getattr(variant, k) for k in SWEEP_KEYS},
        "measurement_resolved": recipe["ablate"][0]["measurement"] if recipe["ablate"] else None,
        "layers_resolved": describe_layers([e["layer"] for e in recipe["ablate"]]),
    }


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
    table: pd.DataFrame, max_refusal_rate: float = 0.1, kl: str = "first_token"
) -> tuple[str, str]:
    """Pick the variant to export and say why.

    Rule: among variants whose refusal rate is at or under `max_refusal_rate`, the lowest
    KL (`kl`: first_token or multi_token; ties: more benign answers kept, then lower
    refusal rate, then id). If none qualifies, the lowest refusal rate (ties: lowest KL).
    """
    if kl not in KL_COLUMNS:
        raise AbliterateError(f"select.kl: expected one of {', '.join(KL_COLUMNS)}, got {kl!r}.")
    column = KL_COLUMNS[kl]
    candidates = table[table["variant"] != "base"]
    if candidates.empty:
        raise AbliterateError("the sweep has no variants to select from.")
    qualifying = candidates[candidates["refusal_rate"] <= max_refusal_rate + 1e-12]
    if not qualifying.empty:
        ranked = qualifying.sort_values(
            [column, "benign_kept", "refusal_rate", "variant"], ascending=[True, False, True, True]
        )
        best = ranked.iloc[0]
        reason = (
            f"Selected {best['variant']}: lowest {kl.replace('_', '-')} KL ({best[column]:.4g}) among "
            f"{len(qualifying)} of {len(candidates)} variants with refusal rate <= "
            f"{max_refusal_rate:g} (its refusal rate {best['refusal_rate']:.3f}, benign answers "
            f"kept {best['benign_kept']:.3f})."
        )
    else:
        ranked = candidates.sort_values(["refusal_rate", column, "variant"])
        best = ranked.iloc[0]
        reason = (
            f"Selected {best['variant']}: no variant reached refusal rate <= {max_refusal_rate:g}, "
            f"so the lowest refusal rate was taken ({best['refusal_rate']:.3f}, "
            f"{kl.replace('_', '-')} KL {best[column]:.4g}, benign answers kept "
            f"{best['benign_kept']:.3f})."
        )
    return str(best["variant"]), reason


def write_table(table: pd.DataFrame, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    table.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    tmp.replace(path)


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


# --------------------------------------------------------------------------------------
# Running: one evaluation job (a chunk of variants), and the aggregation
# --------------------------------------------------------------------------------------


def evaluate_recipes(
    model_dir: str | Path,
    recipes: dict[str, dict],
    *,
    layout,
    measurements,
    target_prompts: str | Path,
    benign_prompts: str | Path,
    table_path: str | Path | None = None,
    details_path: str | Path | None = None,
    columns: dict[str, dict] | None = None,
    settings=None,
) -> pd.DataFrame:
    """Load the model once; evaluate the base model and every named recipe in memory.

    Every recipe is resolved to a plan before the model is loaded, so a bad recipe fails
    in seconds, not after a long load. Writes the table (base row first) and a JSON with
    each recipe and its sample answers when paths are given; returns the table.
    `settings` is an `abliterate.evaluate.EvalSettings` (default: its defaults).
    """
    from .evaluate import EvalSettings, Evaluator, render_prompts
    from .model import load_model
    from .recipe import load_recipe, resolve

    settings = settings or EvalSettings()
    columns = columns or {}
    plans = {name: resolve(load_recipe(r), layout, measurements) for name, r in recipes.items()}
    model, tokenizer, _ = load_model(model_dir, settings.load)

    held_out = replace(settings.prompts, max_count=settings.max_prompts)

    def prompt_set(path):
        return render_prompts(tokenizer, held_out.load(path), held_out)

    evaluator = Evaluator(
        model,
        tokenizer,
        prompt_set(target_prompts),
        prompt_set(benign_prompts),
        settings,
        model_dir=model_dir,
    )
    base = evaluator.evaluate_base()
    empty = {k: None for k in next(iter(columns.values()), {})}
    rows = [{**empty, **base.row()}]
    samples = {"base": base.samples}
    done: dict[str, dict] = {}  # identical recipes (e.g. "suggested" == "all") run once
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
        samples.setdefault(name, samples[done[same]["variant"]])
        rows.append({**columns.get(name, {}), **row})
    table = pd.DataFrame(rows)
    front = ["variant", *SWEEP_KEYS, "measurement_resolved", "layers_resolved"]
    table = table[[c for c in front if c in table] + [c for c in table if c not in front]]
    if table_path:
        write_table(table, table_path)
    if details_path:
        write_text_atomic(
            details_path, json.dumps({"recipes": recipes, "samples": samples}, indent=1)
        )
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
    from .layout import Layout
    from .measure import load_measurements

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
    import html

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
    max_refusal_rate: float = 0.1,
    kl: str = "first_token",
) -> tuple[str, str]:
    """sweep.tsv, plots, best.yaml/best.txt (and the samples page) from the chunk outputs."""
    from .plots import plot_pareto, plot_sweep_heatmap

    table = read_chunk_tables(table_paths)
    recipes, samples = read_chunk_details(details_paths)
    best, reason = select_best(table, max_refusal_rate, kl)
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
        Path(samples_out).write_text(samples_html(samples, best, reason))
    return best, reason
