"""One set of defaults: the workflow schema and the library's option dataclasses agree.

The schema fills the workflow's defaults; `MeasureOptions`, `EvalSettings`, `LoadOptions`
and `PromptOptions` are the library's (and the CLI's). If someone changes one side only,
the workflow and `abliterate measure/evaluate` would silently measure different things.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from abliterate.errors import AbliterateError
from abliterate.evaluate import DEFAULT_JUDGE_TEMPLATE, DEFAULT_REFUSAL_MARKERS, EvalSettings
from abliterate.measure import MeasureOptions
from abliterate.model import LoadOptions
from abliterate.prompts import PromptOptions

SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"
# Keys that only the workflow reads (job resources, prompt file paths, how it splits them).
WORKFLOW_ONLY = {"gpu", "target", "benign", "fractions"}
# Schema keys whose null default means "the library's built-in value".
BUILT_IN = {"refusal_markers": DEFAULT_REFUSAL_MARKERS, "judge_template": DEFAULT_JUDGE_TEMPLATE}
# Schema spellings of dataclass fields.
RENAMED = {"max": "max_count", "refusal_markers": "markers"}


def schema_defaults(section: str) -> dict:
    schema = yaml.safe_load(SCHEMA.read_text())
    properties = schema["properties"][section]["properties"]
    return {key: spec["default"] for key, spec in properties.items() if key not in WORKFLOW_ONLY}


def default_config() -> dict:
    """An empty config after the workflow's own validation (which fills the defaults)."""
    config: dict = {}
    validate(config, str(SCHEMA), set_default=True)
    return config


def library_defaults(*objects) -> dict:
    """Field name -> default over the given option objects (nested options flattened)."""
    values = {}
    for obj in objects:
        for f in fields(obj):
            if f.name not in ("load", "prompts"):
                values[f.name] = getattr(obj, f.name)
    return values


def check_section(section: str, *objects) -> None:
    library = library_defaults(*objects)
    for key, default in schema_defaults(section).items():
        name = RENAMED.get(key, key)
        assert name in library, f"schema key {section}.{key} has no library option"
        expected = BUILT_IN[key] if key in BUILT_IN and default is None else default
        assert library[name] == expected, f"{section}.{key}: schema {default!r}"


def test_measure_defaults_are_the_schema_defaults():
    options = MeasureOptions()
    check_section("measure", options, options.load)
    check_section("prompts", options.prompts)
    assert MeasureOptions.from_config(default_config()) == replace(options, progress=False)


def test_evaluate_defaults_are_the_schema_defaults():
    settings = EvalSettings()
    check_section("evaluate", settings, settings.load)
    assert EvalSettings.from_config(default_config()) == settings


def test_every_library_option_is_configurable():
    """Options the workflow cannot set are the few library-only ones, named here."""
    measure_keys = set(schema_defaults("measure"))
    assert set(library_defaults(MeasureOptions(), LoadOptions())) - measure_keys == {
        "padding_side",
        "progress",
        "trust_remote_code",  # model.trust_remote_code
    }
    evaluate_keys = {RENAMED.get(k, k) for k in schema_defaults("evaluate")}
    assert set(library_defaults(EvalSettings(), LoadOptions())) - evaluate_keys == {
        "text_max_tokens",
        "trust_remote_code",
    }
    prompt_keys = {RENAMED.get(k, k) for k in schema_defaults("prompts")}
    assert set(library_defaults(PromptOptions())) == prompt_keys


def test_config_values_reach_the_options():
    config = default_config()
    config["model"]["trust_remote_code"] = True
    config["measure"].update(position="post_instruction", load_in_4bit=True, clip=0.01)
    config["evaluate"].update(refusal_markers=["nope"], max_prompts=5, device="cpu")
    config["prompts"].update(max=7, system="be brief")
    measure = MeasureOptions.from_config(config)
    assert (measure.position, measure.clip, measure.load.load_in_4bit) == (
        "post_instruction",
        0.01,
        True,
    )
    assert measure.load.trust_remote_code and measure.prompts.max_count == 7
    settings = EvalSettings.from_config(config)
    assert settings.markers == ("nope",) and settings.max_prompts == 5
    assert settings.load.device == "cpu" and settings.load.trust_remote_code
    assert settings.prompts.system == "be brief"


def test_bad_measure_options_are_one_sentence():
    with pytest.raises(AbliterateError, match="clip quantile 0.7"):
        MeasureOptions(clip=0.7)
    with pytest.raises(AbliterateError, match="padding side 'middle'"):
        MeasureOptions(padding_side="middle")


def test_bad_evaluation_settings_and_prompt_limits_are_one_sentence(tmp_path):
    from abliterate.prompts import load_prompts

    with pytest.raises(AbliterateError, match="evaluate.batch_size is 0"):
        EvalSettings(batch_size=0)
    with pytest.raises(AbliterateError, match="evaluate.max_prompts is -2"):
        EvalSettings(max_prompts=-2)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")
    with pytest.raises(AbliterateError, match=r"p\.txt is invalid .*prompts\.max"):
        load_prompts(prompts, max_count=-1)


def test_analyze_intervention_defaults_are_the_schema_defaults():
    from abliterate.intervene import InterveneSettings

    schema = {k: v for k, v in schema_defaults("analyze").items() if k.startswith("intervene")}
    assert schema == library_defaults(InterveneSettings())
    assert InterveneSettings.from_config(default_config()["analyze"]) == InterveneSettings()
    with pytest.raises(AbliterateError, match="analyze.intervene_prompts is 0"):
        InterveneSettings(intervene_prompts=0)


def test_model_card_defaults_are_the_schema_defaults():
    from abliterate.card import CardOptions

    schema = yaml.safe_load(SCHEMA.read_text())["properties"]["export"]["properties"]["card"]
    defaults = {key: spec["default"] for key, spec in schema["properties"].items()}
    assert defaults == library_defaults(CardOptions())
    assert CardOptions(**default_config()["export"]["card"]) == CardOptions()
    config = {"export": {"card": {"base_model": "my model: v2"}}}
    with pytest.raises(Exception, match="does not match"):  # not a Hub id: refused up front
        validate(config, str(SCHEMA), set_default=True)


def test_mxfp4_output_choices_and_default_are_the_schema_and_the_clis():
    from abliterate import quant
    from abliterate.cli import build_parser

    spec = yaml.safe_load(SCHEMA.read_text())["properties"]["export"]["properties"]["mxfp4"]
    assert tuple(spec["enum"]) == quant.MXFP4_OUTPUTS
    assert spec["default"] == default_config()["export"]["mxfp4"] == quant.DEFAULT_MXFP4_OUTPUT
    args = build_parser().parse_args(["ablate", "recipe.yml"])
    assert args.mxfp4 == quant.DEFAULT_MXFP4_OUTPUT
    with pytest.raises(Exception, match="is not one of"):
        validate({"export": {"mxfp4": "fp8"}}, str(SCHEMA), set_default=True)


def test_recipe_defaults_are_the_schema_defaults():
    """Every recipe option the workflow can set has the library's default (paths and the
    ablate list are the workflow's own); router_suppress's nested strength is documented."""
    from abliterate.recipe import OPTIONS, RouterSuppress

    schema = schema_defaults("recipe")
    for key in set(schema) - {"ablate"}:
        assert key in OPTIONS, f"schema key recipe.{key} is not a recipe option"
        assert schema[key] == OPTIONS[key], f"recipe.{key}: schema {schema[key]!r}"
    assert set(OPTIONS) - set(schema) == {"model", "measurements", "output"}
    spec = yaml.safe_load(SCHEMA.read_text())["properties"]["recipe"]["properties"]
    strength = spec["router_suppress"]["properties"]["strength"]
    # documented, not filled in (snakemake would fill it into a null router_suppress)
    assert "default" not in strength
    assert f"default {RouterSuppress().strength:g}.0" in strength["description"]


def test_router_grid_defaults_are_the_variant_defaults_and_validate():
    from abliterate.grid import Variant, variants

    sweep = default_config()["sweep"]
    assert sweep["gate_scale"] is None and sweep["router_suppress"] == ["none"]
    assert variants(sweep) == [Variant()]
    config = {
        "recipe": {"router_suppress": {"experts": {20: [3, 17]}, "strength": 1.5}},
        "sweep": {"gate_scale": [0.5, 1.0], "router_suppress": ["none", "top:2@1.5"]},
    }
    validate(config, str(SCHEMA), set_default=True)
    for bad in ({"experts": [1], "scale": 2}, {"strength": 1.0}, {"experts": [-1]}):
        with pytest.raises(Exception, match="router_suppress|experts|scale"):
            validate({"recipe": {"router_suppress": bad}}, str(SCHEMA), set_default=True)


def test_a_config_without_sweep_method_searches():
    """Issue 9 made the search the default: a config that leaves `sweep.method` out gets
    the TPE search, from config/config.yaml when Snakemake runs where that file is, and
    from the schema's defaults when it runs elsewhere (`--directory`, a work dir with its
    own `--configfile`, as the workflow tests do)."""
    shipped = yaml.safe_load((SCHEMA.parents[2] / "config" / "config.yaml").read_text())
    assert default_config()["sweep"]["method"] == shipped["sweep"]["method"] == "tpe"
