"""Snakemake adapter: one search worker (abliterate.search_steps.worker)."""

from abliterate.search_steps import run_logged, worker

run_logged(
    snakemake.log[0],
    worker,
    study_json=snakemake.input.study,
    worker_index=int(snakemake.wildcards.worker),
    output=snakemake.output.done,
    model_dir=snakemake.params.model,
    layout_path=snakemake.input.layout,
    measurements_path=snakemake.input.measurements,
    validation={
        "target": snakemake.input.validation_target,
        "benign": snakemake.input.validation_benign,
    },
    sweep_config=snakemake.params.sweep,
    recipe_config=snakemake.params.recipe,
    evaluate_config=snakemake.params.evaluate,
    prompts_config=snakemake.params.prompts,
    trust_remote_code=snakemake.params.trust_remote_code,
    kl=snakemake.params.kl,
)
