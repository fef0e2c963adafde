# Stage: sweep. Evaluate every variant of the config's grid in memory (a chunk of variants
# per job, one model load each), then aggregate, plot and select the recipe to export.


rule evaluate_variants:
    input:
        unpack(evaluate_inputs),
    output:
        table=f"{RESULTS}/sweep/chunk-{{chunk}}.tsv",
        details=f"{RESULTS}/sweep/chunk-{{chunk}}.json",
    log:
        f"{RESULTS}/logs/evaluate_variants-{{chunk}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_variants-{{chunk}}.tsv"
    wildcard_constraints:
        chunk=r"\d+",
    conda:
        "../../envs/abliterate.yaml"
    threads: 4
    resources:
        mem_mb=16000,
        runtime=240,
        gpu=int(config["evaluate"]["gpu"]),
    params:
        model=model_dir,
        variants=sweep_chunk_variants,
        target=lambda wildcards: prompt_file("target", "test"),
        benign=lambda wildcards: prompt_file("benign", "test"),
        sweep=config["sweep"],
        recipe=config["recipe"],
        evaluate=config["evaluate"],
        prompts=config["prompts"],
        trust_remote_code=config["model"]["trust_remote_code"],
    script:
        "../scripts/evaluate_variants.py"


rule aggregate_sweep:
    input:
        tables=sweep_chunk_files("tsv"),
        details=sweep_chunk_files("json"),
    output:
        **sweep_outputs(),
    log:
        f"{RESULTS}/logs/aggregate_sweep.log",
    conda:
        "../../envs/abliterate.yaml"
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        max_refusal_rate=config["select"]["max_refusal_rate"],
        min_benign_kept=config["select"]["min_benign_kept"],
        kl=config["select"]["kl"],
    script:
        "../scripts/aggregate_sweep.py"
