"""Snakemake adapter: one search worker (abliterate.search_steps.worker)."""

from abliterate.search_steps import rule_arguments, run_logged, worker

run_logged(
    snakemake.log[0],
    worker,
    study_json=snakemake.input.study,
    worker_index=int(snakemake.wildcards.worker),
    output=snakemake.output.done,
    trust_remote_code=snakemake.params.trust_remote_code,
    **rule_arguments(snakemake),
)
