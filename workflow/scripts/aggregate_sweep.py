"""Snakemake adapter: sweep.tsv, plots and best.yaml (abliterate.sweep.aggregate)."""

from abliterate.logs import rule_log
from abliterate.sweep import aggregate

with rule_log(snakemake):
    aggregate(
        snakemake.input.tables,
        snakemake.input.details,
        table_out=snakemake.output.table,
        best_yaml=snakemake.output.best,
        best_txt=snakemake.output.reason,
        pareto_png=snakemake.output.pareto,
        heatmap_png=snakemake.output.heatmap,
        samples_out=snakemake.output.samples,
        routing_json=getattr(snakemake.output, "routing_json", None),
        routing_png=getattr(snakemake.output, "routing", None),
        max_refusal_rate=snakemake.params.max_refusal_rate,
        min_benign_kept=snakemake.params.min_benign_kept,
        kl=snakemake.params.kl,
    )
