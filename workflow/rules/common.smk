# Shared helpers: paths and input functions. No logic beyond wiring lives here.
import sys
from pathlib import Path


def check_finite(node, key="config"):
    """JSON schema lets `.nan` and `.inf` through every number bound; refuse them here."""
    import math

    if isinstance(node, dict):
        for name, value in node.items():
            check_finite(value, f"{key}.{name}" if key != "config" else name)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_finite(value, f"{key}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise SystemExit(
            f"error: config key {key} is {node}; expected a finite number."
        )


check_finite(config)

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from abliterate.errors import AbliterateError
from abliterate.grid import (
    check_base_recipe as _check_base_recipe,
    chunks as _sweep_chunks,
    variants as _sweep_variants,
)
from abliterate.files import claim_workdir

# held for the life of this process: a later run after a kill clears the stale locks
WORKDIR_CLAIM = claim_workdir()

MODEL = config["model"]["name"]
RESULTS = f"results/{MODEL}"
DEMO = config["model"]["path"] is None
DEMO_DIR = "resources/demo/{arch}-seed{seed}".format(**config["model"]["demo"]) + (
    ""
    if config["model"]["demo"]["wording"] == "a"
    else "-wording-{wording}".format(**config["model"]["demo"])
)


def model_dir(wildcards=None):
    """The source checkpoint: the user's directory, or the demo organism built here."""
    return DEMO_DIR if DEMO else config["model"]["path"]


def prompt_file(cls, split):
    """A prompt set path: the config's, or the demo organism's own."""
    prompts = config["prompts"][cls]
    if not DEMO and prompts["test"] is None and prompts["train"] is not None:
        # one file per class: split_prompts (prompts.smk) splits it
        return f"{RESULTS}/prompts/{cls}_{split}.json"
    configured = prompts[split]
    if configured is not None:
        return configured
    if DEMO:
        return f"{DEMO_DIR}/prompts/{cls}_{split}.txt"
    raise AbliterateError(
        f"config key prompts.{cls}.{split} is required when model.path names a model."
    )


def model_input(wildcards=None):
    """Input that makes jobs wait for the demo organism (a user's model already exists)."""
    return DEMO_DIR if DEMO else []


# ---- sweep (evaluate.smk): the variant grid is static, so the DAG is known up front ----
def sweep_chunks():
    """The grid's variants in groups of sweep.chunk_size (dense models: experts "none")."""
    if not config["recipe"][
        "ablate"
    ]:  # sweeping: recipe keys the grid sets stay default
        _check_base_recipe(config["recipe"])
    variants = _sweep_variants(config["sweep"], moe=model_is_moe())
    return _sweep_chunks(variants, config["sweep"]["chunk_size"])


def sweep_chunk_variants(wildcards):
    """Variant ids evaluated by one evaluate_variants job (one model load)."""
    return [v.id for v in sweep_chunks()[int(wildcards.chunk)]]


def sweep_chunk_files(ext):
    """Every evaluate_variants output of one kind (tsv table, json details)."""
    return [f"{RESULTS}/sweep/chunk-{i}.{ext}" for i in range(len(sweep_chunks()))]


def evaluate_inputs(wildcards):
    """Model, layout, measurements, suggested recipe and (a user's) held-out prompts."""
    inputs = {
        "layout": f"{RESULTS}/layout.json",
        "measurements": f"{RESULTS}/measurements.safetensors",
        "suggested": f"{RESULTS}/analysis/suggested.yaml",
        "model": model_input(),
    }
    if not DEMO:  # the demo's prompt files live inside its directory output
        inputs["target"] = prompt_file("target", "test")
        inputs["benign"] = prompt_file("benign", "test")
    return inputs


# ---- measure.smk / analyze.smk ----
def measure_inputs(wildcards):
    """The model (demo: its directory) and a user's local prompt files (not hub dataset ids)."""
    inputs = {"model": model_input()}
    for cls in ("target", "benign"):
        configured = prompt_file(cls, "train") if not DEMO else None
        if configured is not None and (
            Path(configured).is_file() or configured.startswith(RESULTS)
        ):
            inputs[cls] = configured
    return inputs


def analyze_inputs(wildcards):
    """The measurements; with analyze.intervene also the model, its layout and the
    validation prompts of both classes (split_prompts) the directions are ranked on."""
    inputs = {"measurements": f"{RESULTS}/measurements.safetensors"}
    if config["analyze"]["intervene"]:
        inputs.update(
            layout=f"{RESULTS}/layout.json",
            validation_target=f"{RESULTS}/prompts/target_validation.json",
            validation_benign=f"{RESULTS}/prompts/benign_validation.json",
            model=model_input(),
        )
    return inputs


def model_is_moe():
    """Whether the model routes tokens to experts (then analyze also draws experts.png)."""
    if DEMO:
        return config["model"]["demo"]["arch"] in (
            "glm4_moe",
            "mixtral",
            "gpt_oss",
            "deepseek_v3",
        )
    from abliterate.analyze import checkpoint_is_moe
    from abliterate.errors import AbliterateError

    try:
        return checkpoint_is_moe(config["model"]["path"])
    except AbliterateError as error:  # at parse time: the sentence, not a traceback
        raise SystemExit(f"error: {error}")


def analysis_outputs(wildcards=None):
    """analyze's files: table, suggestion, plots (for MoE models also experts.png and,
    with measure.attribution, the expert attribution table and its heatmap)."""
    analysis = f"{RESULTS}/analysis"
    outputs = {
        "table": report(
            f"{analysis}/layers.tsv",
            category="2. Analysis",
            caption="../report/layers_table.rst",
        ),
        "suggested": f"{analysis}/suggested.yaml",
        "reason": report(
            f"{analysis}/suggested.txt",
            category="2. Analysis",
            caption="../report/suggested.rst",
        ),
        "layers": report(
            f"{analysis}/layers.png",
            category="2. Analysis",
            caption="../report/layers.rst",
        ),
        "rotation": report(
            f"{analysis}/rotation.png",
            category="2. Analysis",
            caption="../report/rotation.rst",
        ),
    }
    if config["analyze"]["intervene"]:
        outputs["interventions"] = report(
            f"{analysis}/interventions.tsv",
            category="2. Analysis",
            caption="../report/interventions.rst",
        )
    if model_is_moe():
        outputs["experts"] = report(
            f"{analysis}/experts.png",
            category="2. Analysis",
            caption="../report/experts.rst",
        )
        if config["measure"]["attribution"]:
            outputs["experts_table"] = report(
                f"{analysis}/experts.tsv",
                category="2. Analysis",
                caption="../report/experts_table.rst",
            )
            outputs["expert_share"] = report(
                f"{analysis}/expert_share.png",
                category="2. Analysis",
                caption="../report/expert_share.rst",
            )
    return outputs


def sweep_outputs(wildcards=None):
    """aggregate_sweep's files: table, selection, plots, samples (routing shift only for
    MoE models: its per-layer JSON and figure)."""
    outputs = {
        "table": report(
            f"{RESULTS}/sweep.tsv",
            category="3. Sweep",
            caption="../report/sweep_table.rst",
        ),
        "best": f"{RESULTS}/best.yaml",
        "reason": report(
            f"{RESULTS}/best.txt",
            category="3. Sweep",
            caption="../report/sweep_best.rst",
        ),
        "pareto": report(
            f"{RESULTS}/pareto.png",
            category="3. Sweep",
            caption="../report/sweep_pareto.rst",
        ),
        "heatmap": report(
            f"{RESULTS}/heatmap.png",
            category="3. Sweep",
            caption="../report/sweep_heatmap.rst",
        ),
        "samples": report(
            f"{RESULTS}/samples.html",
            category="4. Sample answers",
            caption="../report/samples.rst",
        ),
    }
    if model_is_moe():
        outputs["routing_json"] = f"{RESULTS}/sweep_routing.json"
        outputs["routing"] = report(
            f"{RESULTS}/routing.png",
            category="3. Sweep",
            caption="../report/sweep_routing.rst",
        )
    return outputs


# ---- ablate.smk: the recipe to export, the plan's inputs, the shards it edits ----
def export_recipe(wildcards=None):
    """The config's own recipe when `recipe.ablate` is set, else the sweep's best.yaml."""
    if config["recipe"]["ablate"]:
        return f"{RESULTS}/export/recipe.yaml"
    return f"{RESULTS}/best.yaml"


def plan_inputs(wildcards):
    """Recipe, layout and measurements the plan is resolved from."""
    return {
        "recipe": export_recipe(),
        "layout": f"{RESULTS}/layout.json",
        "measurements": f"{RESULTS}/measurements.safetensors",
        "model": model_input(),
    }


def assemble_inputs(wildcards):
    """The plan, every edited shard (known once plan_shards ran) and their digests."""
    import json

    listing = checkpoints.plan_shards.get(**wildcards).output.shards
    edited = sorted(json.loads(Path(listing).read_text())["edit"])
    shards = [f"{RESULTS}/export/shards/{name}" for name in edited]
    inputs = {
        "plan": f"{RESULTS}/export/plan.json",
        "directions": f"{RESULTS}/export/plan.safetensors",
        "shards": shards,
        "digests": [f"{path}.sha256" for path in shards],
        "model": model_input(),
    }
    if not config["recipe"]["ablate"]:
        inputs["sweep"] = f"{RESULTS}/sweep.tsv"
    return inputs


def verify_inputs(wildcards):
    """The assembled export, its plan, and sweep.tsv when the card reports its metrics."""
    inputs = {
        "model": model_input(),
        "assembled": f"{RESULTS}/export/assembled/manifest.json",
        "plan": f"{RESULTS}/export/plan.json",
        "directions": f"{RESULTS}/export/plan.safetensors",
    }
    if not config["recipe"]["ablate"]:
        inputs["sweep"] = f"{RESULTS}/sweep.tsv"
    return inputs


def compare_inputs(wildcards):
    """Both checkpoints, the plan, verify.json (compare only what passed) and the prompts."""
    inputs = {
        "model": model_input(),
        "output": f"{RESULTS}/abliterated/manifest.json",
        "plan": f"{RESULTS}/export/plan.json",
        "directions": f"{RESULTS}/export/plan.safetensors",
        "verified": f"{RESULTS}/verify.json",
    }
    if not DEMO:  # the demo's prompt files live inside its directory output
        inputs["target"] = prompt_file("target", "test")
        inputs["benign"] = prompt_file("benign", "test")
    return inputs


def gguf_inputs(wildcards):
    """The verified export and its plan (the GGUF check looks for every edited tensor)."""
    return {
        "model": model_input(),
        "manifest": f"{RESULTS}/abliterated/manifest.json",
        "plan": f"{RESULTS}/export/plan.json",
        "verified": f"{RESULTS}/verify.json",
    }


def final_outputs():
    """The targets of the default rule: the end of every stage."""
    return [
        f"{RESULTS}/layout.json",
        f"{RESULTS}/layout.txt",
        f"{RESULTS}/measurements.safetensors",
        f"{RESULTS}/analysis/suggested.yaml",
        f"{RESULTS}/sweep.tsv",
        f"{RESULTS}/best.yaml",
        f"{RESULTS}/verify.json",
        f"{RESULTS}/compare.tsv",
        f"{RESULTS}/compare.png",
        f"{RESULTS}/compare_answers.tsv",
        f"{RESULTS}/model_card.md",
    ] + (
        [f"{RESULTS}/abliterated.gguf", f"{RESULTS}/gguf.txt"]
        if config["export"]["gguf"]
        else []
    )
