# Stage: prompt splits. Train / validation / test prompts per class (abliterate.splits):
# the search scores trials on validation prompts and reports the winner on test prompts.


def prompt_source(cls, split):
    """The file the config (or the demo organism) gives for one split, or None."""
    configured = config["prompts"][cls].get(split)
    if configured is not None:
        return configured
    if DEMO and split in ("train", "test"):
        return f"{DEMO_DIR}/prompts/{cls}_{split}.txt"
    return None


def split_inputs(wildcards):
    """The local prompt files a class's split is made from (and the demo organism)."""
    sources = [prompt_source(wildcards.cls, s) for s in ("train", "validation", "test")]
    return {
        "files": [s for s in sources if s and Path(s).is_file()],
        "model": model_input(),
    }


def split_file(cls, split):
    """One class's split as written by split_prompts."""
    return f"{RESULTS}/prompts/{cls}_{split}.json"


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
    params:
        train=lambda wildcards: prompt_source(wildcards.cls, "train"),
        validation=lambda wildcards: prompt_source(wildcards.cls, "validation"),
        test=lambda wildcards: prompt_source(wildcards.cls, "test"),
        prompts=config["prompts"],
    script:
        "../scripts/split_prompts.py"
