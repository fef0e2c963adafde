"""Snakemake adapter: layout.json -> layout.txt (abliterate.layout's summary and table)."""

from abliterate.layout import Layout, component_table, summary_line
from abliterate.logs import setup_logging

with open(snakemake.log[0], "w") as log:
    setup_logging(stream=log)
    layout = Layout.load(snakemake.input.layout)
    with open(snakemake.output.summary, "w") as out:
        out.write(summary_line(layout) + "\n\n" + component_table(layout) + "\n")
