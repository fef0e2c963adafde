"""Snakemake adapter: convert the verified export to GGUF with llama.cpp's converter and
check the edited tensors in it (gguf.json + gguf.txt); a failed check removes the GGUF."""

from pathlib import Path

from abliterate import gguf
from abliterate.errors import AbliterateError
from abliterate.files import write_json, write_text_atomic
from abliterate.logs import rule_log
from abliterate.recipe import Plan

with rule_log(snakemake) as log:
    export_dir = Path(snakemake.input.manifest).parent
    output = Path(snakemake.output.gguf)
    gguf.convert(
        export_dir,
        output,
        converter=snakemake.params.converter,
        outtype=snakemake.params.outtype,
        pre_tokenizer=snakemake.params.pre_tokenizer,
        log=log,
    )
    plan = Plan.load(snakemake.input.plan)
    report = gguf.check(output, export_dir, snakemake.params.model, plan.keys())
    text = gguf.summary(report)
    log.write(text)
    if not report["ok"]:
        output.unlink()
        raise AbliterateError(f"{output}: {report['failures'][0]}; the GGUF was removed.")
    write_json(report, snakemake.output.json)
    write_text_atomic(snakemake.output.text, text)
