"""Snakemake adapter: one class's train/validation/test prompts (abliterate.splits)."""

from abliterate.logs import rule_log
from abliterate.splits import SPLITS, split_to_files

prompts = snakemake.params.prompts
with rule_log(snakemake):
    split_to_files(
        outputs={name: snakemake.output[name] for name in SPLITS},
        train=snakemake.params.train,
        validation=snakemake.params.validation,
        test=snakemake.params.test,
        fractions=prompts["fractions"],
        seed=prompts["seed"],
        field=prompts["field"],
        dataset_split=prompts["split"],
        cls=snakemake.wildcards.cls,
    )
