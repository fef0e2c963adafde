"""Snakemake adapter: edited shards + linked shards + metadata -> the output directory."""

from abliterate.export import assemble, read_digests, sweep_metrics
from abliterate.logs import rule_log
from abliterate.recipe import Plan

with rule_log(snakemake):
    assemble(
        snakemake.params.model,
        snakemake.output.model,
        Plan.load(snakemake.input.plan),
        snakemake.params.edited_dir,
        metrics=sweep_metrics(snakemake.input.get("sweep")),
        digests=read_digests(snakemake.input.digests),
        link_mode=snakemake.params.link,
        allow_external_links=snakemake.params.allow_external_links,
    )
