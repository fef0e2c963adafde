"""Snakemake adapter: the study's trials on the validation prompts (search/trials.tsv)."""

from abliterate.search_steps import run_logged, write_trials

run_logged(
    snakemake.log[0],
    write_trials,
    study_json=snakemake.input.study,
    sweep_config=snakemake.params.sweep,
    output=snakemake.output.trials,
)
