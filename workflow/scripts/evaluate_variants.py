"""Snakemake adapter: evaluate one chunk of sweep variants (abliterate.sweep.evaluate_chunk).

The rule's params name the config sections this job depends on (a change reruns it); the
settings themselves come from the validated config in one call.
"""

from abliterate.evaluate import EvalSettings
from abliterate.gpus import use_job_devices
from abliterate.grid import find_variants, variants
from abliterate.logs import rule_log
from abliterate.sweep import evaluate_chunk

with rule_log(snakemake):
    use_job_devices(snakemake.resources.gpu, snakemake.threads)
    evaluate_chunk(
        snakemake.params.model,
        find_variants(variants(snakemake.params.sweep), snakemake.params.variants),
        layout_path=snakemake.input.layout,
        measurements_path=snakemake.input.measurements,
        suggested_path=snakemake.input.suggested,
        base_recipe=snakemake.params.recipe,
        target_prompts=snakemake.params.target,
        benign_prompts=snakemake.params.benign,
        table_path=snakemake.output.table,
        details_path=snakemake.output.details,
        settings=EvalSettings.from_config(snakemake.config),
    )
