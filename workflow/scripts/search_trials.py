"""Snakemake adapter: the study's trials on the validation prompts (search/trials.tsv)."""

from abliterate.logs import rule_log
from abliterate.search_steps import write_trials

with rule_log(snakemake):
    write_trials(
        study_json=snakemake.input.study,
        sweep_config=snakemake.params.sweep,
        output=snakemake.output.trials,
    )
