"""Every example config does what its comment says, on that model's real tensor layout.

Each example names the tensors it edits (`#   touches: KEY` lines, `{a-b}` and `{a,b}`
expand); the test builds a header-only copy of the real model (real names and shapes, no
weights), runs `abliterate plan` on the example's recipe and compares the plan's keys with
the comment exactly, so neither the example nor its comment can drift.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch
import yaml
from fixtures.real_models import WRITERS

from abliterate.cli import main
from abliterate.measure import Measurements, save_measurements
from abliterate.recipe import Plan

EXAMPLES = Path(__file__).parent.parent / "config" / "examples"
TOUCHES = re.compile(r"^#\s+touches:\s+(\S+)\s*$", re.MULTILINE)
BRACES = re.compile(r"\{([^}]+)\}")


def expand(pattern: str) -> set[str]:
    """`a.{1,3}.b.{0-2}` -> a.1.b.0, a.1.b.1, ... (every combination)."""
    choices = []
    for group in BRACES.findall(pattern):
        values = []
        for part in group.split(","):
            low, _, high = part.partition("-")
            values += [str(i) for i in range(int(low), int(high or low) + 1)]
        choices.append(values)
    template = BRACES.sub("{}", pattern)
    return {template.format(*combo) for combo in itertools.product(*choices)}


def example_recipe(path: Path) -> tuple[dict, str]:
    """The example's recipe in the seed's format, and the model directory name it is for."""
    data = yaml.safe_load(path.read_text())
    if isinstance(data.get("model"), dict):  # a workflow config
        return dict(data.get("recipe") or {}), Path(data["model"]["path"] or "demo").name
    recipe = {k: v for k, v in data.items() if k not in ("model", "measurements", "output")}
    return recipe, Path(data["model"]).name


EXAMPLES_WITH_RECIPES = sorted(
    p.name for p in EXAMPLES.iterdir() if example_recipe(p)[0].get("ablate")
)


def test_every_example_with_a_recipe_names_the_tensors_it_touches():
    assert {"mixtral-8x7b-instruct.yaml", "deepseek-v3.yaml"} <= set(EXAMPLES_WITH_RECIPES)
    for name in EXAMPLES_WITH_RECIPES:
        assert TOUCHES.search((EXAMPLES / name).read_text()), f"{name} has no touches: lines"
        assert example_recipe(EXAMPLES / name)[1] in WRITERS, f"no fixture for {name}'s model"


@pytest.fixture(scope="module")
def real_models(tmp_path_factory):
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = WRITERS[name](tmp_path_factory.mktemp("real") / name)
        return built[name]

    return get


@pytest.mark.parametrize("example", EXAMPLES_WITH_RECIPES)
def test_example_plans_touch_exactly_the_tensors_its_comment_names(example, real_models, tmp_path):
    path = EXAMPLES / example
    recipe, model_name = example_recipe(path)
    model = real_models(model_name)
    config = yaml.safe_load((model / "config.json").read_text())
    indices, hidden = config["num_hidden_layers"] + 1, config["hidden_size"]
    g = torch.Generator().manual_seed(0)
    means = [torch.randn(indices, hidden, generator=g, dtype=torch.float64) for _ in "tb"]
    empty = torch.zeros(indices, 0)
    meta = {"num_layers": config["num_hidden_layers"], "hidden_size": hidden}
    save_measurements(Measurements(*means, empty, empty, meta=meta), tmp_path / "m.safetensors")
    recipe.update(model=str(model), measurements=str(tmp_path / "m.safetensors"))
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    assert main(["plan", str(tmp_path / "recipe.yml"), "--save", str(tmp_path / "plan.json")]) == 0
    plan = Plan.load(tmp_path / "plan.json")
    touched = {key for entry in plan.entries for key in (entry.key, entry.bias) if key}
    expected = set().union(*(expand(p) for p in TOUCHES.findall(path.read_text())))
    assert touched == expected, (sorted(touched - expected)[:5], sorted(expected - touched)[:5])


def test_glm45_air_examples_use_the_guides_layer_ranges():
    """The guide: refusal lives in the middle (20-35) and late (36-45) layers; measure at
    the later indices (35-40)."""
    for name in ("glm-4.5-air-conservative.yaml", "glm-4.5-air-aggressive.yaml",
                 "glm4-conservative.yml", "glm4-aggressive.yml"):  # fmt: skip
        for entry in example_recipe(EXAMPLES / name)[0]["ablate"]:
            assert 20 <= entry["layer"] <= 45 and 35 <= entry["measurement"] <= 40, name
