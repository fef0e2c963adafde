"""Snakemake adapter: verify export/assembled/, write verify.json + verify.txt, then
publish it as abliterated/ with the result in its card (a failed export is not published).
"""

from pathlib import Path

from abliterate.card import CardOptions
from abliterate.errors import AbliterateError
from abliterate.export import publish, sweep_metrics
from abliterate.gpus import use_job_devices
from abliterate.logs import rule_log
from abliterate.recipe import Plan
from abliterate.verify import summary, verify, write_report

with rule_log(snakemake) as log:
    use_job_devices(snakemake.resources.gpu, snakemake.threads)
    assembled = Path(snakemake.input.assembled).parent
    published = Path(snakemake.output.manifest).parent
    plan = Plan.load(snakemake.input.plan)
    report = verify(
        snakemake.params.model,
        assembled,
        plan,
        generate=None if snakemake.params.generate else False,
        device=snakemake.params.device,
    )
    report["output"] = str(published)  # what a user finds; the files are the same
    write_report(report, snakemake.output.json, snakemake.output.text)
    log.write(summary(report))
    if not report["ok"]:
        raise AbliterateError(
            f"verification of {assembled} failed: {report['failures'][0]}; it was not "
            f"published as {published}."
        )
    publish(
        assembled,
        published,
        plan,
        snakemake.params.model,
        metrics=sweep_metrics(snakemake.input.get("sweep")),
        link_mode=snakemake.params.link,
        card=CardOptions(**snakemake.params.card),
        verification=report,
    )
