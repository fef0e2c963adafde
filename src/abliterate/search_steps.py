"""The search's workflow steps: start the study, run a worker, report on the test split.

Why three steps: workers are separate Snakemake jobs (each loads the model once) that
share one study, so creating it (and refusing a journal from another config) happens once
before them; the final step is the only one that reads the test prompts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import AbliterateError
from .files import write_text_atomic
from .logs import logger
from .search import (
    SearchSpace,
    TrialContext,
    add_intervals,
    check_strategies,
    create_study,
    fingerprint,
    first_trials,
    parse_settings,
    resolve_space,
    run_worker,
    trials_table,
    write_json,
)

# the metrics a selected trial keeps from validation beside its test numbers
VALIDATION_COLUMNS = (
    "refusal_rate",
    "benign_refusal_rate",
    "benign_kept",
    "kl_first_token",
    "kl_multi_token",
    "kl_first_token_answered",
)


def _prompts(path, prompts_config: dict, evaluate_config: dict) -> list[str]:
    from .prompts import load_prompts

    return load_prompts(
        path,
        field=prompts_config.get("field"),
        max_count=evaluate_config.get("max_prompts"),
        seed=prompts_config.get("seed", 0),
    )


def check_judge(evaluate_config: dict) -> None:
    judge = evaluate_config.get("judge")
    if judge and not (Path(judge) / "config.json").is_file():
        raise AbliterateError(
            f"evaluate.judge: {judge} does not exist or is not a model directory (expected a "
            "local Hugging Face causal LM with a config.json)."
        )


def init_study(
    *,
    journal: str | Path,
    study_json: str | Path,
    model_dir: str | Path,
    layout_path: str | Path,
    measurements_path: str | Path,
    suggested_path: str | Path | None,
    validation: dict[str, str | Path],
    sweep_config: dict,
    recipe_config: dict,
    evaluate_config: dict,
    prompts_config: dict,
    kl: str = "first_token",
    select_config: dict | None = None,
) -> dict:
    """Resolve the space against the model, create (or check) the study, write study.json.

    The selection targets (`select.max_refusal_rate`, `select.min_benign_kept`) are part of
    the study: its trials carry their distance to them as constraints (`search.target_constraints`)."""
    from .directions import IndexedMeans
    from .grid import load_suggested, resolve_measurement
    from .layout import Layout
    from .measure import load_measurements
    from .prompts import prompt_sha256
    from .recipe import file_sha256

    settings = parse_settings(sweep_config)
    check_judge(evaluate_config)
    layout = Layout.load(layout_path)
    meas = load_measurements(measurements_path)
    space = resolve_space(
        settings.search,
        num_layers=layout.num_layers,
        num_indices=IndexedMeans(meas).num_indices,
        is_moe=bool(layout.is_moe),
        has_norm_weights=meas.norm_weights is not None,
        components={target.component for target in layout.targets()},
        tied_embeddings=bool(layout.tie_word_embeddings),
    )
    check_strategies(space, layout, meas)
    suggested = load_suggested(suggested_path) if suggested_path else None
    measurement = (
        resolve_measurement("suggested", suggested, layout.num_layers) if suggested else None
    )
    prompt_digests = {
        cls: prompt_sha256(_prompts(path, prompts_config, evaluate_config))
        for cls, path in validation.items()
    }
    identity = {
        "model": str(Path(model_dir).resolve()),
        "measurements_sha256": file_sha256(measurements_path),
        "validation_prompts_sha256": prompt_digests,
        "space": space.to_json(),
        "seed": settings.seed,
        "n_startup_trials": settings.n_startup_trials,
        "recipe": recipe_config,
        "evaluate": evaluate_config,
        "prompts": {k: prompts_config.get(k) for k in ("field", "system", "fallback_template")},
        "kl": kl,
        "targets": selection_targets(select_config or {}),
    }
    key = fingerprint(identity)
    create_study(journal, key, settings, first_trials(space, measurement))
    data = {"fingerprint": key, "journal": str(journal), **identity}
    write_json(study_json, data)
    return data


def selection_targets(select_config: dict) -> dict:
    """The `select:` thresholds a trial must meet (schema defaults for missing keys)."""
    return {
        "max_refusal_rate": float(select_config.get("max_refusal_rate", 0.1)),
        "min_benign_kept": float(select_config.get("min_benign_kept", 0.98)),
    }


def eval_settings(evaluate_config: dict, prompts_config: dict, trust: bool = False):
    """The evaluation settings of (possibly partial) `evaluate:` and `prompts:` sections:
    the keys given win, the rest are the typed defaults (`EvalSettings`), which the
    schema's defaults equal (tests/test_options.py)."""
    from .evaluate import DEFAULT_JUDGE_TEMPLATE, EvalSettings, load_markers
    from .model import LoadOptions, option_values
    from .prompts import PromptOptions

    prompts = {**option_values(PromptOptions, prompts_config)}
    if "max" in prompts_config:
        prompts["max_count"] = prompts_config["max"]
    return EvalSettings(
        **{
            **option_values(EvalSettings, evaluate_config),
            "markers": load_markers(evaluate_config.get("refusal_markers")),
            "judge_template": evaluate_config.get("judge_template") or DEFAULT_JUDGE_TEMPLATE,
            "load": LoadOptions(
                **option_values(LoadOptions, evaluate_config), trust_remote_code=trust
            ),
            "prompts": PromptOptions(**prompts),
        }
    )


def _open_evaluator(model_dir, target, benign, evaluate_config, prompts_config, trust):
    """One model load and the validation prompt sets, rendered as measurement rendered
    them (the same step as `sweep.evaluate_recipes`)."""
    from .evaluate import Evaluator
    from .model import load_model
    from .sweep import _prompt_sets

    settings = eval_settings(evaluate_config, prompts_config, trust)
    model, tokenizer, _ = load_model(model_dir, settings.load)
    target_set, benign_set = _prompt_sets(tokenizer, target, benign, settings, model.config)
    return Evaluator(model, tokenizer, target_set, benign_set, settings, model_dir=model_dir)


def worker(
    *,
    study_json: str | Path,
    worker_index: int,
    output: str | Path | None,
    model_dir: str | Path,
    layout_path: str | Path,
    measurements_path: str | Path,
    validation: dict[str, str | Path],
    sweep_config: dict,
    recipe_config: dict,
    evaluate_config: dict,
    prompts_config: dict,
    trust_remote_code: bool = False,
    kl: str = "first_token",
    max_trials: int | None = None,
) -> list[int]:
    """One search worker: load the model once, score trials on the validation prompts."""
    from .layout import Layout
    from .measure import load_measurements

    settings = parse_settings(sweep_config)
    study = json.loads(Path(study_json).read_text())
    context = TrialContext(
        space=SearchSpace.from_json(study["space"]),
        layout=Layout.load(layout_path),
        measurements=load_measurements(measurements_path),
        base_recipe=recipe_config,
        kl=kl,
        targets=study.get("targets"),
    )
    evaluator = _open_evaluator(
        model_dir,
        validation["target"],
        validation["benign"],
        evaluate_config,
        prompts_config,
        trust_remote_code,
    )
    done = run_worker(
        study["journal"],
        study["fingerprint"],
        settings,
        context,
        evaluator,
        worker=worker_index,
        max_trials=max_trials,
    )
    if output:
        write_json(output, {"worker": worker_index, "completed_trials": done})
    return done


def write_trials(*, study_json: str | Path, sweep_config: dict, output: str | Path) -> None:
    """search/trials.tsv: every completed trial's validation metrics and parameters."""
    from .sweep import write_table

    study = json.loads(Path(study_json).read_text())
    table, _ = trials_table(study["journal"], study["fingerprint"], parse_settings(sweep_config))
    write_table(table, output)


# --------------------------------------------------------------------------------------
# The report: the chosen recipe, scored once on the test split
# --------------------------------------------------------------------------------------


def _plain_recipe(num_layers: int, suggested: dict | None, base: dict) -> dict:
    """The plain full-strength baseline: the suggested direction removed from every layer
    at scale 1 without norm preservation (what the grid's "all" variant is)."""
    from .grid import Variant, variant_recipe

    variant = Variant(layers="all", norm_preserve=False)
    return variant_recipe(variant, num_layers=num_layers, suggested=suggested, base=base)


def report(
    *,
    study_json: str | Path,
    trials_path: str | Path,
    model_dir: str | Path,
    layout_path: str | Path,
    measurements_path: str | Path,
    suggested_path: str | Path | None,
    test: dict[str, str | Path],
    sweep_config: dict,
    recipe_config: dict,
    evaluate_config: dict,
    prompts_config: dict,
    table_out: str | Path,
    details_out: str | Path,
    best_yaml: str | Path,
    best_txt: str | Path,
    pareto_png: str | Path | None = None,
    samples_out: str | Path | None = None,
    max_refusal_rate: float = 0.1,
    min_benign_kept: float = 0.0,
    kl: str = "first_token",
    trust_remote_code: bool = False,
) -> tuple[str, str]:
    """Select on validation, score base / chosen / plain once on test, write the outputs.

    sweep.tsv: the base model's row (test), one row per trial (validation; the selected
    trial's row holds its test numbers, its validation numbers stay in `validation_*`
    columns), and the plain full-strength baseline (test), each rate with its 95 % Wilson
    interval.
    """
    import pandas as pd

    from .grid import load_suggested
    from .layout import Layout
    from .measure import load_measurements
    from .plots import plot_pareto
    from .sweep import (
        KL_COLUMNS,
        evaluate_recipes,
        samples_html,
        select_best,
        write_best,
        write_table,
    )

    study = json.loads(Path(study_json).read_text())
    settings = parse_settings(sweep_config)
    trials, recipes = trials_table(study["journal"], study["fingerprint"], settings)
    best, reason = select_best(trials, max_refusal_rate, kl, min_benign_kept)
    layout = Layout.load(layout_path)
    suggested = load_suggested(suggested_path) if suggested_path else None
    chosen = {"model": str(model_dir), "measurements": str(measurements_path), **recipes[best]}
    plain = {
        "model": str(model_dir),
        "measurements": str(measurements_path),
        **_plain_recipe(layout.num_layers, suggested, recipe_config),
    }
    to_score = {best: chosen, "plain": plain} if chosen["ablate"] else {"plain": plain}
    tested = evaluate_recipes(
        model_dir,
        to_score,
        layout=layout,
        measurements=load_measurements(measurements_path),
        target_prompts=test["target"],
        benign_prompts=test["benign"],
        settings=eval_settings(evaluate_config, prompts_config, trust_remote_code),
        details_path=details_out,
    )
    tested = tested.set_index("variant")
    if best not in tested.index:  # every group off: the chosen recipe is the base model
        tested.loc[best] = tested.loc["base"]
    metrics = [c for c in tested.columns if c in trials.columns]
    table = trials.copy()
    for column in VALIDATION_COLUMNS:
        table[f"validation_{column}"] = table[column]
    table.insert(1, "split", "validation")
    row = table.index[table["variant"] == best][0]
    for column in metrics:
        table.loc[row, column] = tested.loc[best, column]
    table.loc[row, "split"] = "test"
    extra = tested.loc[["base", "plain"], metrics].reset_index()
    extra.insert(1, "split", "test")
    table = pd.concat([extra.iloc[[0]], table, extra.iloc[[1]]], ignore_index=True)
    table.insert(1, "selected", table["variant"] == best)
    table = add_intervals(table)
    write_table(table, table_out)
    column = KL_COLUMNS[kl]
    row = table[table["selected"]].iloc[0]
    base = table[table["variant"] == "base"].iloc[0]
    text = (
        f"{reason} On the {int(row['n_target'])} + {int(row['n_benign'])} test prompts the "
        f"search never saw: refusal rate {_rate(row, 'refusal_rate')} (base model "
        f"{_rate(base, 'refusal_rate')}), benign answers kept {_rate(row, 'benign_kept')}, "
        f"benign prompts refused {_rate(row, 'benign_refusal_rate')} (base "
        f"{_rate(base, 'benign_refusal_rate')}), {kl.replace('_', '-')} KL "
        f"{row[column]:.4g} (plain full-strength edit: "
        f"{float(tested.loc['plain', column]):.4g})."
    )
    write_best(recipes[best], text, best_yaml, best_txt)
    if pareto_png:
        plot_pareto(
            table[table["variant"] != "plain"].assign(
                **{column: table[f"validation_{column}"].fillna(0.0)},
                refusal_rate=table["validation_refusal_rate"].fillna(table["refusal_rate"]),
            ),
            pareto_png,
            kl_column=column,
            best=best,
            max_refusal_rate=max_refusal_rate,
        )
    if samples_out:
        samples = json.loads(Path(details_out).read_text())["samples"]
        samples.setdefault(best, samples["base"])
        write_text_atomic(samples_out, samples_html(samples, best, text))
    logger.info("%s", text)
    return best, text


def _rate(row, column: str) -> str:
    value = float(row[column])
    low, high = (float(row[f"{column}_ci_low"]), float(row[f"{column}_ci_high"]))
    if math.isnan(value):
        return "n/a"
    return f"{value:.3f} (95 % CI {low:.3f}-{high:.3f})"


def rule_arguments(snakemake, *, validation: bool = True) -> dict:
    """The keyword arguments every search step takes from its rule (inputs and params of
    `search_inputs` and the config sections), so the adapters list only what differs."""
    arguments = {
        "model_dir": snakemake.params.model,
        "layout_path": snakemake.input.layout,
        "measurements_path": snakemake.input.measurements,
        "sweep_config": snakemake.params.sweep,
        "recipe_config": snakemake.params.recipe,
        "evaluate_config": snakemake.params.evaluate,
        "prompts_config": snakemake.params.prompts,
        "kl": snakemake.params.kl,
    }
    if validation:
        arguments["validation"] = {
            "target": snakemake.input.validation_target,
            "benign": snakemake.input.validation_benign,
        }
    return arguments
