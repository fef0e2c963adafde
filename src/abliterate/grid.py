"""The sweep grid: variants, their ids, job chunks and the recipe each variant stands for.

Why a static grid: Snakemake must know every job when it builds the DAG, before the
analysis has run. A variant therefore keeps "suggested" as a symbolic value in its id
(`msug`, `Lsug`) and is resolved against `analysis/suggested.yaml` only when it is
evaluated; the resolved measurement index and layer range are recorded in the table.

Why apart from `sweep`: `workflow/rules/common.smk` imports this module while Snakemake
builds the DAG, so it is pure and cheap (no torch, no models); evaluation and aggregation
live in `abliterate.sweep`.

What the grid owns, and how it meets the config's `recipe:` block (docs/evaluation.md):

- `scale` is each ablate entry's scale. The recipe's own `scale` (default 1.0) still
  multiplies it, as for any recipe, so the effective scale of a tensor is
  `sweep.scale x recipe.scale` (`x recipe.gate_scale` for the router). The table's
  `scale` column is the grid value.
- `layers`, `measurement`, `sparsity` make the ablate list; `norm_preserve`,
  `components` and `experts` (-> `ablate_individual_experts`, `expert_subset`) set those
  recipe keys. Setting any of these in `recipe:` to something other than its default
  while sweeping is an error (`check_base_recipe`): the grid would silently override it.
- Router edits (MoE): `gate_scale` (null = the recipe's, default 0.5) sets the read-side
  router strength per variant, and `router_suppress` ("none", "top:K" or "3,17", each
  optionally "@strength") the recipe's `router_suppress`. A variant that sets
  `gate_scale` refuses a `recipe.gate_scale` other than the default; `router_suppress`
  is always the grid's, so `recipe.router_suppress` must stay null while sweeping.
- Every other recipe option (`projected`, `preserve`, `ensemble`, ...) applies to every
  variant unchanged.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from .components import COMPONENTS
from .errors import AbliterateError

SWEEP_KEYS = (
    "scale",
    "sparsity",
    "measurement",
    "layers",
    "components",
    "norm_preserve",
    "experts",
    "gate_scale",
    "router_suppress",
)
_RANGE = re.compile(r"^(\d+)-(\d+)$")
_SUBSET = re.compile(r"^\d+(,\d+)*$")
_ADAPTIVE = re.compile(
    r"^(auto:\d+|coverage:(0?\.\d+|1(\.0*)?))$"
)  # expert_subset auto:K / coverage:F
_COMPONENT = re.compile(r"^[a-z_]+(\+[a-z_]+)*$")
_SUPPRESS = re.compile(r"^(?P<experts>top:[1-9]\d*|\d+(,\d+)*)(@(?P<strength>-?\d+(\.\d+)?))?$")


def format_number(value: float, min_decimals: int = 1) -> str:
    """Shortest stable decimal text for a grid value: 0.3 -> '0.3', never
    '0.30000000000000004'; at least `min_decimals` decimals (1 -> '1.0')."""
    value = round(float(value), 6)
    if value == 0:
        value = 0.0  # no "-0.0"
    text = f"{value:.6f}".rstrip("0")
    whole, _, decimals = text.partition(".")
    return f"{whole}.{decimals.ljust(min_decimals, '0')}"


@dataclass(frozen=True)
class Variant:
    """One point of the sweep grid, with symbolic values kept symbolic."""

    scale: float = 1.0
    sparsity: float = 0.0
    measurement: int | str = "suggested"
    layers: str = "suggested"
    components: str = "default"
    norm_preserve: bool = True
    experts: str = "none"
    gate_scale: float | None = None  # None: the recipe's gate_scale
    router_suppress: str = "none"

    @property
    def id(self) -> str:
        """Readable and stable, e.g. `s1.0_p0.00_m3_L1-4_np1_c-default_e-none`; the router
        parts (`_g0.25`, `_rs-top2x1.0`) only when set, so grids without them keep their ids."""
        measurement = "sug" if self.measurement == "suggested" else str(self.measurement)
        layers = "sug" if self.layers == "suggested" else self.layers
        experts = self.experts.replace(",", "+").replace(":", "")
        text = (
            f"s{format_number(self.scale)}_p{format_number(self.sparsity, 2)}_m{measurement}"
            f"_L{layers}_np{int(self.norm_preserve)}_c-{self.components}_e-{experts}"
        )
        if self.gate_scale is not None:
            text += f"_g{format_number(self.gate_scale)}"
        if self.router_suppress != "none":
            experts, strength = suppress_parts(self.router_suppress)
            chosen = experts.replace("top:", "top").replace(",", "+")
            text += f"_rs-{chosen}x{format_number(strength)}"
        return text

    def params(self) -> dict:
        return asdict(self)


def suppress_parts(value: str) -> tuple[str, float]:
    """A grid `router_suppress` value "EXPERTS[@STRENGTH]" -> (experts, strength)."""
    match = _SUPPRESS.match(value)
    return match["experts"], float(match["strength"] or 1.0)


def _check_value(key: str, value) -> object:
    """Validate one grid value (the schema checks types; this checks meaning)."""
    where = f"sweep.{key}"
    if key == "gate_scale" and value is None:
        return None
    if key in ("scale", "sparsity", "gate_scale"):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise AbliterateError(f"{where}: expected numbers, got {value!r}.")
        if key == "sparsity" and not 0 <= value < 1:
            raise AbliterateError(f"{where}: expected values in [0, 1), got {value!r}.")
        return float(value)
    if key == "measurement":
        if value == "suggested" or (
            isinstance(value, int) and not isinstance(value, bool) and value >= 0
        ):
            return value
        raise AbliterateError(
            f"{where}: expected measurement indices (>= 0) or 'suggested', got {value!r}."
        )
    if key == "layers":
        text = str(value)
        match = _RANGE.match(text)
        if text in ("suggested", "all") or (match and int(match[1]) <= int(match[2])):
            return text
        raise AbliterateError(
            f"{where}: expected 'suggested', 'all' or a range like '2-5', got {value!r}."
        )
    if key == "components":
        text = str(value)
        if text == "default":
            return text
        if _COMPONENT.match(text):
            unknown = [n for n in text.split("+") if n != "default" and n not in COMPONENTS]
            if not unknown:
                return text
            raise AbliterateError(
                f"{where}: unknown component {unknown[0]!r} in {text!r}; expected 'default' "
                f"or '+'-joined names from {', '.join(COMPONENTS)}."
            )
        raise AbliterateError(
            f"{where}: expected 'default' or '+'-joined component names such as "
            f"'attn_out+mlp_down', got {value!r}."
        )
    if key == "norm_preserve":
        if isinstance(value, bool):
            return value
        raise AbliterateError(f"{where}: expected true/false, got {value!r}.")
    if key == "experts":
        text = str(value).replace(" ", "")
        if text in ("none", "all") or _SUBSET.match(text) or _ADAPTIVE.match(text):
            return text
        raise AbliterateError(
            f"{where}: expected 'none', 'all', a subset like '0,1,2,3', 'auto:K' or "
            f"'coverage:F' (docs/moe.md), got {value!r}."
        )
    if key == "router_suppress":
        text = str(value).replace(" ", "")
        if text == "none" or _SUPPRESS.match(text):
            return text
        raise AbliterateError(
            f"{where}: expected 'none', 'top:K' or experts like '3,17', each optionally "
            f"with '@strength' ('top:2@1.5'), got {value!r}."
        )
    raise AbliterateError(
        f"sweep.{key}: unknown sweep parameter; expected one of {', '.join(SWEEP_KEYS)}."
    )


def variants(sweep: dict, moe: bool = True) -> list[Variant]:
    """Every grid point of the config's `sweep:` block, in a stable order, ids unique.

    For a dense model (`moe=False`) the expert and router strategies collapse to their
    defaults: without routed experts or routers they would repeat the default variant.
    A missing or null key is its default.
    """
    defaults = Variant()
    grids: list[list] = []
    for key in SWEEP_KEYS:
        values = sweep.get(key)
        values = [getattr(defaults, key)] if values is None else values
        if not isinstance(values, (list, tuple)) or not values:
            raise AbliterateError(f"sweep.{key}: expected a non-empty list, got {values!r}.")
        values = [_check_value(key, v) for v in values]
        moe_only = key in ("experts", "gate_scale", "router_suppress")
        grids.append([getattr(defaults, key)] if moe_only and not moe else values)
    seen: dict[str, Variant] = {}
    for combo in itertools.product(*grids):
        variant = Variant(**dict(zip(SWEEP_KEYS, combo, strict=True)))
        seen.setdefault(variant.id, variant)
    return list(seen.values())


def varying_parameters(variant_list: Sequence[Variant]) -> list[str]:
    """Grid parameters that take more than one value, in SWEEP_KEYS order."""
    return [k for k in SWEEP_KEYS if len({getattr(v, k) for v in variant_list}) > 1]


def chunks(variant_list: Sequence[Variant], size: int) -> list[list[Variant]]:
    """Consecutive groups of `size` variants: one evaluation job (one model load) each."""
    return [list(variant_list[i : i + size]) for i in range(0, len(variant_list), size)]


def find_variants(variant_list: Sequence[Variant], ids: Iterable[str]) -> list[Variant]:
    by_id = {v.id: v for v in variant_list}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise AbliterateError(
            f"unknown sweep variant {missing[0]!r}; the config's grid does not contain it."
        )
    return [by_id[i] for i in ids]


# --------------------------------------------------------------------------------------
# Variant -> recipe (the seed's YAML format + options)
# --------------------------------------------------------------------------------------


def load_suggested(path: str | Path) -> dict:
    """`analysis/suggested.yaml` (seed format); it must name at least one ablate entry."""
    path = Path(path)
    if not path.is_file():
        raise AbliterateError(f"{path}: suggested recipe not found (run the analyze step first).")
    data = yaml.safe_load(path.read_text()) or {}
    entries = data.get("ablate") if isinstance(data, dict) else None
    if not entries or not all(
        isinstance(e, dict) and "layer" in e and "measurement" in e for e in entries
    ):
        raise AbliterateError(
            f"{path}: expected an 'ablate' list of {{layer, measurement, ...}} entries."
        )
    return data


def resolve_layers(spec: str, suggested: dict | None, num_layers: int) -> list[int]:
    if spec == "suggested":
        if suggested is None:
            raise AbliterateError(
                "sweep.layers uses 'suggested' but no suggested recipe was given."
            )
        return sorted({int(e["layer"]) for e in suggested["ablate"]})
    if spec == "all":
        return list(range(num_layers))
    first, last = (int(n) for n in _RANGE.match(spec).groups())
    if last >= num_layers:
        raise AbliterateError(
            f"sweep.layers: range '{spec}' reaches layer {last}, but the model has {num_layers} "
            f"layers (0-{num_layers - 1})."
        )
    return list(range(first, last + 1))


def resolve_measurement(value: int | str, suggested: dict | None, num_layers: int) -> int:
    if value == "suggested":
        if suggested is None:
            raise AbliterateError(
                "sweep.measurement uses 'suggested' but no suggested recipe was given."
            )
        counts: dict[int, int] = {}
        for entry in suggested["ablate"]:
            counts[int(entry["measurement"])] = counts.get(int(entry["measurement"]), 0) + 1
        return max(counts, key=lambda m: (counts[m], -m))
    if value > num_layers:
        raise AbliterateError(
            f"sweep.measurement: index {value} is out of range; the model has measurement "
            f"indices 0-{num_layers}."
        )
    return int(value)


def variant_recipe(
    variant: Variant,
    *,
    num_layers: int,
    suggested: dict | None = None,
    base: dict | None = None,
) -> dict:
    """The complete recipe a variant stands for, in the seed's format plus options.

    `base` holds the config's `recipe:` options (gate_scale, projected, ...) that the
    grid does not sweep; its own `ablate` list is ignored, and keys the grid sets must be
    left at their defaults (`check_base_recipe`).
    """
    check_base_recipe(base)
    recipe = {k: v for k, v in (base or {}).items() if k != "ablate"}
    layers = resolve_layers(variant.layers, suggested, num_layers)
    measurement = resolve_measurement(variant.measurement, suggested, num_layers)
    recipe["ablate"] = [
        {
            "layer": layer,
            "measurement": measurement,
            "scale": float(format_number(variant.scale)),
            "sparsity": float(format_number(variant.sparsity, 2)),
        }
        for layer in layers
    ]
    recipe["norm_preserve"] = variant.norm_preserve
    recipe["components"] = (
        None if variant.components == "default" else variant.components.split("+")
    )
    if variant.experts == "none":
        recipe["ablate_individual_experts"] = False
        recipe["expert_subset"] = None
    elif variant.experts == "all":
        recipe["ablate_individual_experts"] = True
        recipe["expert_subset"] = None
    elif _ADAPTIVE.match(variant.experts):  # picked per layer from the expert attribution
        recipe["ablate_individual_experts"] = True
        recipe["expert_subset"] = variant.experts
    else:
        recipe["ablate_individual_experts"] = True
        recipe["expert_subset"] = [int(e) for e in variant.experts.split(",")]
    if variant.gate_scale is not None:
        if recipe.get("gate_scale", 0.5) != 0.5:
            raise AbliterateError(
                f"config key recipe.gate_scale is {recipe['gate_scale']!r}, but the sweep sets "
                "it per variant (sweep.gate_scale); put the value in sweep.gate_scale instead."
            )
        recipe["gate_scale"] = float(format_number(variant.gate_scale))
    if variant.router_suppress != "none":  # else unset: check_base_recipe keeps it null
        experts, strength = suppress_parts(variant.router_suppress)
        chosen = experts if experts.startswith("top:") else [int(e) for e in experts.split(",")]
        recipe["router_suppress"] = {"experts": chosen, "strength": strength}
    return recipe


def describe_layers(layers: Sequence[int]) -> str:
    """Compact text for a layer list: [1, 2, 3, 5] -> '1-3,5'."""
    parts, run = [], []
    for layer in sorted(layers):
        if run and layer == run[-1] + 1:
            run.append(layer)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [layer]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def variant_columns(variant: Variant, recipe: dict) -> dict:
    """The parameter columns of a variant's row: grid values plus their resolution."""
    return {
        **{k: getattr(variant, k) for k in SWEEP_KEYS},
        "measurement_resolved": recipe["ablate"][0]["measurement"] if recipe["ablate"] else None,
        "layers_resolved": describe_layers([e["layer"] for e in recipe["ablate"]]),
    }


# recipe key -> its default: the keys a variant sets, so `recipe:` must leave them alone
GRID_OWNED_RECIPE_KEYS = {
    "norm_preserve": True,
    "components": None,
    "ablate_individual_experts": False,
    "expert_subset": None,
    "router_suppress": None,
}


def check_base_recipe(base: dict | None) -> None:
    """Refuse `recipe:` values the grid would silently override (see the module docstring)."""
    for key, default in GRID_OWNED_RECIPE_KEYS.items():
        value = (base or {}).get(key, default)
        if value != default:
            grid_key = "experts" if key in ("ablate_individual_experts", "expert_subset") else key
            raise AbliterateError(
                f"config key recipe.{key} is {value!r}, but the sweep sets it per variant "
                f"(sweep.{grid_key}); put the value in sweep.{grid_key} instead, or set "
                "recipe.ablate to export your own recipe without a sweep."
            )
