"""Snakemake adapter: the config's `recipe:` section as export/recipe.yaml."""

from abliterate.logs import rule_log
from abliterate.recipe import write_recipe

with rule_log(snakemake):
    write_recipe(snakemake.params.recipe, snakemake.output.recipe)
