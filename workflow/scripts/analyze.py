"""Snakemake adapter: per-layer analysis and suggested recipe (abliterate.analyze), ranked
by intervention on the validation prompts unless analyze.intervene is false."""

from pathlib import Path

from abliterate.analyze import write_analysis
from abliterate.gpus import use_job_devices
from abliterate.intervene import workflow_interventions
from abliterate.logs import rule_log
from abliterate.measure import load_measurements

with rule_log(snakemake):
    meas = load_measurements(snakemake.input.measurements)
    interventions = None
    if "validation_target" in snakemake.input.keys():
        use_job_devices(snakemake.resources.gpu, snakemake.threads)
        interventions = workflow_interventions(
            model_dir=snakemake.params.model,
            layout_path=snakemake.input.layout,
            measurements=meas,
            validation={
                "target": snakemake.input.validation_target,
                "benign": snakemake.input.validation_benign,
            },
            analyze_config=snakemake.params.analyze,
            evaluate_config=snakemake.params.evaluate,
            prompts_config=snakemake.params.prompts,
            trust_remote_code=snakemake.params.trust_remote_code,
        )
    write_analysis(
        meas,
        Path(snakemake.output.table).parent,
        charts=True,
        min_layer_fraction=snakemake.params.min_layer_fraction,
        title=snakemake.params.title,
        require_experts="experts" in snakemake.output.keys(),
        require_attribution="expert_share" in snakemake.output.keys(),
        interventions=interventions,
    )
