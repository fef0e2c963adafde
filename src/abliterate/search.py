"""Recipe search: Optuna's TPE sampler over directions, strength curves and edit options.

Why a search and not only the grid: the grid can only combine values someone listed; the
edits that work best on real models mix a direction between two layers, different
strengths per component and layer, and a projection mode, which no small grid covers.
Each trial is a complete recipe (so the winner is exported exactly as it was evaluated),
scored in memory on one loaded model, on the *validation* prompts only; the test prompts
are read once, by `abliterate.search_report`, after the search is over.

A trial picks (parameter names as stored in the study, documented in docs/evaluation.md):

- `direction`: a measurement index, fractional between two indices (their unit
  directions mixed), up to num_layers + 1 (after the final norm) when that was measured;
- per component group (`embed`, `attn_out`, `mlp_down` = dense or shared MLP down,
  `experts` = routed experts' down_proj, `router`): whether it is on and a strength curve
  over the layers, `strength * (floor + (1 - floor) * max(0, 1 - |layer - peak| / width))`
  (the embedding, edited once, has a strength only); on MoE models the `experts` group is
  switched by the expert strategy, a categorical over `sweep.search.experts` (default
  `none` and `all`; also `auto:K`, `coverage:F` and expert lists like `"3,17"`, which
  become the recipe's `expert_subset`, so the exported recipe picks the same experts from
  the same measurements);
- `projection` (none, projected, biprojected), `norm_preserve`, `sparsity`, and
  `norm_scaled` (the direction multiplied by the weight of the norm that reads it);
- only when `router_suppress: {top, strength}` is in the space (MoE): whether to suppress
  the `router_suppress.top` experts per edited layer whose routing rises most on target
  prompts, at `router_suppress.strength` (the recipe's `router_suppress`, docs/ablation.md).

Workers are processes that share one journal file (`optuna.storages.JournalStorage`, safe
for concurrent processes on one file system); each loads the model once and asks the study
for trials until it holds `n_trials` finished or running ones. The study remembers what
it was started for (a fingerprint of model, measurements, validation prompts, search space
and evaluation settings), so a rerun continues it and a changed config refuses to.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import AbliterateError
from .files import write_text_atomic
from .logs import logger

STUDY_NAME = "abliterate"
PROJECTIONS = ("none", "projected", "biprojected")
# the default expert strategies; `sweep.search.experts` may list others (`expert_strategy`)
EXPERT_STRATEGIES = ("none", "all")
# search group -> recipe components it edits (whichever the layer has)
GROUPS: dict[str, tuple[str, ...]] = {
    "embed": ("embed",),
    "attn_out": ("attn_out",),
    "mlp_down": ("mlp_down", "shared_down"),
    "experts": ("expert_down",),
    "router": ("router",),
}
# The embedding is a writer like the others (analyze's intervention projects the direction
# out of it too); a tied one is left out by default, since editing it edits the output head.
DENSE_GROUPS = ("embed", "attn_out", "mlp_down")
MOE_GROUPS = ("embed", "attn_out", "mlp_down", "experts", "router")
RUN_KEYS = ("method", "n_trials", "n_startup_trials", "workers", "seed", "search")
SPACE_KEYS = (
    "direction",
    "components",
    "optional",
    "strength",
    "peak",
    "width",
    "floor",
    "projection",
    "norm_preserve",
    "norm_scaled",
    "sparsity",
    "experts",
    "router_suppress",
)
# the smallest per-layer strength that still becomes an edit
MIN_STRENGTH = 1e-3


# --------------------------------------------------------------------------------------
# Configuration: sweep.* run keys and the sweep.search space
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchSettings:
    """The run keys of `sweep:` for `method: tpe`, validated."""

    n_trials: int = 40
    n_startup_trials: int = 10
    workers: int = 1
    seed: int = 0
    search: dict = field(default_factory=dict)


def _where(key: str) -> str:
    return f"sweep.search.{key}" if key.split(".")[0] in SPACE_KEYS else f"sweep.{key}"


def _integer(config: dict, key: str, default: int, minimum: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AbliterateError(f"{_where(key)}: expected an integer >= {minimum}, got {value!r}.")
    return value


def _range(search: dict, key: str, default, *, lowest: float | None = None, below=None):
    """A [low, high] pair of numbers (a single number fixes the value)."""
    value = search.get(key, default)
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value, value]
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        and all(math.isfinite(v) for v in value)
        and value[0] <= value[1]
    )
    if not ok:
        raise AbliterateError(
            f"{_where(key)}: expected a range [low, high] with low <= high, got {value!r}."
        )
    if lowest is not None and value[0] < lowest:
        raise AbliterateError(f"{_where(key)}: expected values >= {lowest:g}, got {value!r}.")
    if below is not None and value[1] >= below:
        raise AbliterateError(f"{_where(key)}: expected values below {below:g}, got {value!r}.")
    return (float(value[0]), float(value[1]))


def _choices(search: dict, key: str, default: tuple, allowed: tuple) -> tuple:
    value = search.get(key, list(default))
    if not isinstance(value, (list, tuple)) or not value or any(v not in allowed for v in value):
        raise AbliterateError(
            f"{_where(key)}: expected a non-empty list of {', '.join(map(str, allowed))}, "
            f"got {value!r}."
        )
    return tuple(dict.fromkeys(value))


def parse_settings(sweep: dict) -> SearchSettings:
    """Validate `sweep:`'s search keys (anything the model is not needed for)."""
    search = sweep.get("search") or {}
    if not isinstance(search, dict):
        raise AbliterateError(f"sweep.search: expected a mapping of search keys, got {search!r}.")
    unknown = sorted(set(search) - set(SPACE_KEYS))
    if unknown:
        raise AbliterateError(
            f"sweep.search.{unknown[0]}: unknown search key; expected one of "
            f"{', '.join(SPACE_KEYS)}."
        )
    settings = SearchSettings(
        n_trials=_integer(sweep, "n_trials", SearchSettings.n_trials, 1),
        n_startup_trials=_integer(sweep, "n_startup_trials", SearchSettings.n_startup_trials, 0),
        workers=_integer(sweep, "workers", SearchSettings.workers, 1),
        seed=_integer(sweep, "seed", SearchSettings.seed, 0),
        search=dict(search),
    )
    _parse_space(search)  # the checks that need no model
    return settings


@dataclass(frozen=True)
class SearchSpace:
    """The search space resolved against one model (plain data; JSON in study.json)."""

    direction: tuple[float, float]
    groups: tuple[str, ...]
    optional: bool
    strength: tuple[float, float]
    peak: tuple[float, float]
    width: tuple[float, float]
    floor: tuple[float, float]
    projection: tuple[str, ...]
    norm_preserve: tuple[bool, ...]
    norm_scaled: tuple[bool, ...]
    sparsity: tuple[float, float]
    experts: tuple[str, ...]
    num_layers: int
    # router suppression (only when configured): ranges of the expert count and strength
    suppress_top: tuple[int, int] | None = None
    suppress_strength: tuple[float, float] | None = None

    def to_json(self) -> dict:
        """Plain data; the suppression ranges only when set, so the fingerprints of studies
        started without them stay what they were."""
        data = asdict(self)
        for key in ("suppress_top", "suppress_strength"):
            if data[key] is None:
                del data[key]
        return data

    @classmethod
    def from_json(cls, data: dict) -> SearchSpace:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _parse_space(search: dict) -> dict:
    groups = search.get("components")
    if groups is not None:
        if not isinstance(groups, (list, tuple)) or any(g not in GROUPS for g in groups):
            raise AbliterateError(
                f"sweep.search.components: expected a list of {', '.join(GROUPS)}, got {groups!r}."
            )
        groups = tuple(dict.fromkeys(groups))
    optional = search.get("optional", True)
    if not isinstance(optional, bool):
        raise AbliterateError(f"sweep.search.optional: expected true/false, got {optional!r}.")
    return {
        **_parse_suppress(search.get("router_suppress")),
        "direction": _range(search, "direction", None, lowest=0),
        "groups": groups,
        "optional": optional,
        "strength": _range(search, "strength", [0.0, 1.5], lowest=0),
        "peak": _range(search, "peak", None, lowest=0),
        "width": _range(search, "width", None, lowest=0),
        "floor": _range(search, "floor", [0.0, 1.0], lowest=0),
        "projection": _choices(search, "projection", PROJECTIONS, PROJECTIONS),
        "norm_preserve": _choices(search, "norm_preserve", (True, False), (True, False)),
        "norm_scaled": _choices(search, "norm_scaled", (False, True), (True, False))
        if "norm_scaled" in search
        else None,
        "sparsity": _range(search, "sparsity", [0.0, 0.0], lowest=0, below=1),
        "experts": _strategies(search.get("experts", list(EXPERT_STRATEGIES))),
    }


STRATEGY_FORMS = (
    "'none', 'all', 'auto:K' (K >= 1), 'coverage:F' (0 < F <= 1) or an expert list like '3,17'"
)


def expert_strategy(value) -> str | None:
    """A search expert strategy in canonical spelling ('none', 'all', 'auto:2',
    'coverage:0.5', '3,17'), or None when `value` is not one.

    Why strings: they are Optuna categorical choices (which must be plain values) and the
    study's fingerprint; an expert list is a comma-joined string as in the grid's
    `sweep.experts`.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = str(value).strip().lower().replace(" ", "")
    if text in ("none", "all"):
        return text
    kind, colon, amount = text.partition(":")
    if colon:
        try:
            number = int(amount) if kind == "auto" else float(amount)
        except ValueError:
            return None
        if kind == "auto" and number >= 1:
            return f"auto:{number}"
        if kind == "coverage" and 0.0 < number <= 1.0:
            return f"coverage:{number:g}"
        return None
    parts = text.split(",")
    if not all(part.isdigit() for part in parts):
        return None
    return ",".join(str(e) for e in sorted({int(part) for part in parts}))


def _strategies(value) -> tuple[str, ...]:
    """`sweep.search.experts`: a non-empty list of expert strategies (duplicates dropped)."""
    chosen = (
        [expert_strategy(v) for v in value]
        if isinstance(value, (list, tuple)) and value
        else [None]
    )
    if None in chosen:
        raise AbliterateError(
            f"sweep.search.experts: expected a non-empty list of {STRATEGY_FORMS}, got {value!r}."
        )
    return tuple(dict.fromkeys(chosen))


def strategy_subset(strategy: str):
    """The recipe's `expert_subset` for a strategy that restricts the routed experts
    (`auto:K`, `coverage:F`, a list), None for `none` / `all`."""
    if strategy in ("none", "all"):
        return None
    if strategy.startswith(("auto:", "coverage:")):
        return strategy
    return [int(e) for e in strategy.split(",")]


def _parse_suppress(value) -> dict:
    """`router_suppress: {top: [1, 4], strength: [0.5, 2.0]}` (null: not searched)."""
    where = "sweep.search.router_suppress"
    if value is None:
        return {"suppress_top": None, "suppress_strength": None}
    if not isinstance(value, dict) or set(value) - {"top", "strength"}:
        raise AbliterateError(
            f"{where}: expected a mapping with 'top' (expert counts [low, high]) and "
            f"'strength' ([low, high]), got {value!r}."
        )
    top = _range({"router_suppress.top": value.get("top", [1, 2])}, "router_suppress.top", None,
                 lowest=1)  # fmt: skip
    if top is None or not all(float(v).is_integer() for v in top):
        raise AbliterateError(f"{where}.top: expected whole expert counts >= 1, got {top!r}.")
    strength = _range(
        {"router_suppress.strength": value.get("strength", [0.5, 2.0])},
        "router_suppress.strength",
        None,
        lowest=0,
    )
    return {"suppress_top": (int(top[0]), int(top[1])), "suppress_strength": strength}


def resolve_space(
    search: dict,
    *,
    num_layers: int,
    num_indices: int,
    is_moe: bool,
    has_norm_weights: bool = False,
    components: Iterable[str] | None = None,
    tied_embeddings: bool = False,
) -> SearchSpace:
    """The space for one model: defaults filled in, every range checked against the model.

    `num_indices` counts the directions a recipe can address (num_layers + 2 when the final
    norm was measured); `has_norm_weights` whether the measurements hold the norm weights
    a norm-scaled direction needs (then the default tries both); `components` the
    component kinds the model's layout has (default groups without any are left out);
    `tied_embeddings` leaves the embedding out of the default groups.
    """
    components = set(components) if components is not None else None
    raw = _parse_space(search)
    last_index, last_layer = num_indices - 1, num_layers - 1
    direction = raw["direction"] or (min(1.0, last_index), float(last_index))
    if direction[1] > last_index:
        raise AbliterateError(
            f"sweep.search.direction: index {direction[1]:g} is above the last measurement "
            f"index of this model ({last_index}: {num_layers} layers"
            f"{', the last one after the final norm' if num_indices > num_layers + 1 else ''})."
        )
    peak = raw["peak"] or (0.0, float(last_layer))
    if peak[1] > last_layer:
        raise AbliterateError(
            f"sweep.search.peak: layer {peak[1]:g} is above the model's last layer ({last_layer})."
        )
    width = raw["width"] or (0.5, float(max(num_layers, 1)))
    if width[0] <= 0:
        raise AbliterateError(f"sweep.search.width: expected widths > 0, got {list(width)!r}.")
    if raw["floor"][1] > 1:
        raise AbliterateError(
            f"sweep.search.floor: expected fractions of the peak strength in [0, 1], got "
            f"{list(raw['floor'])!r}."
        )
    norm_scaled = raw["norm_scaled"] or ((False, True) if has_norm_weights else (False,))
    if True in norm_scaled and not has_norm_weights:
        raise AbliterateError(
            "sweep.search.norm_scaled: the measurements hold no norm weights (measured "
            "before they were recorded); measure again or set it to [false]."
        )
    groups = raw["groups"] or [
        g
        for g in (MOE_GROUPS if is_moe else DENSE_GROUPS)
        if not (tied_embeddings and g == "embed")
    ]
    if not is_moe and raw["suppress_top"] is not None:
        raise AbliterateError(
            "sweep.search.router_suppress: router suppression needs an MoE model; this one "
            "is dense."
        )
    if not is_moe and any(g in ("experts", "router") for g in groups):
        raise AbliterateError(
            "sweep.search.components: 'experts' and 'router' need an MoE model; this one is dense."
        )
    if components is not None:  # the model's own component kinds (its layout)
        missing = [g for g in groups if not set(GROUPS[g]) & set(components)]
        if raw["groups"] and missing:
            raise AbliterateError(
                f"sweep.search.components: {', '.join(missing)} edit no tensor of this model "
                f"(it has {', '.join(sorted(components))})."
            )
        groups = [g for g in groups if g not in missing]  # e.g. mlp_down on Mixtral
    return SearchSpace(
        direction=direction,
        groups=tuple(groups),
        optional=raw["optional"],
        strength=raw["strength"],
        peak=peak,
        width=width,
        floor=raw["floor"],
        projection=raw["projection"],
        norm_preserve=raw["norm_preserve"],
        norm_scaled=norm_scaled,
        sparsity=raw["sparsity"],
        experts=raw["experts"] if "experts" in groups else ("none",),
        num_layers=num_layers,
        suppress_top=raw["suppress_top"],
        suppress_strength=raw["suppress_strength"],
    )


def check_strategies(space: SearchSpace, layout, measurements) -> None:
    """Refuse, before any trial runs, expert strategies this model or these measurements
    cannot serve: `auto:K` / `coverage:F` without expert attribution, an expert list
    naming an expert the model does not have."""
    for strategy in space.experts:
        if strategy.startswith(("auto:", "coverage:")):
            if not getattr(measurements, "has_attribution", False):
                raise AbliterateError(
                    f"sweep.search.experts: {strategy!r} picks experts from the expert "
                    "attribution, but the measurements hold none (measured with "
                    "measure.attribution false, or before it existed); measure again or "
                    "leave it out."
                )
        elif strategy not in ("none", "all"):
            count = layout.num_experts or 0
            missing = [e for e in strategy_subset(strategy) if e >= count]
            if missing:
                raise AbliterateError(
                    f"sweep.search.experts: {strategy!r} names expert {missing[0]}, but the "
                    f"model has {count} routed experts per layer (0-{count - 1})."
                )


# --------------------------------------------------------------------------------------
# Trial parameters -> recipe (pure)
# --------------------------------------------------------------------------------------


def layer_strengths(
    num_layers: int, strength: float, peak: float, width: float, floor: float
) -> list[float]:
    """A tent over the layers: `strength` at `peak`, falling linearly to `floor * strength`
    at distance `width` and beyond."""
    return [
        strength * (floor + (1 - floor) * max(0.0, 1 - abs(layer - peak) / width))
        for layer in range(num_layers)
    ]


def _number(trial, name: str, bounds: tuple[float, float]) -> float:
    low, high = bounds
    return float(low) if low == high else trial.suggest_float(name, low, high)


def _choice(trial, name: str, options: tuple):
    return options[0] if len(options) == 1 else trial.suggest_categorical(name, list(options))


def suggest_params(trial, space: SearchSpace) -> dict:
    """Ask a trial (an `optuna.Trial`, or anything with its suggest_* methods) for values.

    Parameters of a component that is off are not asked for, so the sampler models each
    curve only from the trials that used it.
    """
    params = {
        "direction": _number(trial, "direction", space.direction),
        "projection": _choice(trial, "projection", space.projection),
        "norm_preserve": _choice(trial, "norm_preserve", space.norm_preserve),
        "norm_scaled": _choice(trial, "norm_scaled", space.norm_scaled),
        "sparsity": _number(trial, "sparsity", space.sparsity),
    }
    for group in space.groups:
        if group == "experts":
            params["experts"] = _choice(trial, "experts", space.experts)
            on = params["experts"] != "none"
        else:
            on = _choice(trial, f"{group}.on", (True, False) if space.optional else (True,))
        params[f"{group}.on"] = on
        if not on:
            continue
        params[f"{group}.strength"] = _number(trial, f"{group}.strength", space.strength)
        if group == "embed":
            continue
        params[f"{group}.peak"] = _number(trial, f"{group}.peak", space.peak)
        params[f"{group}.width"] = _number(trial, f"{group}.width", space.width)
        params[f"{group}.floor"] = _number(trial, f"{group}.floor", space.floor)
    if space.suppress_top is not None:
        on = _choice(trial, "router_suppress.on", (True, False) if space.optional else (True,))
        params["router_suppress.on"] = on
        if on:
            low, high = space.suppress_top
            params["router_suppress.top"] = (
                low if low == high else trial.suggest_int("router_suppress.top", low, high)
            )
            params["router_suppress.strength"] = _number(
                trial, "router_suppress.strength", space.suppress_strength
            )
    return params


def params_recipe(params: dict, space: SearchSpace, base: dict | None = None) -> dict:
    """The complete recipe a trial stands for (seed format plus options).

    One entry per (layer, component group) with a strength of at least MIN_STRENGTH; the
    router is edited at its own strength (`gate_scale: 1`). `base` holds the config's
    `recipe:` options the search does not set (biases, preserve, ...). An empty `ablate`
    list means every group is off: the trial is the unedited model.
    """
    recipe = {k: v for k, v in (base or {}).items() if k != "ablate"}
    measurement = round(float(params["direction"]), 4)
    measurement = int(measurement) if measurement.is_integer() else measurement
    sparsity = round(float(params["sparsity"]), 4)
    entries = []
    for group in space.groups:
        if not params.get(f"{group}.on"):
            continue
        components = list(GROUPS[group])
        if group == "embed":
            strengths = [params[f"{group}.strength"]] + [0.0] * (space.num_layers - 1)
        else:
            strengths = layer_strengths(
                space.num_layers,
                params[f"{group}.strength"],
                params[f"{group}.peak"],
                params[f"{group}.width"],
                params[f"{group}.floor"],
            )
        for layer, strength in enumerate(strengths):
            if strength >= MIN_STRENGTH:
                entries.append(
                    {
                        "layer": layer,
                        "measurement": measurement,
                        "scale": round(float(strength), 6),
                        "sparsity": sparsity,
                        "components": components,
                    }
                )
    recipe.update(
        ablate=sorted(entries, key=lambda e: e["layer"]),
        projected=params["projection"] == "projected",
        biprojected=params["projection"] == "biprojected",
        norm_preserve=bool(params["norm_preserve"]),
        norm_scaled=bool(params.get("norm_scaled", False)),
        components=None,
        ablate_individual_experts=False,
        expert_subset=strategy_subset(params["experts"])
        if params.get("experts.on") and params.get("experts")
        else None,
        gate_scale=1.0,
        scale=1.0,
    )
    if space.suppress_top is not None:  # the search owns router_suppress then
        recipe.pop("router_suppress", None)
        if params.get("router_suppress.on"):
            recipe["router_suppress"] = {
                "experts": f"top:{int(params['router_suppress.top'])}",
                "strength": round(float(params["router_suppress.strength"]), 6),
            }
    return recipe


def _pick(options, wanted):
    return wanted if wanted in options else options[0]


def _clip(bounds, value):
    return float(min(max(value, bounds[0]), bounds[1]))


def _full_strength(params: dict, space: SearchSpace, group: str) -> None:
    """Set `group`'s curve to strength 1 over all layers (clipped to the space)."""
    params[f"{group}.strength"] = _clip(space.strength, 1.0)
    if group != "embed":
        params[f"{group}.peak"] = _clip(space.peak, (space.num_layers - 1) / 2)
        params[f"{group}.width"] = _clip(space.width, space.num_layers)
        params[f"{group}.floor"] = _clip(space.floor, 1.0)


def _switch_on(params: dict, space: SearchSpace, groups) -> dict:
    """Switch `groups` on at strength 1 over all layers, the routed experts as `all`
    (left off when the space offers only `none`); returns `params`."""
    for group in groups:
        if group == "experts":
            params["experts"] = _pick(space.experts, "all")
            if params["experts"] == "none":
                continue
        else:
            params[f"{group}.on"] = True
        _full_strength(params, space, group)
    return params


def anchor_params(space: SearchSpace, measurement: int | None) -> dict:
    """A first trial every study starts with: the suggested direction, every group on at
    strength 1 over all layers, biprojected, norm-preserving (on dense demo models this is
    the recipe the issue reports as refusal 0 %, KL 0.0004). The sampler then searches
    around and away from it."""
    low, high = space.direction
    direction = float(min(max(measurement if measurement is not None else high, low), high))
    params: dict = {
        "direction": direction,
        "projection": _pick(space.projection, "biprojected"),
        "norm_preserve": _pick(space.norm_preserve, True),
        "norm_scaled": _pick(space.norm_scaled, False),
        "sparsity": space.sparsity[0],
    }
    for group in space.groups:
        if group == "experts":
            params["experts"] = _pick(space.experts, "none")
            if params["experts"] == "none":
                continue
        elif group == "embed":
            params[f"{group}.on"] = False if space.optional else True
            if space.optional:
                continue
        else:
            params[f"{group}.on"] = True
        _full_strength(params, space, group)
    return params


def intervention_params(space: SearchSpace, measurement: int | None) -> dict:
    """A second first trial: the recipe `analyze` tested when it ranked directions by
    intervention (the direction projected plainly out of every writer, embedding and routed
    experts included, at strength 1 over all layers; no router edit). Why both anchors: which
    of the two costs less KL differs between models (biprojected is lower on some organisms,
    plain on others), so the study measures both before the sampler takes over."""
    params = anchor_params(space, measurement)
    params.update(projection=_pick(space.projection, "none"))
    params.update(norm_preserve=_pick(space.norm_preserve, False))
    if "router" in space.groups and space.optional:
        params["router.on"] = False
        for key in ("strength", "peak", "width", "floor"):
            params.pop(f"router.{key}", None)
    return _switch_on(params, space, [g for g in space.groups if g != "router"])


def strategy_params(space: SearchSpace, measurement: int | None, strategy: str) -> dict:
    """The anchor trial (`anchor_params`) with the routed experts edited by `strategy` at
    strength 1 over all layers."""
    params = anchor_params(space, measurement)
    params["experts"] = strategy
    _full_strength(params, space, "experts")
    return params


def corner_params(
    space: SearchSpace, measurement: int | None, strength: float, norm_preserve: bool
) -> dict:
    """A corner of the grid as a first trial: the suggested direction projected plainly
    out of the grid's default writers (attention output, dense and shared MLP down, the
    router; on MoE models every routed expert too), no embedding, at `strength` over all
    layers, norm-preserving or not."""
    params = anchor_params(space, measurement)
    params.update(
        projection=_pick(space.projection, "none"),
        norm_preserve=_pick(space.norm_preserve, norm_preserve),
    )
    writers = [g for g in space.groups if g != "embed"]
    _switch_on(params, space, writers)
    for group in writers:
        if f"{group}.strength" in params:  # on (routed experts: unless the space has none)
            params[f"{group}.strength"] = _clip(space.strength, strength)
    return params


# The grid corners every study also starts from (strength, norm_preserve): on the family
# organisms the grid's best variant was always one of them.
CORNERS = ((1.0, True), (0.9, False), (0.9, True), (1.0, False))


def first_trials(space: SearchSpace, measurement: int | None) -> list[dict]:
    """The trials every study starts with, once each: `anchor_params`,
    `intervention_params`, for each further expert strategy in the space (one neither of
    them uses, e.g. `auto:2`) the anchor with that strategy (`strategy_params`), then the
    grid corners (`corner_params` at `CORNERS`).

    Why the corners: a search that has scored the grid's corners on validation selects
    among them too, so it is never worse there than the grid's best corner; TPE's own
    trials then only have to improve on them. Why one per strategy: which strategy costs
    least differs between MoE models, and the sampler learns little about a categorical
    value it has not seen scored.
    """
    anchors = [anchor_params(space, measurement), intervention_params(space, measurement)]
    if "experts" in space.groups:
        used = {params.get("experts") for params in anchors}
        anchors += [
            strategy_params(space, measurement, strategy)
            for strategy in space.experts
            if strategy not in used
        ]
    trials: list[dict] = []
    for params in anchors + [corner_params(space, measurement, s, np) for s, np in CORNERS]:
        if params not in trials:
            trials.append(params)
    return trials


# --------------------------------------------------------------------------------------
# The study: journal storage, fingerprint, resumption
# --------------------------------------------------------------------------------------


def _storage(journal: str | Path):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    Path(journal).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(journal)))


def fingerprint(data: dict) -> str:
    """sha256 of the JSON of what a study's trials depend on."""
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def target_constraints(row: dict, targets: dict) -> dict[str, float]:
    """A trial's constraint values (Optuna's `Trial.set_constraint`; <= 0 means met): its
    validation refusal rate above `max_refusal_rate`, its benign answers kept below
    `min_benign_kept`, the selection rule's own test.

    Why: the objectives (refusal rate, KL) have a Pareto front that runs all the way to the
    unedited model (refusal 1, KL 0), and an unconstrained sampler spends most trials along
    it, far from the recipes the rule can select. With constraints, TPE models the feasible
    trials apart and proposes near them (llama and GLM organisms, two seeds each: 8, 6, 6
    and 0 of 40 trials met every target on the test prompts, against 2, 5, 0 and 0 without).
    """
    return {
        "refusal_rate": float(row["refusal_rate"]) - float(targets["max_refusal_rate"]),
        "benign_kept": float(targets["min_benign_kept"]) - float(row["benign_kept"]),
    }


def _sampler(settings: SearchSettings, worker: int):
    import optuna

    return optuna.samplers.TPESampler(
        seed=settings.seed + worker,
        n_startup_trials=settings.n_startup_trials,
        constant_liar=True,  # parallel workers do not all pick the same point
    )


def open_study(journal: str | Path, key: str, settings: SearchSettings, worker: int = 0):
    """Load the study of `journal`, refusing one written for another config or model."""
    import optuna

    journal = Path(journal)
    if not journal.is_file():
        raise AbliterateError(f"{journal}: search journal not found (run search_init first).")
    try:
        study = optuna.load_study(
            study_name=STUDY_NAME, storage=_storage(journal), sampler=_sampler(settings, worker)
        )
    except KeyError:
        raise AbliterateError(
            f"{journal}: holds no '{STUDY_NAME}' study; delete it to start a new search."
        ) from None
    found = study.user_attrs.get("fingerprint")
    if found != key:
        raise AbliterateError(
            f"{journal}: this search journal was written for another model, measurements, "
            "prompts or search config; delete it (or restore that config) to continue."
        )
    return study


def create_study(
    journal: str | Path, key: str, settings: SearchSettings, anchors: list[dict]
) -> None:
    """Create the study (or check an existing one) and queue its first trials once."""
    import optuna

    journal = Path(journal)
    if journal.is_file():
        open_study(journal, key, settings)
        logger.info("%s: continuing the existing study", journal)
        return
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=_storage(journal),
        sampler=_sampler(settings, 0),
        directions=["minimize", "minimize"],
    )
    study.set_user_attr("fingerprint", key)
    for params in anchors:
        study.enqueue_trial(params, skip_if_exists=True)
    logger.info("%s: new study, %d anchor trial(s) queued", journal, len(anchors))


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(owner: str) -> bool:
    """Whether the process that ran a trial may still be running (other hosts: assume so)."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_abandoned_trials(study) -> int:
    """Mark RUNNING trials of processes that died (a killed worker) as FAIL, so their
    slots are run again; waiting trials queued by create_study are left as they are."""
    from optuna.trial import TrialState

    failed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("worker")
        if owner and not _alive(owner):
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            failed += 1
    if failed:
        logger.info("marked %d trial(s) of a stopped worker as failed; they are redone", failed)
    return failed


def _active(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)))


# --------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------


@dataclass
class TrialContext:
    """What a worker needs to turn trial parameters into a scored recipe."""

    space: SearchSpace
    layout: object
    measurements: object
    base_recipe: dict
    kl: str = "first_token"
    targets: dict | None = None  # the selection targets (`target_constraints`)


def edits_something(layout, entry: dict) -> bool:
    """Whether a trial's recipe entry names a tensor the model has at its layer (a curve
    can reach layers where a group has none, e.g. `mlp_down` on a model whose every MLP
    is routed experts)."""
    if "embed" in entry["components"]:
        return bool(layout.targets(component="embed"))
    return bool(layout.targets(layer=entry["layer"], component=entry["components"]))


def score_trial(evaluator, context: TrialContext, name: str, params: dict):
    """(recipe, metrics row) of one trial; a trial that edits nothing (every group off,
    or on only where its tensors do not exist) is the base model's row. On MoE models the
    row also says which routed experts the trial's plan edited (`recipe.expert_columns`),
    the experts an export of the same recipe and measurements edits."""
    from .recipe import expert_columns, resolve

    recipe = params_recipe(params, context.space, context.base_recipe)
    recipe["ablate"] = [e for e in recipe["ablate"] if edits_something(context.layout, e)]
    if not recipe["ablate"]:
        base = evaluator.evaluate_base()
        row = {**base.row(), "variant": name, "seconds": 0.0}
        return recipe, {**row, **expert_columns(None, context.layout)}
    plan = resolve(recipe, context.layout, context.measurements)
    return recipe, {**evaluator.evaluate(name, plan).row(), **expert_columns(plan, context.layout)}


def run_worker(
    journal: str | Path,
    key: str,
    settings: SearchSettings,
    context: TrialContext,
    evaluator,
    *,
    worker: int = 0,
    max_trials: int | None = None,
) -> list[int]:
    """Ask, evaluate, tell until the study holds n_trials finished or running trials.

    Returns the numbers of the trials this worker completed. `max_trials` stops this
    worker earlier (tests and benchmarks).
    """
    import optuna

    study = open_study(journal, key, settings, worker)
    fail_abandoned_trials(study)
    kl_column = {"first_token": "kl_first_token", "multi_token": "kl_multi_token"}[context.kl]
    done: list[int] = []
    while _active(study) < settings.n_trials and (max_trials is None or len(done) < max_trials):
        trial = study.ask()
        trial.set_user_attr("worker", _owner())
        params = suggest_params(trial, context.space)
        name = f"trial-{trial.number}"
        try:
            recipe, row = score_trial(evaluator, context, name, params)
        except Exception:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        trial.set_user_attr("recipe", recipe)
        trial.set_user_attr("params", params)
        trial.set_user_attr("metrics", {k: v for k, v in row.items() if k != "variant"})
        if context.targets:  # the sampler tells feasible trials from the rest
            for name, value in target_constraints(row, context.targets).items():
                trial.set_constraint(name, value)
        study.tell(trial, [float(row["refusal_rate"]), float(row[kl_column])])
        done.append(trial.number)
        logger.info(
            "%s (worker %d): refusal %.3f, %s %.4g, benign kept %.3f",
            name,
            worker,
            row["refusal_rate"],
            kl_column,
            row[kl_column],
            row["benign_kept"],
        )
    return done


def trials_table(journal: str | Path, key: str, settings: SearchSettings):
    """One row per completed trial: validation metrics, then the trial's parameters."""
    import pandas as pd
    from optuna.trial import TrialState

    study = open_study(journal, key, settings)
    rows = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        metrics = trial.user_attrs.get("metrics", {})
        params = trial.user_attrs.get("params", trial.params)
        rows.append(
            {
                "variant": f"trial-{trial.number}",
                "trial": trial.number,
                **metrics,
                **{k: v for k, v in params.items()},
                "layers_edited": len({e["layer"] for e in trial.user_attrs["recipe"]["ablate"]}),
            }
        )
    if not rows:
        raise AbliterateError(f"{journal}: the study has no completed trials.")
    return pd.DataFrame(rows).sort_values("trial").reset_index(drop=True), {
        f"trial-{t.number}": t.user_attrs["recipe"]
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    }


# --------------------------------------------------------------------------------------
# Binomial intervals for the reported rates
# --------------------------------------------------------------------------------------


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95 % Wilson score interval of a binomial proportion (sensible at 0 and n)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def add_intervals(table):
    """`*_ci_low`/`*_ci_high` columns for refusal rate, benign refusal rate and kept."""
    table = table.copy()
    for column, count in (
        ("refusal_rate", "n_target"),
        ("benign_refusal_rate", "n_benign"),
        ("benign_kept", "n_benign"),
    ):
        bounds = [
            wilson_interval(round(rate * n), int(n)) if n == n else (math.nan, math.nan)
            for rate, n in zip(table[column], table[count], strict=True)
        ]
        position = table.columns.get_loc(column) + 1
        table.insert(position, f"{column}_ci_low", [b[0] for b in bounds])
        table.insert(position + 1, f"{column}_ci_high", [b[1] for b in bounds])
    return table


def write_json(path: str | Path, data) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=1, default=str) + "\n")
