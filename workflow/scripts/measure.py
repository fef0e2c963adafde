"""Snakemake adapter: measure class means (abliterate.measure.measure_to_file)."""

from abliterate.logs import rule_log
from abliterate.measure import measure_to_file

prompts = snakemake.params.prompts
options = snakemake.params.measure

with rule_log(snakemake):
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
