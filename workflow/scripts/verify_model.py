"""Snakemake adapter: verify.json + verify.txt for the exported model."""

from abliterate.errors import AbliterateError
from abliterate.gpus import use_job_devices
from abliterate.logs import rule_log
from abliterate.recipe import Plan
from abliterate.verify import summary, verify, write_report

with rule_log(snakemake) as log:
    use_job_devices(snakemake.resources.gpu, snakemake.threads)
    report = verify(
        snakemake.params.model,
        snakemake.input.output,
        Plan.load(snakemake.input.plan),
        generate=None if snakemake.params.generate else False,
        device=snakemake.params.device,
    )
    write_report(report, snakemake.output.json, snakemake.output.text)
    log.write(summary(report))
    if not report["ok"]:
        raise AbliterateError(
            f"verification of {snakemake.input.output} failed: {report['failures'][0]}"
        )
