# Stage 3: per-layer analysis of the measured direction: metrics table, plots and a
# suggested recipe (the sweep starts from it). With analyze.intervene (the default) the
# candidate directions are also ranked by intervention on the validation prompts: the job
# then loads the model once (abliterate.intervene).


rule analyze:
    input:
        unpack(analyze_inputs),
    output:
        **analysis_outputs(),
    log:
        f"{RESULTS}/logs/analyze.log",
    conda:
        "../../envs/abliterate.yaml"
    threads: 4 if config["analyze"]["intervene"] else 1
    resources:
        mem_mb=16000 if config["analyze"]["intervene"] else 4000,
        runtime=60,
        gpu=int(config["evaluate"]["gpu"]) if config["analyze"]["intervene"] else 0,
    params:
        min_layer_fraction=config["analyze"]["min_layer_fraction"],
        title=MODEL,
        model=model_dir,
        analyze=config["analyze"],
        evaluate=config["evaluate"],
        prompts=config["prompts"],
        trust_remote_code=config["model"]["trust_remote_code"],
    script:
        "../scripts/analyze.py"
