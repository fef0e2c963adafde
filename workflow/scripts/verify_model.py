"""Snakemake adapter: verify.json + verify.txt for the exported model."""

from abliterate.gpus import use_job_devices
from abliterate.logs import setup_logging
from abliterate.recipe import Plan
from abliterate.verify import summary, verify, write_report

with open(snakemake.log[0], "w") as log:
    setup_logging(stream=log)
    use_job_devices(snakemake.resources.gpu, snakemake.threads)  # own GPU(s), threads
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
        raise SystemExit(f"verification failed: {report['failures'][0]}")
