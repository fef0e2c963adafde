"""Snakemake adapter: one search worker (abliterate.search_steps.worker)."""

from abliterate.gpus import use_job_devices
from abliterate.logs import rule_log
from abliterate.search_steps import rule_arguments, worker

with rule_log(snakemake):
    use_job_devices(snakemake.resources.gpu, snakemake.threads)
    worker(
        study_json=snakemake.input.study,
        worker_index=int(snakemake.wildcards.worker),
        output=snakemake.output.done,
        trust_remote_code=snakemake.params.trust_remote_code,
        **rule_arguments(snakemake),
    )
