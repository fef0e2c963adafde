# Stage 2: measurement. One forward pass per batch over the target and benign training
# prompts; class means at every measurement index (+ router counts on MoE models).


rule measure:
    input:
        unpack(measure_inputs),
    output:
        measurements=f"{RESULTS}/measurements.safetensors",
        metadata=f"{RESULTS}/measurements.json",
    log:
        f"{RESULTS}/logs/measure.log",
    benchmark:
        f"{RESULTS}/benchmarks/measure.tsv"
    conda:
        "../../envs/abliterate.yaml"
    threads: 4
    resources:
        mem_mb=16000,
        runtime=120,
        gpu=int(config["measure"]["gpu"]),
    params:
        model=model_dir,
        target=lambda wildcards: prompt_file("target", "train"),
        benign=lambda wildcards: prompt_file("benign", "train"),
        prompts=config["prompts"],
        measure=config["measure"],
        trust_remote_code=config["model"]["trust_remote_code"],
    script:
        "../scripts/measure.py"
