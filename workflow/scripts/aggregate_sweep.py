"""Snakemake adapter: sweep.tsv, plots and best.yaml (abliterate.sweep.aggregate)."""

from abliterate.logs import setup_logging
from abliterate.sweep import aggregate

with open(snakemake.log[0], "w") as log:
    setup_logging(stream=log)
    aggregate(
        snakemake.input.tables,
        snakemake.input.details,
        table_out=snakemake.output.table,
        best_yaml=snakemake.output.best,
        best_txt=snakemake.output.reason,
        pareto_png=snakemake.output.pareto,
        heatmap_png=snakemake.output.heatmap,
        samples_out=snakemake.output.samples,
        max_refusal_rate=snakemake.params.max_refusal_rate,
        kl=snakemake.params.kl,
    )
