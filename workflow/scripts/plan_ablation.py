"""Snakemake adapter: recipe + layout + measurements -> plan.json (abliterate.recipe)."""

from pathlib import Path

from abliterate.logs import rule_log
from abliterate.recipe import build_plan

with rule_log(snakemake):
    plan = build_plan(
        snakemake.input.recipe,
        model=snakemake.params.model,
        measurements=snakemake.input.measurements,
        layout=snakemake.input.layout,
    )
    plan.save(snakemake.output.plan)
    Path(snakemake.output.text).write_text(plan.describe() + "\n")
