"""Snakemake adapter: create (or check) the search study (abliterate.search_steps.init_study)."""

from abliterate.logs import rule_log
from abliterate.search_steps import init_study, rule_arguments

with rule_log(snakemake):
    init_study(
        journal=snakemake.params.journal,
        study_json=snakemake.output.study,
        suggested_path=snakemake.input.suggested,
        select_config=snakemake.params.select,
        **rule_arguments(snakemake),
    )
