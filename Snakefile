# abliterate: measure, analyse, sweep and remove a behaviour direction from an LLM checkpoint.
# Run `snakemake --cores N` (default config: the built-in demo organism, no downloads).
from snakemake.utils import min_version, validate

min_version("8.0")


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/search_common.smk"


wildcard_constraints:
    model=MODEL,


include: "workflow/rules/model.smk"
include: "workflow/rules/measure.smk"
include: "workflow/rules/analyze.smk"
include: "workflow/rules/prompts.smk"


if config["sweep"]["method"] == "tpe":

    include: "workflow/rules/search.smk"

else:

    include: "workflow/rules/evaluate.smk"


include: "workflow/rules/report.smk"
include: "workflow/rules/ablate.smk"


rule all:
    default_target: True
    input:
        final_outputs(),
