# Shared helpers: paths and input functions. No logic beyond wiring lives here.
from pathlib import Path

MODEL = config["model"]["name"]
RESULTS = f"results/{MODEL}"
DEMO = config["model"]["path"] is None
DEMO_DIR = "resources/demo/{arch}-seed{seed}".format(**config["model"]["demo"])


def model_dir(wildcards=None):
    """The source checkpoint: the user's directory, or the demo organism built here."""
    return DEMO_DIR if DEMO else config["model"]["path"]


def prompt_file(cls, split):
    """A prompt set path: the config's, or the demo organism's own."""
    configured = config["prompts"][cls][split]
    if configured is not None:
        return configured
    if DEMO:
        return f"{DEMO_DIR}/prompts/{cls}_{split}.txt"
    raise ValueError(
        f"config key prompts.{cls}.{split} is required when model.path names a model."
    )


def model_input(wildcards=None):
    """Input that makes jobs wait for the demo organism (a user's model already exists)."""
    return DEMO_DIR if DEMO else []


def final_outputs():
    """The targets of the default rule: the end of every stage."""
    return [f"{RESULTS}/layout.json"]
