"""Snakemake adapter: one shard, streamed through the plan's edits (+ its SHA-256)."""

from abliterate.export import ablate_shard
from abliterate.files import write_text_atomic
from abliterate.gpus import use_job_devices
from abliterate.logs import rule_log
from abliterate.recipe import Plan

with rule_log(snakemake):
    use_job_devices(snakemake.resources.gpu, snakemake.threads)
    digest = ablate_shard(
        snakemake.params.model,
        snakemake.wildcards.shard,
        Plan.load(snakemake.input.plan),
        snakemake.output.shard,
        device=snakemake.params.device,
        digest=True,
        mxfp4=snakemake.params.mxfp4,
    )
    write_text_atomic(snakemake.output.digest, digest + "\n")
