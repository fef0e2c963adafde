# Stage 1: the checkpoint. Build the demo organism when no model is named; inspect headers.


rule build_demo_model:
    output:
        model=directory(DEMO_DIR),
    log:
        "resources/demo/logs/build_demo_model.log",
    benchmark:
        "resources/demo/benchmarks/build_demo_model.tsv"
    conda:
        "../../envs/abliterate.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        arch=config["model"]["demo"]["arch"],
        seed=config["model"]["demo"]["seed"],
        wording=config["model"]["demo"]["wording"],
    shell:
        "python -m abliterate demo-model {output.model} --arch {params.arch} --seed {params.seed} "
        "--wording {params.wording} > {log} 2>&1"


rule inspect_model:
    input:
        model_input,
    output:
        layout=f"{RESULTS}/layout.json",
    log:
        f"{RESULTS}/logs/inspect_model.log",
    conda:
        "../../envs/abliterate.yaml"
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        model=model_dir,
    shell:
        "python -m abliterate inspect {params.model} --json {output.layout} > {log} 2>&1"
