# Stage: export, optional (export.gguf: true). Convert the verified export with llama.cpp's
# own convert_hf_to_gguf.py into one GGUF file beside it (not inside: a folder upload of
# abliterated/ stays a transformers checkpoint), then read the GGUF back and check that
# every tensor the plan edited is in it as exported.


rule convert_to_gguf:
    input:
        unpack(gguf_inputs),
    output:
        gguf=f"{RESULTS}/abliterated.gguf",
        json=f"{RESULTS}/gguf.json",
        text=report(
            f"{RESULTS}/gguf.txt",
            category="5. Export",
            caption="../report/gguf.rst",
        ),
    log:
        f"{RESULTS}/logs/convert_to_gguf.log",
    benchmark:
        f"{RESULTS}/benchmarks/convert_to_gguf.tsv"
    conda:
        "../../envs/abliterate.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        model=model_dir,
        outtype=config["export"]["gguf_outtype"],
        converter=config["export"]["gguf_converter"],
        pre_tokenizer=config["export"]["gguf_pre_tokenizer"],
    script:
        "../scripts/convert_to_gguf.py"
