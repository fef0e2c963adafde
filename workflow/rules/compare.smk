# Stage: export, last step. Compare the verified export with its source: per layer and
# component the relative weight change and the part along the plan's direction before
# and after, and greedy answers of both models side by side.


rule compare_models:
    input:
        unpack(compare_inputs),
    output:
        table=report(
            f"{RESULTS}/compare.tsv",
            category="5. Export",
            caption="../report/compare.rst",
        ),
        plot=report(
            f"{RESULTS}/compare.png",
            category="5. Export",
            caption="../report/compare.rst",
        ),
        answers=report(
            f"{RESULTS}/compare_answers.tsv",
            category="5. Export",
            caption="../report/compare.rst",
        ),
    log:
        f"{RESULTS}/logs/compare_models.log",
    benchmark:
        f"{RESULTS}/benchmarks/compare_models.tsv"
    conda:
        "../../envs/abliterate.yaml"
    threads: 4
    resources:
        mem_mb=16000,
        runtime=120,
    params:
        model=model_dir,
        target=prompt_file("target", "test"),
        benign=prompt_file("benign", "test"),
        evaluate=config["evaluate"],
        prompts=config["prompts"],
    script:
        "../scripts/compare_models.py"
