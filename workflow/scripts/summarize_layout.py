"""Snakemake adapter: layout.json -> layout.txt (abliterate.layout's summary and table)."""

from abliterate.layout import Layout, component_table, summary_line
from abliterate.logs import rule_log

with rule_log(snakemake):
    layout = Layout.load(snakemake.input.layout)
    with open(snakemake.output.summary, "w") as out:
        out.write(summary_line(layout) + "\n\n" + component_table(layout) + "\n")
