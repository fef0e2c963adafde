"""Snakemake adapter: per-layer analysis and suggested recipe (abliterate.analyze)."""

from pathlib import Path

from abliterate.analyze import write_analysis
from abliterate.logs import rule_log
from abliterate.measure import load_measurements

with rule_log(snakemake):
    write_analysis(
        load_measurements(snakemake.input.measurements),
        Path(snakemake.output.table).parent,
        charts=True,
        min_layer_fraction=snakemake.params.min_layer_fraction,
        title=snakemake.params.title,
        require_experts="experts" in snakemake.output.keys(),
    )
