"""Snakemake adapter: measure class means (abliterate.measure.measure_to_file)."""

from abliterate.gpus import use_job_devices
from abliterate.logs import setup_logging
from abliterate.measure import measure_to_file

prompts = snakemake.params.prompts
options = snakemake.params.measure

with open(snakemake.log[0], "w") as log:
    setup_logging(stream=log)
    use_job_devices(snakemake.resources.gpu, snakemake.threads)  # own GPU(s), threads
    measure_to_file(
        snakemake.params.model,
        snakemake.params.target,
        snakemake.params.benign,
        snakemake.output.measurements,
        field=prompts["field"],
        split=prompts["split"],
        max_count=prompts["max"],
        seed=prompts["seed"],
        system=prompts["system"],
        fallback_template=prompts["fallback_template"],
        position=options["position"],
        batch_size=options["batch_size"],
        clip=options["clip"],
        device=options["device"],
        dtype=options["dtype"],
        device_map=options["device_map"],
        load_in_4bit=options["load_in_4bit"],
        load_in_8bit=options["load_in_8bit"],
        trust_remote_code=snakemake.params.trust_remote_code,
        progress=False,
    )
