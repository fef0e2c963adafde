"""`abliterate evaluate`: refusal rate, KL and benign answers kept, for the base model and
any number of recipes, evaluated in memory on one load of the model."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from ..errors import AbliterateError
from ..evaluate import EvalSettings, load_markers
from ..prompts import PromptOptions
from .measure import add_load_arguments, load_options

HELP = "evaluate the base model and recipes in memory (refusal rate, KL, benign answers kept)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face model directory (safetensors)")
    p.add_argument("recipes", nargs="*", help="recipe YAML files (seed format); none: base only")
    p.add_argument(
        "--target", help="held-out target prompts (default: MODEL/prompts/target_test.txt)"
    )
    p.add_argument(
        "--benign", help="held-out benign prompts (default: MODEL/prompts/benign_test.txt)"
    )
    p.add_argument(
        "--measurements", help="measurements file (default: each recipe's 'measurements')"
    )
    p.add_argument("--layout", help="layout.json (default: inspect MODEL's headers)")
    p.add_argument("--max-new-tokens", type=int, default=EvalSettings.max_new_tokens)
    p.add_argument("--kl-tokens", type=int, default=EvalSettings.kl_tokens)
    p.add_argument("--max-prompts", type=int, default=EvalSettings.max_prompts)
    p.add_argument("--batch-size", type=int, default=EvalSettings.batch_size)
    p.add_argument(
        "--markers", help="text file of refusal markers, one per line (default: built-in)"
    )
    p.add_argument("--judge", help="local causal LM directory used as refusal judge")
    p.add_argument("--text-file", help="text for a cross-entropy check")
    p.add_argument(
        "--samples", type=int, default=EvalSettings.samples, help="sample answers kept per class"
    )
    add_load_arguments(p)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--fallback-template", action="store_true")
    p.add_argument("--out", help="write the results table (TSV) here")
    p.add_argument("--details", help="write recipes and sample answers (JSON) here")


def _default_prompts(model: Path, given: str | None, cls: str) -> Path:
    if given:
        return Path(given)
    path = model / "prompts" / f"{cls}_test.txt"
    if not path.is_file():
        raise AbliterateError(f"--{cls} is required ({path} does not exist).")
    return path


def run(args: argparse.Namespace) -> int:
    from ..evaluate import finite
    from ..layout import Layout, inspect_checkpoint
    from ..measure import load_measurements
    from ..sweep import evaluate_recipes

    model = Path(args.model)
    recipes: dict[str, dict] = {}
    for path in map(Path, args.recipes):
        if not path.is_file():
            raise AbliterateError(f"recipe {path} does not exist.")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise AbliterateError(f"{path}: expected a YAML mapping (the seed's recipe format).")
        recipes[path.stem if path.stem not in recipes else str(path)] = data
    sources = (
        {args.measurements}
        if args.measurements
        else {r.get("measurements") for r in recipes.values()}
    )
    sources.discard(None)
    if recipes and len(sources) != 1:
        raise AbliterateError(
            "pass --measurements, or give recipes that all name the same 'measurements' file."
        )
    measurements = load_measurements(sources.pop()) if recipes else None
    layout = Layout.load(args.layout) if args.layout else inspect_checkpoint(model)
    markers = None  # the built-in list
    if args.markers:
        markers_path = Path(args.markers)
        if not markers_path.is_file():
            raise AbliterateError(f"--markers {markers_path}: file not found.")
        markers = markers_path.read_text(encoding="utf-8").splitlines()
    table = evaluate_recipes(
        model,
        recipes,
        layout=layout,
        measurements=measurements,
        target_prompts=_default_prompts(model, args.target, "target"),
        benign_prompts=_default_prompts(model, args.benign, "benign"),
        table_path=args.out,
        details_path=args.details,
        settings=EvalSettings(
            max_new_tokens=args.max_new_tokens,
            kl_tokens=args.kl_tokens,
            batch_size=args.batch_size,
            markers=load_markers(markers),
            samples=args.samples,
            max_prompts=args.max_prompts,
            text_file=args.text_file,
            judge=args.judge,
            load=load_options(args),
            prompts=PromptOptions(system=args.system, fallback_template=args.fallback_template),
        ),
    )
    columns = [
        "variant",
        "refusal_rate",
        "benign_refusal_rate",
        "benign_kept",
        "kl_first_token",
        "kl_multi_token",
        "cross_entropy",
    ]
    shown = table[[c for c in columns if c in table]]
    if not any(finite(v) for v in shown["cross_entropy"]):
        shown = shown.drop(columns="cross_entropy")
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0
