"""Snakemake adapter: one shard, streamed through the plan's edits (+ its SHA-256)."""

from pathlib import Path

from abliterate.export import ablate_shard
from abliterate.gpus import use_job_devices
from abliterate.logs import setup_logging
from abliterate.recipe import Plan

with open(snakemake.log[0], "w") as log:
    setup_logging(stream=log)
    use_job_devices(snakemake.resources.gpu, snakemake.threads)  # own GPU(s), threads
    digest = ablate_shard(
        snakemake.params.model,
        snakemake.wildcards.shard,
        Plan.load(snakemake.input.plan),
        snakemake.output.shard,
        device=snakemake.params.device,
        digest=True,
    )
    Path(snakemake.output.digest).write_text(digest + "\n")
