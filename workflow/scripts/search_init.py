"""Snakemake adapter: create (or check) the search study (abliterate.search_steps.init_study)."""

from abliterate.search_steps import init_study, run_logged

run_logged(
    snakemake.log[0],
    init_study,
    journal=snakemake.params.journal,
    study_json=snakemake.output.study,
    model_dir=snakemake.params.model,
    layout_path=snakemake.input.layout,
    measurements_path=snakemake.input.measurements,
    suggested_path=snakemake.input.suggested,
    validation={
        "target": snakemake.input.validation_target,
        "benign": snakemake.input.validation_benign,
    },
    sweep_config=snakemake.params.sweep,
    recipe_config=snakemake.params.recipe,
    evaluate_config=snakemake.params.evaluate,
    prompts_config=snakemake.params.prompts,
    kl=snakemake.params.kl,
)
