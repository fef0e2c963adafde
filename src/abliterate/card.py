"""The exported model's card (`README.md`): front matter the Hugging Face Hub reads, and a
body saying what was done, how it scored and whether it verified.

Why a YAML library for the front matter: a base directory named `my model: v2`, or a
license string with a colon, would otherwise break the YAML and the Hub would drop the
whole header (license, base model, library). Why the base card is read: the base model's
license binds the derivative, so it is carried unless the user names one. Why no paths:
the card is published; the machine's directory layout is neither the Hub's business nor
stable (two identical exports would differ).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .logs import logger

# A Hub repo id, `name` or `owner/name` (the Hub's own rule: letters, digits, `-_.`,
# no `--` or `..`, at most 96 characters per part).
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
HUB_ID = re.compile(rf"^(?:{_PART}/)?{_PART}$")
MAX_BASE_CARD_BYTES = 1024 * 1024  # a model card's front matter is a few KB
LICENSE_KEYS = ("license", "license_name", "license_link")


@dataclass
class CardOptions:
    """What the card says that the checkpoint cannot tell (config `export.card`).

    `base_model`: the base's Hub id (`owner/name`); None takes it from a Hugging Face cache
    path (`models--owner--name/snapshots/...`) or the directory name, when that is a valid
    id. `license`: None carries the base card's license. `tags`: added after `abliterated`.
    """

    base_model: str | None = None
    license: str | None = None
    tags: list[str] = field(default_factory=list)


def is_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and "--" not in name and ".." not in name


def read_front_matter(model_dir: str | Path) -> dict:
    """The base model's card front matter (`README.md` between `---` lines), or {}.

    Read with `yaml.safe_load`, so a card can never construct objects or run anything; a
    missing, oversized, undecodable or malformed card, or one whose header is not a
    mapping, is treated as having no header (logged, never fatal: the card is metadata).
    """
    path = Path(model_dir) / "README.md"
    try:
        if not path.is_file() or path.stat().st_size > MAX_BASE_CARD_BYTES:
            return {}
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        logger.info("Ignoring the base model card %s (%s)", path, error)
        return {}
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    end = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), None)
    if end is None:
        logger.info("Ignoring the base model card %s: its front matter never closes", path)
        return {}
    try:
        data = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError as error:
        logger.info("Ignoring the base model card %s: malformed YAML (%s)", path, error)
        return {}
    return data if isinstance(data, dict) else {}


def cache_repo_id(model_dir: str | Path) -> str | None:
    """`owner/name` for a Hugging Face cache snapshot (`models--owner--name/snapshots/rev`)."""
    path = Path(model_dir).absolute()
    if path.parent.name != "snapshots" or not path.parent.parent.name.startswith("models--"):
        return None
    repo = path.parent.parent.name[len("models--") :].replace("--", "/", 1)
    return repo if is_hub_id(repo) else None


def base_model_id(model_dir: str | Path, options: CardOptions) -> str | None:
    """The base's Hub id: the option, the cache path's id, else the directory name when it
    is a valid id (a local name may not be the Hub's: set `export.card.base_model`)."""
    if options.base_model:
        return options.base_model
    from_cache = cache_repo_id(model_dir)
    if from_cache:
        return from_cache
    name = Path(model_dir).absolute().name
    if is_hub_id(name):
        return name
    logger.warning(
        "The model card has no base_model: the directory name %r is not a Hub repo id; "
        "set export.card.base_model (abliterate ablate --base-model) to the base's id",
        name,
    )
    return None


def source_name(model_dir: str | Path) -> str:
    """How the card and manifest name the source: its Hub id from the cache, else its
    directory name (never a path)."""
    return cache_repo_id(model_dir) or Path(model_dir).absolute().name


def front_matter(model_dir: str | Path, options: CardOptions, base_card: dict) -> dict:
    """The Hub metadata: base_model, license (option, else the base card's), library,
    pipeline and tags; the base card's `language` is carried too."""
    data: dict = {}
    base = base_model_id(model_dir, options)
    if base:
        data["base_model"] = base
    if options.license:
        data["license"] = options.license
    else:
        for key in LICENSE_KEYS:
            if isinstance(base_card.get(key), str) and base_card[key]:
                data[key] = base_card[key]
    if isinstance(base_card.get("language"), str | list):
        data["language"] = base_card["language"]
    data["library_name"] = "transformers"
    data["pipeline_tag"] = "text-generation"
    data["tags"] = list(dict.fromkeys(["abliterated", *options.tags]))
    return data


def portable_recipe(recipe: dict, model_dir: str | Path) -> dict:
    """The recipe as published: the source by name, the measurements by file name, no
    output path (the export is the folder the recipe sits in)."""
    data = {k: v for k, v in recipe.items() if v is not None and k != "output"}
    if "model" in data:
        data["model"] = source_name(model_dir)
    if "measurements" in data:
        data["measurements"] = Path(str(data["measurements"])).name
    return data


# --------------------------------------------------------------------------------------
# The body
# --------------------------------------------------------------------------------------

EVAL_ROWS = (  # (metric key, what it is)
    ("refusal_rate", "refusal rate on harmful prompts"),
    ("benign_refusal_rate", "refusal rate on harmless prompts"),
    ("benign_kept", "harmless answers unchanged from the base"),
    ("kl_first_token", "KL divergence from the base, first token"),
    ("kl_multi_token", "KL divergence from the base, first tokens"),
)


def _number(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def evaluation_lines(metrics: dict | None) -> list[str]:
    """The evaluation table: each metric of the selected variant, its 95 % interval and
    the base model's value, with the split and prompt counts it was measured on."""
    if not metrics:
        return ["No evaluation was recorded for this export (the recipe was given, not "
                "selected by the sweep)."]  # fmt: skip
    split = metrics.get("split") or "test"
    counts = ", ".join(
        f"{metrics[k]} {what}" for k, what in (("n_target", "harmful"), ("n_benign", "harmless"))
        if metrics.get(k) is not None
    )  # fmt: skip
    lines = [
        f"Selected variant `{metrics.get('variant')}`, measured on the {split} split"
        + (f" ({counts} prompts)" if counts else "")
        + ".",
        "",
        "| metric | abliterated | 95 % interval | base |",
        "|---|---|---|---|",
    ]
    for key, what in EVAL_ROWS:
        if key not in metrics:
            continue
        low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
        interval = f"{_number(low)} – {_number(high)}" if low is not None else "–"
        base = metrics.get(f"base_{key}")
        lines.append(f"| {what} | {_number(metrics[key])} | {interval} | {_number(base)} |")
    return lines


def verification_lines(report: dict | None) -> list[str]:
    """The verification result (`abliterate verify`), without the machine's paths."""
    if report is None:
        return ["Not verified when exported; `abliterate verify BASE THIS_FOLDER PLAN` "
                "re-checks it against the base model."]  # fmt: skip
    lines = [
        ("**Passed**" if report.get("ok") else f"**Failed** ({report.get('failure_count')} "
         "problem(s))") + ": the export was re-read and checked against the base model "
        "before it was published.",
        "",
        f"- {report.get('tensors')} tensors; missing {report.get('missing')}, extra "
        f"{report.get('extra')}, dtype or shape changed {report.get('dtype_or_shape_changed')}",
        f"- tensors the plan does not edit are bit-identical to the base: "
        f"{sum(report.get(k, 0) for k in ('untouched', 'untouched_linked', 'untouched_by_digest'))}",
        f"- edited tensors equal to the plan's edit recomputed from the base: "
        f"{report.get('edited')} of {report.get('plan_tensors')}; checked against the edit's "
        f"invariants in memory before writing, then by the shard's digest: "
        f"{report.get('edited_by_digest', 0)}",
        f"- invariants on {report.get('invariants_checked')} tensors: largest "
        f"component left along the direction {report.get('max_residual_along_direction', 0):.1e}, "
        f"largest norm drift {report.get('max_norm_drift', 0):.1e}",
    ]  # fmt: skip
    generation = report.get("generation")
    lines.append(
        "- loads with transformers and generates: "
        + ("not checked (large model or disabled)" if generation is None
           else "yes" if generation.get("ok") else "NO")
    )  # fmt: skip
    return lines


def model_card(
    plan,
    model_dir: str | Path,
    metrics: dict | None = None,
    *,
    link_mode: str = "auto",
    options: CardOptions | None = None,
    verification: dict | None = None,
) -> str:
    """README.md for the export of `plan` from `model_dir`."""
    options = options or CardOptions()
    header = front_matter(model_dir, options, read_front_matter(model_dir))
    name = source_name(model_dir)
    base = header.get("base_model")
    counts: dict[str, int] = {}
    for entry in plan.entries:
        counts[entry.component] = counts.get(entry.component, 0) + 1
    measurements = Path(plan.measurements).name if plan.measurements else "(none recorded)"
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {name}, abliterated",
        "",
        "Base model: "
        + (f"[{base}](https://huggingface.co/{base})" if base else f"`{name}`")
        + f" ({plan.info.get('model_type') or 'unknown type'}).",
        "",
        "The refusal direction measured in the residual stream was removed from the weights "
        f"by abliterate (components: {', '.join(plan.info.get('components', []))}).",
        "",
        f"Measurements: `{measurements}` (SHA-256 `{plan.measurements_sha256}`).",
        "",
        "Edited tensors: "
        + ", ".join(f"{n} {c}" for c, n in counts.items())
        + f" ({len(plan.entries)} in total).",
        "",
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(portable_recipe(plan.recipe, model_dir), sort_keys=False).rstrip(),
        "```",
    ]
    if link_mode == "hardlink":
        lines += [
            "",
            "**Warning:** unedited shards are hard links to the base model's files "
            "(`export.link: hardlink`); writing to them in place changes the base model.",
        ]
    lines += ["", "## Evaluation", "", *evaluation_lines(metrics)]
    lines += ["", "## Verification", "", *verification_lines(verification)]
    lines += [
        "",
        "`manifest.json` lists the SHA-256 of every file of this folder.",
        "",
    ]
    return "\n".join(lines)
