"""Snakemake adapter: edited shards + linked shards + metadata -> export/assembled/.

verify_model checks it and publishes it as abliterated/ (the output named here is the
folder's manifest.json: a directory() output would get Snakemake's .snakemake_timestamp).
"""

from pathlib import Path

from abliterate.card import CardOptions
from abliterate.export import assemble, read_digests, sweep_metrics
from abliterate.logs import rule_log
from abliterate.recipe import Plan

with rule_log(snakemake):
    assemble(
        snakemake.params.model,
        Path(snakemake.output.manifest).parent,
        Plan.load(snakemake.input.plan),
        snakemake.params.edited_dir,
        metrics=sweep_metrics(snakemake.input.get("sweep")),
        digests=read_digests(snakemake.input.digests),
        link_mode=snakemake.params.link,
        allow_external_links=snakemake.params.allow_external_links,
        card=CardOptions(**snakemake.params.card),
        mxfp4=snakemake.params.mxfp4,
    )
