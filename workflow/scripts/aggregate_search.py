"""Snakemake adapter: select on validation, score once on test (abliterate.search_steps.report)."""

from abliterate.search_steps import report, run_logged

run_logged(
    snakemake.log[0],
    report,
    study_json=snakemake.input.study,
    trials_path=snakemake.input.trials,
    model_dir=snakemake.params.model,
    layout_path=snakemake.input.layout,
    measurements_path=snakemake.input.measurements,
    suggested_path=snakemake.input.suggested,
    test={"target": snakemake.input.test_target, "benign": snakemake.input.test_benign},
    sweep_config=snakemake.params.sweep,
    recipe_config=snakemake.params.recipe,
    evaluate_config=snakemake.params.evaluate,
    prompts_config=snakemake.params.prompts,
    table_out=snakemake.output.table,
    details_out=snakemake.output.details,
    best_yaml=snakemake.output.best,
    best_txt=snakemake.output.reason,
    pareto_png=snakemake.output.pareto,
    samples_out=snakemake.output.samples,
    max_refusal_rate=snakemake.params.max_refusal_rate,
    kl=snakemake.params.kl,
    trust_remote_code=snakemake.params.trust_remote_code,
)
