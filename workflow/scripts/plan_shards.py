"""Snakemake adapter: which shards hold a target (edited) and which are linked."""

from abliterate.export import plan_shards
from abliterate.files import write_json
from abliterate.logs import rule_log
from abliterate.recipe import Plan

with rule_log(snakemake):
    jobs = plan_shards(
        Plan.load(snakemake.input.plan),
        snakemake.params.model,
        allow_external_links=snakemake.params.allow_external_links,
        mxfp4=snakemake.params.mxfp4,
    )
    write_json(jobs, snakemake.output.shards)
