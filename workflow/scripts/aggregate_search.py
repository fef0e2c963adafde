"""Snakemake adapter: select on validation, score once on test (abliterate.search_steps.report)."""

from abliterate.gpus import use_job_devices
from abliterate.logs import rule_log
from abliterate.search_steps import report, rule_arguments

with rule_log(snakemake):
    use_job_devices(snakemake.resources.gpu, snakemake.threads)
    report(
        study_json=snakemake.input.study,
        trials_path=snakemake.input.trials,
        suggested_path=snakemake.input.suggested,
        test={"target": snakemake.input.test_target, "benign": snakemake.input.test_benign},
        table_out=snakemake.output.table,
        details_out=snakemake.output.details,
        best_yaml=snakemake.output.best,
        best_txt=snakemake.output.reason,
        pareto_png=snakemake.output.pareto,
        samples_out=snakemake.output.samples,
        max_refusal_rate=snakemake.params.max_refusal_rate,
        min_benign_kept=snakemake.params.min_benign_kept,
        trust_remote_code=snakemake.params.trust_remote_code,
        **rule_arguments(snakemake, validation=False),
    )
