"""Snakemake adapter: which shards hold a target (edited) and which are linked."""

from abliterate.export import plan_shards
from abliterate.files import write_json
from abliterate.logs import setup_logging
from abliterate.recipe import Plan

with open(snakemake.log[0], "w") as log:
    setup_logging(stream=log)
    write_json(plan_shards(Plan.load(snakemake.input.plan), snakemake.params.model),
               snakemake.output.shards)  # fmt: skip
