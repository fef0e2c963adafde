"""Snakemake adapter: measure class means (abliterate.measure.measure_to_file).

The rule's params name the config sections this job depends on (a change reruns it); the
options themselves come from the validated config in one call.
"""

from abliterate.gpus import use_job_devices
from abliterate.logs import rule_log
from abliterate.measure import MeasureOptions, measure_to_file

with rule_log(snakemake):
    use_job_devices(snakemake.resources.gpu, snakemake.threads)
    measure_to_file(
        snakemake.params.model,
        snakemake.params.target,
        snakemake.params.benign,
        snakemake.output.measurements,
        MeasureOptions.from_config(snakemake.config),
    )
