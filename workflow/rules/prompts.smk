# Stage: prompt splits. Train / validation / test prompts per class (abliterate.splits):
# the search scores trials on validation prompts and reports the winner on test prompts.


rule split_prompts:
    input:
        unpack(split_inputs),
    output:
        train=f"{RESULTS}/prompts/{{cls}}_train.json",
        validation=f"{RESULTS}/prompts/{{cls}}_validation.json",
        test=f"{RESULTS}/prompts/{{cls}}_test.json",
    log:
        f"{RESULTS}/logs/split_prompts-{{cls}}.log",
    wildcard_constraints:
        cls="target|benign",
    conda:
        "../../envs/abliterate.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        train=lambda wildcards: prompt_source(wildcards.cls, "train"),
        validation=lambda wildcards: prompt_source(wildcards.cls, "validation"),
        test=lambda wildcards: prompt_source(wildcards.cls, "test"),
        prompts=config["prompts"],
    script:
        "../scripts/split_prompts.py"
