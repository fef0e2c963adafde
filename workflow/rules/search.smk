# Stage: search (sweep.method: tpe). An Optuna study in one journal file, search_worker x
# sweep.workers jobs filling it (one model load each, validation prompts only), then the
# chosen recipe scored once on the test prompts (abliterate.search, docs/evaluation.md).


rule search_init:
    input:
        unpack(search_inputs),
    output:
        study=f"{SEARCH}/study.json",
    log:
        f"{RESULTS}/logs/search_init.log",
    conda:
        "../../envs/abliterate.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        journal=f"{SEARCH}/study.journal",
        model=model_dir,
        sweep=config["sweep"],
        recipe=config["recipe"],
        evaluate=config["evaluate"],
        prompts=config["prompts"],
        kl=config["select"]["kl"],
        select=config["select"],
    script:
        "../scripts/search_init.py"


rule search_worker:
    input:
        unpack(search_inputs),
        study=f"{SEARCH}/study.json",
    output:
        done=f"{SEARCH}/worker-{{worker}}.json",
    log:
        f"{RESULTS}/logs/search_worker-{{worker}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/search_worker-{{worker}}.tsv"
    wildcard_constraints:
        worker=r"\d+",
    conda:
        "../../envs/abliterate.yaml"
    threads: 4
    resources:
        mem_mb=16000,
        runtime=240,
        gpu=int(config["evaluate"]["gpu"]),
    params:
        model=model_dir,
        sweep=config["sweep"],
        recipe=config["recipe"],
        evaluate=config["evaluate"],
        prompts=config["prompts"],
        kl=config["select"]["kl"],
        trust_remote_code=config["model"]["trust_remote_code"],
    script:
        "../scripts/search_worker.py"


rule search_trials:
    input:
        study=f"{SEARCH}/study.json",
        workers=expand(
            f"{SEARCH}/worker-{{worker}}.json",
            worker=range(config["sweep"]["workers"]),
        ),
    output:
        trials=f"{SEARCH}/trials.tsv",
    log:
        f"{RESULTS}/logs/search_trials.log",
    conda:
        "../../envs/abliterate.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        sweep=config["sweep"],
    script:
        "../scripts/search_trials.py"


rule aggregate_search:
    input:
        unpack(search_inputs),
        study=f"{SEARCH}/study.json",
        trials=f"{SEARCH}/trials.tsv",
        test_target=split_file("target", "test"),
        test_benign=split_file("benign", "test"),
    output:
        table=report(
            f"{RESULTS}/sweep.tsv",
            category="3. Sweep",
            caption="../report/search_table.rst",
        ),
        details=f"{SEARCH}/test.json",
        best=f"{RESULTS}/best.yaml",
        reason=report(
            f"{RESULTS}/best.txt",
            category="3. Sweep",
            caption="../report/sweep_best.rst",
        ),
        pareto=report(
            f"{RESULTS}/pareto.png",
            category="3. Sweep",
            caption="../report/search_pareto.rst",
        ),
        samples=report(
            f"{RESULTS}/samples.html",
            category="4. Sample answers",
            caption="../report/samples.rst",
        ),
    log:
        f"{RESULTS}/logs/aggregate_search.log",
    benchmark:
        f"{RESULTS}/benchmarks/aggregate_search.tsv"
    conda:
        "../../envs/abliterate.yaml"
    threads: 4
    resources:
        mem_mb=16000,
        runtime=120,
        gpu=int(config["evaluate"]["gpu"]),
    params:
        model=model_dir,
        sweep=config["sweep"],
        recipe=config["recipe"],
        evaluate=config["evaluate"],
        prompts=config["prompts"],
        max_refusal_rate=config["select"]["max_refusal_rate"],
        min_benign_kept=config["select"]["min_benign_kept"],
        kl=config["select"]["kl"],
        trust_remote_code=config["model"]["trust_remote_code"],
    script:
        "../scripts/aggregate_search.py"
