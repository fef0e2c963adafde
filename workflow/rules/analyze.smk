# Stage 3: per-layer analysis of the measured direction: metrics table, plots and a
# suggested recipe (the sweep starts from it).


rule analyze:
    input:
        measurements=f"{RESULTS}/measurements.safetensors",
    output:
        **analysis_outputs(),
    log:
        f"{RESULTS}/logs/analyze.log",
    conda:
        "../../envs/abliterate.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        min_layer_fraction=config["analyze"]["min_layer_fraction"],
        title=MODEL,
    script:
        "../scripts/analyze.py"
