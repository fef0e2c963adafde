# Report-only outputs: a readable summary of the inspected checkpoint for
# `snakemake --report` (layout.json itself stays the machine-readable contract).


rule summarize_layout:
    input:
        layout=f"{RESULTS}/layout.json",
    output:
        summary=report(
            f"{RESULTS}/layout.txt",
            category="1. Checkpoint",
            caption="../report/layout.rst",
        ),
    log:
        f"{RESULTS}/logs/summarize_layout.log",
    conda:
        "../../envs/abliterate.yaml"
    script:
        "../scripts/summarize_layout.py"


rule copy_model_card:
    input:
        card=f"{RESULTS}/abliterated/README.md",
    output:
        card=report(
            f"{RESULTS}/model_card.md",
            category="5. Export",
            caption="../report/model_card.rst",
        ),
    log:
        f"{RESULTS}/logs/copy_model_card.log",
    conda:
        "../../envs/abliterate.yaml"
    shell:
        "cp {input.card} {output.card} 2> {log}"
