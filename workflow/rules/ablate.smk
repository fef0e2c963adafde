# Stage: export. Resolve the recipe to a per-tensor plan, list the shards it touches
# (a checkpoint), edit each such shard in its own job, assemble the export in
# export/assembled/ (untouched shards reflinked or copied, index, config, tokenizer, model
# card, manifest), verify it, and publish it as abliterated/ with the result in its card.
# No rule declares a directory() output here: Snakemake writes a .snakemake_timestamp into
# those, which a folder upload to the Hub would publish; the manifest stands for the folder.


rule write_recipe:
    output:
        recipe=f"{RESULTS}/export/recipe.yaml",
    log:
        f"{RESULTS}/logs/write_recipe.log",
    conda:
        "../../envs/abliterate.yaml"
    params:
        recipe=config["recipe"],
    script:
        "../scripts/write_recipe.py"


rule plan_ablation:
    input:
        unpack(plan_inputs),
    output:
        plan=f"{RESULTS}/export/plan.json",
        directions=f"{RESULTS}/export/plan.safetensors",
        text=report(
            f"{RESULTS}/export/plan.txt",
            category="5. Export",
            caption="../report/plan.rst",
        ),
    log:
        f"{RESULTS}/logs/plan_ablation.log",
    conda:
        "../../envs/abliterate.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        model=model_dir,
    script:
        "../scripts/plan_ablation.py"


checkpoint plan_shards:
    input:
        plan=f"{RESULTS}/export/plan.json",
        directions=f"{RESULTS}/export/plan.safetensors",
        model=model_input,
    output:
        shards=f"{RESULTS}/export/shards.json",
    log:
        f"{RESULTS}/logs/plan_shards.log",
    conda:
        "../../envs/abliterate.yaml"
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        model=model_dir,
        allow_external_links=config["export"]["allow_external_links"],
        mxfp4=config["export"]["mxfp4"],
    script:
        "../scripts/plan_shards.py"


rule ablate_shard:
    input:
        plan=f"{RESULTS}/export/plan.json",
        directions=f"{RESULTS}/export/plan.safetensors",
        shards=f"{RESULTS}/export/shards.json",
        model=model_input,
    output:
        # temporary: once assembled (hard-linked into abliterated/) they are deleted, so
        # the export shares no inode with another file
        shard=temp(f"{RESULTS}/export/shards/{{shard}}"),
        digest=temp(f"{RESULTS}/export/shards/{{shard}}.sha256"),
    log:
        f"{RESULTS}/logs/ablate_shard/{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/ablate_shard/{{shard}}.tsv"
    wildcard_constraints:
        shard=r"[^/]+\.safetensors",
    conda:
        "../../envs/abliterate.yaml"
    threads: 2
    resources:
        mem_mb=config["export"]["mem_mb"],
        runtime=60,
        gpu=int(config["export"]["gpu"]),
    params:
        model=model_dir,
        device=config["export"]["device"],
        mxfp4=config["export"]["mxfp4"],
    script:
        "../scripts/ablate_shard.py"


rule assemble_model:
    input:
        unpack(assemble_inputs),
    output:
        # temporary: verify_model moves the assembled folder to abliterated/
        manifest=temp(f"{RESULTS}/export/assembled/manifest.json"),
    log:
        f"{RESULTS}/logs/assemble_model.log",
    benchmark:
        f"{RESULTS}/benchmarks/assemble_model.tsv"
    conda:
        "../../envs/abliterate.yaml"
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        model=model_dir,
        edited_dir=f"{RESULTS}/export/shards",
        link=config["export"]["link"],
        allow_external_links=config["export"]["allow_external_links"],
        card=config["export"]["card"],
        mxfp4=config["export"]["mxfp4"],
    script:
        "../scripts/assemble_model.py"


rule verify_model:
    input:
        unpack(verify_inputs),
    output:
        json=f"{RESULTS}/verify.json",
        text=report(
            f"{RESULTS}/verify.txt",
            category="5. Export",
            caption="../report/verify.rst",
        ),
        # the published export (abliterated/ itself is not declared: see the top)
        manifest=f"{RESULTS}/abliterated/manifest.json",
        card=f"{RESULTS}/abliterated/README.md",
    log:
        f"{RESULTS}/logs/verify_model.log",
    benchmark:
        f"{RESULTS}/benchmarks/verify_model.tsv"
    conda:
        "../../envs/abliterate.yaml"
    threads: 4
    resources:
        mem_mb=16000,
        runtime=120,
        gpu=int(config["export"]["gpu"]),
    params:
        model=model_dir,
        device=config["export"]["device"],
        generate=config["export"]["generate_check"],
        link=config["export"]["link"],
        card=config["export"]["card"],
    script:
        "../scripts/verify_model.py"
