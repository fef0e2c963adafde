"""Snakemake adapter: the config's `recipe:` section as export/recipe.yaml."""

from abliterate.logs import setup_logging
from abliterate.recipe import write_recipe

with open(snakemake.log[0], "w") as log:
    setup_logging(stream=log)
    write_recipe(snakemake.params.recipe, snakemake.output.recipe)
