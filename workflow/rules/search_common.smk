# Helpers of prompts.smk (splits) and search.smk (sweep.method: tpe): input functions only.
from abliterate.search import parse_settings as _search_settings


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


if config["sweep"]["method"] == "tpe":
    _search_settings(config["sweep"])  # bad search keys fail before any job runs
SEARCH = f"{RESULTS}/search"


def search_inputs(wildcards):
    """Model, layout, measurements, suggestion and the validation prompts of both classes."""
    return {
        "layout": f"{RESULTS}/layout.json",
        "measurements": f"{RESULTS}/measurements.safetensors",
        "suggested": f"{RESULTS}/analysis/suggested.yaml",
        "validation_target": split_file("target", "validation"),
        "validation_benign": split_file("benign", "validation"),
        "model": model_input(),
    }
