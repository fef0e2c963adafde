# abliterate: measure, analyse, sweep and remove a behaviour direction from an LLM checkpoint.
# Run `snakemake --cores N` (default config: the built-in demo organism, no downloads).
import os
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("8.0")


# Jobs run the library as `python -m abliterate` with this checkout's src/ on PYTHONPATH
# and the interpreter that runs Snakemake first on PATH, so `.venv/bin/snakemake ...` works
# without an activated venv, locally and in cluster jobs (which inherit this environment
# and re-run this file). With `--sdm conda` each job's environment (envs/) is activated in
# front of it and provides the dependencies; the code still comes from src/.
for _variable, _entry in (
    ("PATH", str(Path(sys.executable).parent)),
    ("PYTHONPATH", str(Path(workflow.basedir) / "src")),
):
    _parts = [part for part in os.environ.get(_variable, "").split(os.pathsep) if part]
    if _parts[:1] != [_entry]:
        os.environ[_variable] = os.pathsep.join([_entry, *_parts])


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/search_common.smk"


wildcard_constraints:
    model=MODEL,


# Light file copies run where Snakemake runs (a cluster's login node), never as jobs.
localrules:
    write_recipe,
    summarize_layout,
    copy_model_card,


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
include: "workflow/rules/compare.smk"
include: "workflow/rules/gguf.smk"


rule all:
    default_target: True
    input:
        final_outputs(),
