"""Snakemake adapter: evaluate one chunk of sweep variants (abliterate.sweep.evaluate_chunk)."""

from abliterate.gpus import use_job_devices
from abliterate.logs import setup_logging
from abliterate.sweep import evaluate_chunk, find_variants, variants

with open(snakemake.log[0], "w") as log:
    setup_logging(stream=log)
    use_job_devices(snakemake.resources.gpu, snakemake.threads)  # own GPU(s), threads
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
        evaluate_config=snakemake.params.evaluate,
        prompts_config=snakemake.params.prompts,
        trust_remote_code=snakemake.params.trust_remote_code,
    )
