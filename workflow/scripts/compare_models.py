"""Snakemake adapter: compare.tsv, compare.png and compare_answers.tsv (abliterate.compare).

The answers use the first `evaluate.samples` held-out target and benign prompts, loaded
and generated with the `evaluate:` settings, rendered with the `prompts:` settings.
"""

from pathlib import Path

from abliterate.compare import (
    changes_table,
    plan_directions,
    plot_changes,
    side_by_side,
    weight_changes,
    write_answers_tsv,
    write_changes_tsv,
)
from abliterate.layout import inspect_checkpoint
from abliterate.logs import setup_logging
from abliterate.model import LoadOptions
from abliterate.prompts import PromptOptions

with open(snakemake.log[0], "w") as log:
    setup_logging(stream=log)
    source = snakemake.params.model
    output = str(Path(snakemake.input.output).parent)  # the export's manifest.json
    evaluate = snakemake.params.evaluate
    layout = inspect_checkpoint(source)
    directions = plan_directions(snakemake.input.plan, source, layout)
    changes = weight_changes(source, output, directions, layout=layout)
    log.write(changes_table(changes))
    write_changes_tsv(changes, snakemake.output.table)
    plot_changes(changes, snakemake.output.plot, title=f"{Path(source).name} vs its export")
    prompt_options = PromptOptions.from_config(snakemake.params.prompts)
    count = max(1, int(evaluate["samples"]))
    prompts = [
        *prompt_options.load(snakemake.params.target)[:count],
        *prompt_options.load(snakemake.params.benign)[:count],
    ]
    rows = side_by_side(
        source,
        output,
        prompts,
        load=LoadOptions.from_config(
            evaluate, trust_remote_code=snakemake.config["model"]["trust_remote_code"]
        ),
        prompt_options=prompt_options,
        max_new_tokens=evaluate["max_new_tokens"],
        batch_size=evaluate["batch_size"],
    )
    write_answers_tsv(rows, snakemake.output.answers)
