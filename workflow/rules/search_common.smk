# Helpers of prompts.smk (splits) and search.smk (sweep.method: tpe): input functions only.
from abliterate.search import parse_settings as _search_settings


def prompt_source(cls, split):
    """The file the config (or the demo organism) gives for one split, or None."""
    configured = config["prompts"][cls].get(split)
    if configured is not None:
        return configured
    if DEMO:
        # the organism ships all three (abliterate.demo); one built before validation files
        # existed has train and test only, and the test file is split as for a user's model
        path = Path(DEMO_DIR) / "prompts" / f"{cls}_{split}.txt"
        if split != "validation" or path.is_file() or not Path(DEMO_DIR).exists():
            return str(path)
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
