"""Recipes (the seed's YAML plus options) and the explicit plans they resolve to.

Why two objects: a recipe is what a person writes ("layer 30, measurement 40, scale 0.8");
a plan is what a machine executes ("edit this key, along this direction, at this scale,
on this axis"). Resolving against the checkpoint's layout and the measurements happens
once, here, so the exporter and the in-memory evaluator consume the same plan and can
only differ if the plan differs.

Defaults (documented in docs/ablation.md):

- Dense model: `attn_out` + `mlp_down` of every listed layer.
- MoE model (the seed's default): `attn_out` + `shared_down` + `router` of every listed
  layer, plus `mlp_down` where a listed layer is one of the dense first layers (GLM-4.5-Air
  layer 0 has a plain MLP; leaving it out would leave that layer's MLP writer untouched).
- Routed experts only when asked: `ablate_individual_experts: true` adds every expert's
  `expert_down` (the writers); `expert_subset` restricts them (and implies the flag, as the
  seed's `--expert-subset` alone does): a flat list (those experts in every edited MoE
  layer), a per-layer mapping `{20: [3, 17]}` (only the listed layers' experts), or
  `auto:K` / `coverage:F`, picked per entry from the expert attribution in the
  measurements (`abliterate.experts`; docs/moe.md). In a fused expert tensor (gpt-oss)
  a subset edits only those experts' slices. Read-side expert tensors (`expert_gate`,
  `expert_up`, `expert_gate_up`) and `embed` only when listed in `components`.
- The router is edited at `gate_scale` (seed: 0.5) times the entry's scale: its input
  side, every row `W <- W - s (W r) r^T` (the seed's "expert routing gate" edit).
- `router_suppress: {experts, strength}` (off by default) lowers the routing of chosen
  experts on target-like inputs by editing only their router rows (`edit.suppress_rows`).
- GLM-4.5 / DeepSeek-V3's `e_score_correction_bias` is never edited (a per-expert
  constant added to the selection scores, not a reader of the residual); the plan says so.
- Writers' biases are edited (plain projection) whenever their weight is.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from .components import COMPONENTS, EXPERT_COMPONENTS
from .directions import IndexedMeans, direction_at, normalize, sparsify
from .edit import apply_edit
from .errors import AbliterateError
from .experts import attributed_layers, expert_signal, require_attribution, select_experts
from .files import write_text_atomic
from .layout import Layout, Target, inspect_checkpoint
from .logs import logger
from .measure import load_measurements
from .shards import read_weight_map

DENSE_DEFAULT = ("attn_out", "mlp_down")
MOE_DEFAULT = ("attn_out", "shared_down", "router", "mlp_down")

ENTRY_KEYS = {"layer", "measurement", "scale", "sparsity", "components"}
ROUTER_SUPPRESS_KEYS = ("experts", "strength")
CORRECTION_BIAS = "e_score_correction_bias"


# --------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AblateEntry:
    """One edited layer. `measurement` may be fractional (the directions of the two
    neighbouring indices, mixed) and num_layers + 1 (after the final norm); `components`,
    when set, replaces the recipe's component set for this entry alone, so one layer's
    attention and MLP writers can be edited at different strengths (two entries)."""

    layer: int
    measurement: int | float
    scale: float = 1.0
    sparsity: float = 0.0
    components: tuple[str, ...] | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.components is None:
            del data["components"]
        else:
            data["components"] = list(self.components)
        return data


@dataclass(frozen=True)
class RouterSuppress:
    """`router_suppress`: which experts' router rows to edit, and how hard.

    Exactly one of `experts` (the same experts in every edited MoE layer), `per_layer`
    ((layer, experts) pairs) or `top` (per edited layer, the `top` experts whose share of
    routed tokens rises most on target prompts over benign ones, from the measurements'
    router statistics) is set. `strength` s edits each chosen row as
    w - s max(w . r, 0) r (see `edit.suppress_rows` for why).
    """

    experts: tuple[int, ...] | None = None
    per_layer: tuple[tuple[int, tuple[int, ...]], ...] | None = None
    top: int | None = None
    strength: float = 1.0

    def to_dict(self) -> dict:
        if self.top is not None:
            experts: Any = f"top:{self.top}"
        elif self.per_layer is not None:
            experts = {layer: list(chosen) for layer, chosen in self.per_layer}
        else:
            experts = list(self.experts or ())
        return {"experts": experts, "strength": self.strength}


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: the seed's keys plus options, every default filled in."""

    ablate: tuple[AblateEntry, ...]
    model: str | None = None
    measurements: str | None = None
    output: str | None = None
    ablate_individual_experts: bool = False
    # flat (e0, e1, ...) | per layer ((layer, (e0, ...)), ...) | "auto:K" | "coverage:F"
    expert_subset: tuple | str | None = None
    components: tuple[str, ...] | None = None
    norm_preserve: bool = True
    preserve: str = "hidden"
    projected: bool = False
    biprojected: bool = False
    norm_scaled: bool = False
    gate_scale: float = 0.5
    scale: float = 1.0
    ensemble: int = 0
    biases: bool = True
    router_suppress: RouterSuppress | None = None
    source: str = "<dict>"  # where it came from, for error messages

    def to_dict(self) -> dict:
        """The recipe as YAML-ready plain data (seed keys first)."""
        data = {k: getattr(self, k) for k in ("model", "measurements", "output")}
        data["ablate_individual_experts"] = self.ablate_individual_experts
        data["expert_subset"] = subset_to_data(self.expert_subset)
        data["ablate"] = [e.to_dict() for e in self.ablate]
        for key in OPTIONS:
            if key not in data:
                value = getattr(self, key)
                if isinstance(value, RouterSuppress):
                    value = value.to_dict()
                data[key] = list(value) if isinstance(value, tuple) else value
        return data


# The keys a recipe may set beside `ablate` -> their defaults (paths are None until given):
# the `Recipe` fields, so the two cannot differ.
OPTIONS: dict[str, Any] = {
    f.name: f.default for f in fields(Recipe) if f.name not in ("ablate", "source")
}


def _fail(source: str, key: str, expected: str, value: Any) -> AbliterateError:
    return AbliterateError(f"{source}: recipe key '{key}' {expected}, got {value!r}.")


def _number(source, key, value, *, integer=False):
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise _fail(source, key, "must be an integer" if integer else "must be a number", value)
    if not math.isfinite(value):
        raise _fail(source, key, "must be a finite number", value)
    return int(value) if integer else float(value)


SUBSET_FORMS = (
    "a list of expert indices like '0,1,2,3', a mapping of layer to indices like "
    "{20: [3, 17]}, 'auto:K' (the K experts per layer with the most refusal signal) or "
    "'coverage:F' (the fewest experts holding a fraction F of it)"
)


def _parse_expert_list(source: str, key: str, value, *, empty_ok: bool) -> tuple[int, ...]:
    if isinstance(value, str):
        try:
            value = [int(part) for part in value.replace(" ", "").split(",") if part]
        except ValueError:
            raise _fail(source, key, f"must be {SUBSET_FORMS}", value) from None
    if isinstance(value, bool) or isinstance(value, int):
        value = [value]
    if not isinstance(value, (list, tuple)) or (not value and not empty_ok):
        raise _fail(source, key, "must be a non-empty list of expert indices", value)
    subset = tuple(_number(source, key, v, integer=True) for v in value)
    if any(e < 0 for e in subset):
        raise _fail(source, key, "must hold indices >= 0", value)
    return tuple(sorted(set(subset)))


def _parse_auto(source: str, value: str) -> str | None:
    """'auto:K' / 'coverage:F' in canonical spelling, or None for a plain list string."""
    text = value.strip().lower().replace(" ", "")
    kind, _, amount = text.partition(":")
    if kind not in ("auto", "coverage"):
        return None
    try:
        number = int(amount) if kind == "auto" else float(amount)
    except ValueError:
        number = None
    if kind == "auto" and (number is None or number < 1):
        raise _fail(source, "expert_subset", "'auto:K' needs a whole number K >= 1 of "
                    "experts per layer, e.g. 'auto:2'", value)  # fmt: skip
    if kind == "coverage" and (number is None or not 0.0 < number <= 1.0):
        raise _fail(source, "expert_subset", "'coverage:F' needs a fraction F in (0, 1], "
                    "e.g. 'coverage:0.8'", value)  # fmt: skip
    return f"{kind}:{number:g}"


def _parse_subset(source: str, value):
    """The recipe's `expert_subset` in its validated form (see `Recipe.expert_subset`)."""
    if value is None:
        return None
    if isinstance(value, str):
        auto = _parse_auto(source, value)
        if auto is not None:
            return auto
    if isinstance(value, dict):
        if not value:
            raise _fail(source, "expert_subset", f"must be {SUBSET_FORMS}", value)
        per_layer = {}
        for layer, experts in value.items():
            try:
                index = int(layer)
            except (TypeError, ValueError):
                index = -1
            if isinstance(layer, bool) or index < 0 or str(index) != str(layer).strip():
                raise _fail(source, "expert_subset", "must map layer indices (integers >= 0) "
                            "to lists of expert indices", value)  # fmt: skip
            per_layer[index] = _parse_expert_list(
                source, f"expert_subset.{index}", experts, empty_ok=True
            )
        return tuple(sorted(per_layer.items()))
    return _parse_expert_list(source, "expert_subset", value, empty_ok=False)


def subset_kind(subset) -> str | None:
    """'flat', 'layers', 'auto', 'coverage' or None for a parsed `expert_subset`."""
    if subset is None:
        return None
    if isinstance(subset, str):
        return subset.partition(":")[0]
    if subset and isinstance(subset[0], tuple):
        return "layers"
    return "flat"


def subset_to_data(subset):
    """A parsed `expert_subset` as YAML-ready data (list, {layer: list} or the string)."""
    kind = subset_kind(subset)
    if kind == "flat":
        return list(subset)
    if kind == "layers":
        return {layer: list(experts) for layer, experts in subset}
    return subset


def load_recipe(path_or_dict: str | Path | dict, overrides: dict | None = None) -> Recipe:
    """Read and validate a recipe (a YAML path or a dict), then apply `overrides`.

    `overrides` are recipe keys that win over the file (the CLI's
    `--ablate-individual-experts`, `--expert-subset`, `--output`); None values are ignored.
    """
    if isinstance(path_or_dict, dict):
        source, data = "<recipe>", copy.deepcopy(path_or_dict)
    else:
        path = Path(path_or_dict)
        source = str(path)
        if not path.is_file():
            raise AbliterateError(f"{path}: recipe file not found.")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise AbliterateError(f"{path}: not valid YAML ({error}).") from None
        if not isinstance(data, dict):
            raise AbliterateError(f"{path}: expected a YAML mapping of recipe keys.")
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    unknown = sorted(set(data) - set(OPTIONS) - {"ablate"})
    if unknown:
        raise AbliterateError(
            f"{source}: unknown recipe key '{unknown[0]}' (expected one of ablate, "
            f"{', '.join(OPTIONS)})."
        )
    raw_entries = data.get("ablate")
    if not isinstance(raw_entries, list) or not raw_entries:
        raise _fail(source, "ablate", "must be a non-empty list of {layer, measurement} entries",
                    raw_entries)  # fmt: skip
    entries = []
    for i, raw in enumerate(raw_entries):
        where = f"ablate[{i}]"
        if not isinstance(raw, dict) or "layer" not in raw or "measurement" not in raw:
            raise _fail(source, where, "must be a mapping with 'layer' and 'measurement'", raw)
        extra = sorted(set(raw) - ENTRY_KEYS)
        if extra:
            raise _fail(source, f"{where}.{extra[0]}", "is not an entry key "
                        "(expected layer, measurement, scale, sparsity, components)",
                        raw[extra[0]])  # fmt: skip
        layer = _number(source, f"{where}.layer", raw["layer"], integer=True)
        measurement = _number(source, f"{where}.measurement", raw["measurement"])
        measurement = int(measurement) if measurement.is_integer() else measurement
        scale = _number(source, f"{where}.scale", raw.get("scale", 1.0))
        sparsity = _number(source, f"{where}.sparsity", raw.get("sparsity", 0.0))
        if layer < 0 or measurement < 0:
            raise _fail(source, where, "must have layer and measurement >= 0", raw)
        if not 0.0 <= sparsity < 1.0:
            raise _fail(source, f"{where}.sparsity", "must be in [0, 1)", sparsity)
        components = _parse_components(source, raw.get("components"))
        entries.append(AblateEntry(layer, measurement, scale, sparsity, components))

    options = {k: data.get(k, default) for k, default in OPTIONS.items()}
    for key in (
        "ablate_individual_experts",
        "norm_preserve",
        "projected",
        "biprojected",
        "norm_scaled",
        "biases",
    ):
        if not isinstance(options[key], bool):
            raise _fail(source, key, "must be true or false", options[key])
    for key in ("gate_scale", "scale"):
        options[key] = _number(source, key, options[key])
    options["ensemble"] = _number(source, "ensemble", options["ensemble"], integer=True)
    if options["ensemble"] < 0:
        raise _fail(source, "ensemble", "must be >= 0", options["ensemble"])
    if options["preserve"] not in ("hidden", "other"):
        raise _fail(source, "preserve", "must be 'hidden' or 'other'", options["preserve"])
    for key in ("model", "measurements", "output"):
        if options[key] is not None and not isinstance(options[key], (str, Path)):
            raise _fail(source, key, "must be a path", options[key])
        if options[key] is not None:
            options[key] = str(options[key])
    options["expert_subset"] = _parse_subset(source, options["expert_subset"])
    options["components"] = _parse_components(source, options["components"])
    options["router_suppress"] = _parse_router_suppress(source, options["router_suppress"])
    return Recipe(ablate=tuple(entries), source=source, **options)


def _expert_list(source: str, key: str, value) -> tuple[int, ...]:
    if isinstance(value, str):
        try:
            value = [int(part) for part in value.replace(" ", "").split(",") if part]
        except ValueError:
            raise _fail(
                source, key, "must be a list of expert indices like '3,17'", value
            ) from None
    if not isinstance(value, (list, tuple)) or not value:
        raise _fail(source, key, "must be a non-empty list of expert indices", value)
    experts = tuple(_number(source, key, v, integer=True) for v in value)
    if any(e < 0 for e in experts):
        raise _fail(source, key, "must hold expert indices >= 0", value)
    return tuple(sorted(set(experts)))


def _parse_router_suppress(source: str, value) -> RouterSuppress | None:
    """`router_suppress: {experts: [3, 17] | {20: [3], 21: [5]} | 'top:2', strength: 1.0}`."""
    if value is None or isinstance(value, RouterSuppress):
        return value
    key = "router_suppress"
    if not isinstance(value, dict):
        raise _fail(source, key, "must be a mapping {experts: ..., strength: ...}", value)
    extra = sorted(set(value) - set(ROUTER_SUPPRESS_KEYS))
    if extra:
        raise _fail(source, f"{key}.{extra[0]}", "is not a router_suppress key (expected "
                    "experts, strength)", value[extra[0]])  # fmt: skip
    if "experts" not in value:
        raise _fail(source, f"{key}.experts", "is required (a list, {layer: list} or 'top:K')",
                    None)  # fmt: skip
    strength = _number(source, f"{key}.strength", value.get("strength", 1.0))
    experts = value["experts"]
    where = f"{key}.experts"
    if isinstance(experts, str) and experts.replace(" ", "").startswith("top:"):
        count = experts.replace(" ", "")[4:]
        if not count.isdigit() or int(count) < 1:
            raise _fail(source, where, "must be 'top:K' with an integer K >= 1", experts)
        return RouterSuppress(top=int(count), strength=strength)
    if isinstance(experts, dict):
        if not experts:
            raise _fail(source, where, "must name at least one layer", experts)
        per_layer = {}
        for layer, chosen in experts.items():
            if isinstance(layer, str) and layer.strip().isdigit():
                layer = int(layer)
            layer = _number(source, f"{where} layer", layer, integer=True)
            if layer < 0:
                raise _fail(source, f"{where} layer", "must be >= 0", layer)
            per_layer[layer] = _expert_list(source, f"{where}[{layer}]", chosen)
        return RouterSuppress(per_layer=tuple(sorted(per_layer.items())), strength=strength)
    return RouterSuppress(experts=_expert_list(source, where, experts), strength=strength)


def _parse_components(source: str, value) -> tuple[str, ...] | None:
    """None = the architecture's defaults; 'default' inside a list expands to them."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [part for part in value.replace("+", ",").split(",") if part]
    if not isinstance(value, (list, tuple)) or not value:
        raise _fail(source, "components", "must be a list of component names", value)
    for name in value:
        if name != "default" and name not in COMPONENTS:
            raise AbliterateError(
                f"{source}: recipe key 'components' names unknown component {name!r} "
                f"(expected 'default' or one of {', '.join(COMPONENTS)})."
            )
    return tuple(dict.fromkeys(value))


# --------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------


@dataclass
class PlanEntry:
    """One tensor edit: the key on disk, the direction, the effective scale and the mode."""

    key: str
    component: str
    side: str  # write | read
    layer: int | None
    expert: int | None
    hidden_axis: int
    shape: tuple[int, ...]
    dtype: str
    shard: str
    scale: float
    norm_preserve: bool
    preserve: str
    bias: str | None
    bias_shard: str | None
    direction_id: str  # tensor name in plan.safetensors
    direction: torch.Tensor = field(repr=False)
    # a fused expert tensor edited in these experts' slices only (leading axis); None: all
    experts: tuple[int, ...] | None = None
    # router suppression only: the router rows (experts) edited; None = the whole tensor
    rows: tuple[int, ...] | None = None

    @classmethod
    def for_target(
        cls, target: Target, *, layer: int | None, direction_id: str, direction: torch.Tensor,
        scale: float, norm_preserve: bool = True, preserve: str = "hidden",
        bias_shard: str | None = None, with_bias: bool = False,
        experts: tuple[int, ...] | None = None,
    ) -> PlanEntry:  # fmt: skip
        """The edit of one layout target (its key, axis, shape, dtype and shard);
        `experts` restricts a fused target to those experts' slices."""
        bias = target.bias if with_bias and target.side == "write" else None
        return cls(
            key=target.key,
            component=target.component,
            side=target.side,
            layer=layer,
            expert=target.expert,
            hidden_axis=target.hidden_axis,
            shape=tuple(target.shape),
            dtype=target.dtype,
            shard=target.shard,
            scale=scale,
            norm_preserve=norm_preserve,
            preserve=preserve,
            bias=bias,
            bias_shard=(bias_shard or target.shard) if bias else None,
            direction_id=direction_id,
            direction=direction,
            experts=experts,
        )

    @property
    def mode(self) -> str:
        """'hidden' / 'other' (norm-preserving, which norms) or 'plain' (projection only)."""
        return self.preserve if self.norm_preserve else "plain"

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("direction")
        data["shape"] = list(self.shape)
        data["mode"] = self.mode
        if self.experts is None:
            del data["experts"]  # plans without expert slices keep their old hash
        else:
            data["experts"] = list(self.experts)
        if self.rows is None:  # plans without router suppression keep their old JSON
            del data["rows"]
        else:
            data["rows"] = list(self.rows)
        return data


@dataclass
class Plan:
    """The explicit edit list plus what it was made from (for manifests and checks)."""

    entries: list[PlanEntry]
    model_dir: str
    recipe: dict
    measurements: str | None = None
    measurements_sha256: str | None = None
    info: dict = field(default_factory=dict)  # layout summary: prefix, is_moe, experts...

    def keys(self) -> list[str]:
        return list(dict.fromkeys(e.key for e in self.entries))

    def edited_experts(self) -> dict[int, tuple[int, ...]]:
        """Per MoE layer, the routed experts whose weights the plan edits (any expert
        tensor: a per-expert key, or the edited slices of a fused one; a router row edit
        is not an expert edit). Why from the plan: it is what the export touches, whatever
        strategy (`all`, a list, `auto:K`, `coverage:F`) chose it."""
        experts: dict[int, set[int]] = {}
        for entry in self.entries:
            if entry.component not in EXPERT_COMPONENTS or entry.layer is None:
                continue
            if entry.expert is not None:
                chosen = {entry.expert}
            else:  # fused [E, ...]: its slices, or every expert
                chosen = set(entry.experts or range(entry.shape[0]))
            experts.setdefault(entry.layer, set()).update(chosen)
        return {layer: tuple(sorted(experts[layer])) for layer in sorted(experts)}

    def by_shard(self) -> dict[str, list[tuple[str, PlanEntry]]]:
        """shard -> [(key, entry)] in plan order; a bias is its own item (possibly elsewhere)."""
        shards: dict[str, list[tuple[str, PlanEntry]]] = {}
        for entry in self.entries:
            shards.setdefault(entry.shard, []).append((entry.key, entry))
            if entry.bias:
                shards.setdefault(entry.bias_shard, []).append((entry.bias, entry))
        return shards

    def edits(self, shard: str | None = None) -> dict[str, list[tuple[PlanEntry, bool]]]:
        """key -> [(entry, is_bias)] in plan order, for one shard or the whole plan.

        This is what every consumer applies: the exporter per shard, the verifier and the
        in-memory evaluator for the whole plan, each through `edit_tensor`.
        """
        shards = self.by_shard()
        edits: dict[str, list[tuple[PlanEntry, bool]]] = {}
        for name in [shard] if shard is not None else list(shards):
            for key, entry in shards.get(name, []):
                edits.setdefault(key, []).append((entry, key != entry.key))
        return edits

    def sha256(self) -> str:
        """Identity of what the plan does (entries and directions), for resume checks."""
        digest = hashlib.sha256(json.dumps([e.to_json() for e in self.entries]).encode())
        for entry in self.entries:
            digest.update(entry.direction.to(torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write `plan.json` and, beside it, `<stem>.safetensors` with the directions."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors_path = path.with_suffix(".safetensors")
        directions = {}
        for entry in self.entries:
            directions.setdefault(
                entry.direction_id, entry.direction.to(torch.float32).contiguous()
            )
        data = {
            "model_dir": self.model_dir,
            "recipe": self.recipe,
            "measurements": self.measurements,
            "measurements_sha256": self.measurements_sha256,
            "info": self.info,
            "directions_file": tensors_path.name,
            "entries": [e.to_json() for e in self.entries],
        }
        tmp_tensors = tensors_path.with_name(tensors_path.name + ".tmp")
        save_file(directions, str(tmp_tensors))
        tmp_tensors.replace(tensors_path)
        return write_text_atomic(path, json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        from safetensors.torch import load_file

        path = Path(path)
        try:
            data = json.loads(path.read_text())
            directions = load_file(str(path.parent / data["directions_file"]))
            entries = []
            for raw in data["entries"]:
                raw = dict(raw)
                raw.pop("mode", None)
                raw["shape"] = tuple(raw["shape"])
                if raw.get("experts") is not None:
                    raw["experts"] = tuple(raw["experts"])
                if raw.get("rows") is not None:
                    raw["rows"] = tuple(raw["rows"])
                raw["direction"] = directions[raw["direction_id"]]
                entries.append(PlanEntry(**raw))
        except FileNotFoundError as error:
            raise AbliterateError(f"{path}: plan file not found ({error.filename}).") from None
        except (ValueError, KeyError, TypeError) as error:
            raise AbliterateError(
                f"{path}: malformed plan (expected plan.json + its directions file: {error})."
            ) from None
        return cls(
            entries=entries,
            model_dir=data["model_dir"],
            recipe=data["recipe"],
            measurements=data.get("measurements"),
            measurements_sha256=data.get("measurements_sha256"),
            info=data.get("info", {}),
        )

    def describe(self) -> str:
        """One line per edit (key, component, scale, mode) and the totals."""
        lines = [
            f"{e.key}  {e.component}  scale={e.scale:g}  mode={e.mode}"
            + (f"  experts={','.join(map(str, e.experts))}" if e.experts is not None else "")
            + (f"  bias={e.bias}" if e.bias else "")
            + (f"  rows={','.join(map(str, e.rows))}" if e.rows is not None else "")
            for e in self.entries
        ]
        counts: dict[str, int] = {}
        for entry in self.entries:
            counts[entry.component] = counts.get(entry.component, 0) + 1
        by_component = ", ".join(f"{n} {c}" for c, n in counts.items())
        shards = len(
            {e.shard for e in self.entries} | {e.bias_shard for e in self.entries if e.bias}
        )
        lines.append(
            f"total: {len(self.entries)} tensor edits ({by_component}), "
            f"{sum(1 for e in self.entries if e.bias)} biases, in {shards} shard(s)"
        )
        untouched = self.info.get("untouched_correction_biases") or []
        if untouched:
            lines.append(
                f"untouched: {len(untouched)} router {CORRECTION_BIAS} tensor(s) of the edited "
                "layers (per-expert selection offsets, not readers of the residual stream)"
            )
        return "\n".join(lines)


def edit_tensor(weight: torch.Tensor, edits, device=None, out=None) -> torch.Tensor:
    """Apply one key's plan edits `[(entry, is_bias)]` in order (`Plan.edits`).

    The exporter, the verifier and the in-memory evaluator all call this, so they can only
    disagree if their input tensors differ. `out` receives the result (it may be `weight`
    itself: the exporter edits its read buffer in place).
    """
    for entry, is_bias in edits:
        experts = getattr(entry, "experts", None)
        if experts is None:
            weight = apply_edit(weight, entry, is_bias=is_bias, device=device, out=out)
        else:
            # a fused tensor [E, ...] (or its bias [E, d]) edited in some experts' slices only
            sliced = replace(entry, hidden_axis=entry.hidden_axis % weight.ndim - 1, experts=None)
            edited = weight.clone() if out is None else out.copy_(weight)
            for expert in experts:
                apply_edit(
                    edited[expert], sliced, is_bias=is_bias, device=device, out=edited[expert]
                )
            weight = edited
        out = weight  # later edits of the same key work in place on the result
    return weight


def tensor_chunks(info, edits) -> list[tuple[int, tuple[int, ...], list]]:
    """(byte offset, shape, edits) pieces to stream a target in: per expert when fused.

    `ablate_tensor` itself edits a 3-D tensor one leading slice at a time when the hidden
    axis is not the leading one, so slice-wise streaming gives the same bits while holding
    one expert instead of all of them. `info` is the tensor's `shards.TensorInfo`.
    """
    ndim = len(info.shape)
    if ndim < 3 or any(is_bias or e.hidden_axis % ndim == 0 for e, is_bias in edits):
        return [(info.begin, tuple(info.shape), edits)]
    step = info.nbytes // info.shape[0]
    return [
        (
            info.begin + i * step,
            tuple(info.shape[1:]),
            [
                (replace(e, hidden_axis=e.hidden_axis % ndim - 1, experts=None), b)
                for e, b in edits
                if getattr(e, "experts", None) is None or i in e.experts
            ],
        )
        for i in range(info.shape[0])
    ]


# --------------------------------------------------------------------------------------
# Resolution: recipe + layout + measurements -> plan
# --------------------------------------------------------------------------------------


def default_components(recipe: Recipe, is_moe: bool) -> tuple[str, ...]:
    """The component set a recipe edits (see the module docstring for the defaults)."""
    base = MOE_DEFAULT if is_moe else DENSE_DEFAULT
    if recipe.components is None:
        chosen = list(base)
    else:
        chosen = []
        for name in recipe.components:
            chosen.extend(base if name == "default" else [name])
    if is_moe and (recipe.ablate_individual_experts or recipe.expert_subset is not None):
        if not any(c in EXPERT_COMPONENTS for c in chosen):
            chosen.append("expert_down")
    return tuple(dict.fromkeys(chosen))


def _measurement_arrays(measurements) -> tuple[torch.Tensor, torch.Tensor]:
    target = getattr(measurements, "target_mean", None)
    benign = getattr(measurements, "benign_mean", None)
    if target is None or benign is None:
        raise AbliterateError("measurements lack target_mean/benign_mean tensors.")
    return torch.as_tensor(target), torch.as_tensor(benign)


def entry_direction(
    recipe: Recipe, entry: AblateEntry, measurements, num_layers: int
) -> torch.Tensor:
    """The float32 unit direction an ablate entry uses (from `abliterate.directions`).

    `projected` orthogonalizes against the benign mean at the measurement index,
    `biprojected` also against the benign mean at index `layer` (the stream entering the
    edited layer). `ensemble: k` averages the unit directions of indices m-k..m+k
    (clipped to the measured range) and renormalizes before sparsifying, so neighbouring
    layers' estimates smooth out one noisy index.
    """
    options = dict(
        projected=recipe.projected or recipe.biprojected,
        biprojected_at=entry.layer if recipe.biprojected else None,
        norm_scaled=recipe.norm_scaled,
    )
    means = IndexedMeans(measurements)
    m, k = entry.measurement, recipe.ensemble
    if k == 0:
        r = direction_at(means, m, sparsity=entry.sparsity, **options)
    else:
        last = means.num_indices - 1
        window = [m + offset for offset in range(-k, k + 1) if 0 <= m + offset <= last]
        r = normalize(sum(direction_at(means, i, **options) for i in window))
        r = sparsify(r, entry.sparsity)
    return r.to(torch.float32)


def _check_ranges(recipe: Recipe, layout: Layout, measurements) -> None:
    """Entries name existing layers and measurement indices of the model's width."""
    num_layers, hidden = layout.num_layers, layout.hidden_size
    target, benign = _measurement_arrays(measurements)
    if target.ndim != 2 or target.shape != benign.shape:
        raise AbliterateError(
            f"{recipe.measurements or 'measurements'}: target_mean/benign_mean must both be "
            f"[indices, hidden], got {tuple(target.shape)} and {tuple(benign.shape)}."
        )
    if target.shape[1] != hidden:
        raise AbliterateError(
            f"{recipe.measurements or 'measurements'}: directions have {target.shape[1]} "
            f"components but the model's hidden_size is {hidden}; were they measured on "
            "another model?"
        )
    indices = IndexedMeans(measurements).num_indices  # + 1 when the final norm was measured
    _check_measured_depth(recipe, measurements, num_layers, indices)
    for i, entry in enumerate(recipe.ablate):
        if entry.layer >= num_layers:
            raise AbliterateError(
                f"{recipe.source}: recipe key 'ablate[{i}].layer' is {entry.layer}, but the "
                f"model has {num_layers} decoder layers (0-{num_layers - 1})."
            )
        if entry.measurement > indices - 1:
            raise AbliterateError(
                f"{recipe.source}: recipe key 'ablate[{i}].measurement' is {entry.measurement}, "
                f"but the measurements have indices 0-{indices - 1}."
            )


def _check_measured_depth(recipe: Recipe, measurements, num_layers: int, indices: int) -> None:
    """Measurements of a model with another depth but the same width would pass the width
    check and put every direction at the wrong depth, so the layer counts must agree."""
    meta = getattr(measurements, "meta", None) or {}
    measured = meta.get("num_layers")
    source = recipe.measurements or meta.get("source_file") or "measurements"
    if isinstance(measured, int) and measured != num_layers:
        raise AbliterateError(
            f"{source}: measured on a model with {measured} decoder layers, but the model has "
            f"{num_layers}; were they measured on another model?"
        )
    if indices > num_layers + 2:
        raise AbliterateError(
            f"{source}: holds {indices} measurement indices, but a model with {num_layers} "
            f"decoder layers has at most {num_layers + 2} (0-{num_layers}, and the final norm's "
            "output); were they measured on another model?"
        )


def _layer_expert_count(layout: Layout, layer: int) -> int:
    """Routed experts of one layer: per-expert tensors, a fused tensor's E, or the router's
    rows (a layer whose expert tensors are not among its targets)."""
    targets = layout.layer(layer).targets
    indices = {t.expert for t in targets if t.expert is not None}
    if indices:
        return max(indices) + 1
    fused = [t for t in targets if t.fused]
    if fused:
        return fused[0].shape[0]
    routers = [t for t in targets if t.component == "router"]
    return routers[0].shape[0] if routers else layout.num_experts


# the columns `expert_columns` adds to the rows of an MoE model's sweep and search tables
EXPERT_COLUMNS = ("experts_edited", "expert_selection")


def expert_columns(plan: Plan | None, layout: Layout) -> dict:
    """The expert columns of a sweep or search row on an MoE model: `experts_edited`, the
    (layer, routed expert) pairs whose weights the plan edits, and `expert_selection`,
    which ones ("2:2,6;3:all"; "none"). None for a trial that edits nothing. Empty for a
    dense model, whose tables keep their columns."""
    if not layout.is_moe:
        return {}
    selection = plan.edited_experts() if plan is not None else {}
    parts = []
    for layer, experts in selection.items():
        every = len(experts) == _layer_expert_count(layout, layer)
        parts.append(f"{layer}:{'all' if every else ','.join(map(str, experts))}")
    return {
        "experts_edited": sum(len(experts) for experts in selection.values()),
        "expert_selection": ";".join(parts) or "none",
    }


def _moe_layer_range(layout: Layout) -> str:
    layers = list(layout.moe_layers)
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(map(str, layers))


def _check_experts(recipe: Recipe, layout: Layout, measurements) -> None:
    """The subset names experts and layers the model has (and, for auto, the measurements
    hold the attribution it is picked from)."""
    subset, kind = recipe.expert_subset, subset_kind(recipe.expert_subset)
    if kind is None:
        return
    if not layout.is_moe:
        raise AbliterateError(
            f"{recipe.source}: recipe key 'expert_subset' is set, but the model has no routed "
            "experts."
        )
    if kind in ("auto", "coverage"):
        source = recipe.measurements or (getattr(measurements, "meta", None) or {}).get(
            "source_file", "the measurements"
        )
        require_attribution(
            measurements, source, f"{recipe.source}: recipe key 'expert_subset: {subset}'"
        )
        return
    edited = [e.layer for e in recipe.ablate if e.layer in layout.moe_layers]
    if kind == "flat":
        pairs = [(edited[0] if edited else layout.moe_layers[0], subset)]
    else:
        pairs = list(subset)
        listed = {e.layer for e in recipe.ablate}
        for layer, _ in pairs:
            if layer >= layout.num_layers:
                raise AbliterateError(
                    f"{recipe.source}: recipe key 'expert_subset' names layer {layer}, but the "
                    f"model has {layout.num_layers} decoder layers (0-{layout.num_layers - 1})."
                )
            if layer not in layout.moe_layers:
                raise AbliterateError(
                    f"{recipe.source}: recipe key 'expert_subset' names layer {layer}, which is "
                    "a dense layer without routed experts (e.g. GLM-4.5's first layers, "
                    "first_k_dense_replace); expected one of the MoE layers "
                    f"{_moe_layer_range(layout)}."
                )
            if layer not in listed:
                raise AbliterateError(
                    f"{recipe.source}: recipe key 'expert_subset' names layer {layer}, which "
                    "no ablate entry edits; add an entry for it or remove it from the subset."
                )
    for layer, experts in pairs:
        count = _layer_expert_count(layout, layer)
        for expert in experts:
            if expert >= count:
                raise AbliterateError(
                    f"Expert {expert} not found (layer {layer} has {count} experts, "
                    f"indices 0-{count - 1})."
                )


def entry_experts(
    recipe: Recipe, item: AblateEntry, direction: torch.Tensor, measurements
) -> set[int] | None:
    """The routed experts ablate entry `item` edits: None = all of them, else a set.

    A flat subset applies to every layer; a per-layer one gives unlisted layers no routed
    experts; `auto:K` / `coverage:F` pick from the attribution along the entry's own
    direction (`abliterate.experts.select_experts`).
    """
    subset, kind = recipe.expert_subset, subset_kind(recipe.expert_subset)
    if kind is None:
        return None
    if kind == "flat":
        return set(subset)
    if kind == "layers":
        return set(dict(subset).get(item.layer, ()))
    if item.layer not in attributed_layers(measurements):
        return set()
    amount = subset.partition(":")[2]
    signal = expert_signal(measurements, item.layer, direction)
    if kind == "auto":
        return set(select_experts(signal, top_k=int(amount)))
    return set(select_experts(signal, coverage=float(amount)))


def _warn_about(recipe: Recipe, layout: Layout, components: tuple[str, ...]) -> None:
    """Say when the chosen components leave writers unedited or also edit the lm_head."""
    if layout.is_moe and not layout.num_shared_experts and "expert_down" not in components:
        logger.warning(
            "This MoE model has no shared experts: without ablate_individual_experts its "
            "MLP writes into the residual stream are left unedited."
        )
    if "embed" in components and layout.tie_word_embeddings:
        logger.warning(
            "The embedding is tied to the output head: editing it also edits the lm_head."
        )


def _entry_components(
    recipe: Recipe, layout: Layout, components: tuple[str, ...]
) -> list[tuple[str, ...]]:
    """Each ablate entry's components: its own `components` list when it has one (the
    search gives every component its own strength per layer), else the recipe's."""
    base = MOE_DEFAULT if layout.is_moe else DENSE_DEFAULT
    return [
        components
        if item.components is None
        else tuple(
            dict.fromkeys(c for n in item.components for c in (base if n == "default" else [n]))
        )
        for item in recipe.ablate
    ]


def _selected_targets(
    recipe: Recipe,
    layout: Layout,
    per_entry: list[tuple[str, ...]],
    index: int,
    subset: set[int] | None = None,
) -> list[tuple[Target, tuple[int, ...] | None]]:
    """The layout targets ablate entry `index` edits, each with the expert slices of a
    fused target it is restricted to (None: the whole tensor): its layer's tensors of its
    components (routed experts restricted to `subset`, from `entry_experts`), plus the
    embedding for the lowest-layer entry among those that edit it (it writes into the
    residual before any layer, so it is edited once)."""
    item, components = recipe.ablate[index], per_entry[index]
    candidates = list(layout.layer(item.layer).targets)
    with_embed = [i for i, chosen in enumerate(per_entry) if "embed" in chosen]
    embed_owner = min(with_embed, key=lambda i: (recipe.ablate[i].layer, i), default=None)
    if index == embed_owner:
        candidates += list(layout.globals)
    chosen = []
    for target in candidates:
        if target.component not in components:
            continue
        slices = None
        if target.component in EXPERT_COMPONENTS and subset is not None:
            if target.fused:
                if target.hidden_axis % len(target.shape) == 0:
                    raise AbliterateError(
                        f"{recipe.source}: recipe key 'expert_subset' cannot select experts "
                        f"of the fused tensor {target.key} (its leading axis is the hidden "
                        "one, not the experts); edit all experts or none."
                    )
                if not subset:
                    continue
                if set(subset) != set(range(target.shape[0])):
                    slices = tuple(sorted(subset))
            elif target.expert not in subset:
                continue
        chosen.append((target, slices))
    return chosen


def resolve(
    recipe: Recipe | dict,
    layout: Layout,
    measurements,
    *,
    weight_map: dict[str, str] | None = None,
    measurements_path: str | Path | None = None,
) -> Plan:
    """Turn a recipe into the explicit per-tensor plan.

    Steps: check the entries against the layout and measurements, choose the components,
    then per ablate entry derive its direction and make one `PlanEntry` per selected
    target (effective scale: entry scale x `scale`, x `gate_scale` for the router).
    `measurements` is an `abliterate.measure.Measurements` (anything with
    `target_mean`/`benign_mean`). `weight_map` (key -> shard) locates writers' biases;
    without it a bias is assumed to live in its weight's shard.
    """
    if isinstance(recipe, dict):
        recipe = load_recipe(recipe)
    _check_ranges(recipe, layout, measurements)
    _check_experts(recipe, layout, measurements)
    components = default_components(recipe, layout.is_moe)
    per_entry = _entry_components(recipe, layout, components)
    _warn_about(recipe, layout, tuple(dict.fromkeys(c for chosen in per_entry for c in chosen)))
    entries: list[PlanEntry] = []
    selection: dict[int, list[int]] = {}
    directions: dict[int, torch.Tensor] = {}
    for index, item in enumerate(recipe.ablate):
        r = directions[index] = entry_direction(recipe, item, measurements, layout.num_layers)
        subset = None
        if item.layer in layout.moe_layers:
            subset = entry_experts(recipe, item, r, measurements)
            if subset is not None:
                selection.setdefault(item.layer, [])
                selection[item.layer] = sorted(set(selection[item.layer]) | subset)
        for target, slices in _selected_targets(recipe, layout, per_entry, index, subset):
            scale = item.scale * recipe.scale
            if target.component == "router":
                scale *= recipe.gate_scale
            entries.append(
                PlanEntry.for_target(
                    target,
                    layer=item.layer if target.component != "embed" else None,
                    direction_id=f"entry{index}",
                    direction=r,
                    scale=scale,
                    norm_preserve=recipe.norm_preserve,
                    preserve=recipe.preserve,
                    with_bias=recipe.biases,
                    bias_shard=(weight_map or {}).get(target.bias) if target.bias else None,
                    experts=slices,
                )
            )
    if subset_kind(recipe.expert_subset) in ("auto", "coverage"):
        logger.info(
            "expert_subset %s selected, per layer: %s",
            recipe.expert_subset,
            "; ".join(f"{layer}: {experts or 'none'}" for layer, experts in selection.items()),
        )
    entries += _suppression_entries(recipe, layout, measurements, directions)
    untouched = _correction_biases(entries, layout, weight_map)
    if untouched:
        logger.info(
            "Leaving %d router %s tensor(s) untouched: they are per-expert offsets added to "
            "the selection scores, not readers of the residual stream.",
            len(untouched),
            CORRECTION_BIAS,
        )
    if not entries:
        raise AbliterateError(
            f"{recipe.source}: the recipe selects no tensors (components "
            f"{', '.join(components)} do not occur in the listed layers)."
        )
    return Plan(
        entries=entries,
        model_dir=str(layout.model_dir or recipe.model or ""),
        recipe=recipe.to_dict(),
        measurements=str(measurements_path or recipe.measurements or "") or None,
        measurements_sha256=file_sha256(measurements_path) if measurements_path else None,
        info={
            "layer_prefix": layout.layer_prefix,
            "is_moe": layout.is_moe,
            "num_layers": layout.num_layers,
            "hidden_size": layout.hidden_size,
            "num_experts": layout.num_experts,
            "model_type": layout.model_type,
            "components": list(components),
            **({"expert_selection": selection} if selection else {}),
            **({"untouched_correction_biases": untouched} if untouched else {}),
        },
    )


# families whose router adds `e_score_correction_bias` to its selection scores (used when
# no weight map is at hand to look the tensors up)
_CORRECTION_BIAS_FAMILIES = ("glm4_moe", "deepseek_v3")


def _correction_biases(entries, layout: Layout, weight_map: dict | None) -> list[str]:
    """The correction-bias keys beside the routers the plan edits (left untouched).

    Why they stay: the bias is added to the sigmoid scores only to choose experts (DeepSeek's
    load balancing); it is not a reader of the residual, so it has no component along the
    direction, and changing it would move routing on every input alike.
    """
    keys = []
    for entry in entries:
        if entry.component not in ("router", "router_suppress"):
            continue
        key = entry.key.removesuffix("weight") + CORRECTION_BIAS
        known = key in weight_map if weight_map is not None else None
        if known or (known is None and layout.model_type in _CORRECTION_BIAS_FAMILIES):
            keys.append(key)
    return list(dict.fromkeys(keys))


def _top_routed_experts(recipe: Recipe, measurements, layer: int, count: int) -> tuple[int, ...]:
    """The `count` experts of `layer` whose share of routed tokens rises most on target
    prompts over benign ones (router statistics of the measurements); only experts with a
    positive rise, so a layer whose routing does not depend on the class gets none."""
    target = getattr(measurements, "target_expert_counts", None)
    benign = getattr(measurements, "benign_expert_counts", None)
    if target is None or benign is None:
        raise AbliterateError(
            f"{recipe.source}: recipe key 'router_suppress.experts' is 'top:{count}', but the "
            "measurements hold no router statistics; name the experts instead."
        )

    def rates(counts, tokens):
        return counts[layer].to(torch.float64) / max(int(tokens[layer]), 1)

    rise = rates(target, measurements.target_router_tokens) - rates(
        benign, measurements.benign_router_tokens
    )
    order = [int(e) for e in torch.argsort(rise, descending=True, stable=True)]
    return tuple(sorted(e for e in order[:count] if rise[e] > 0))


def _suppression_entries(
    recipe: Recipe, layout: Layout, measurements, directions: dict[int, torch.Tensor]
) -> list[PlanEntry]:
    """`router_suppress`'s plan entries: per layer, its router restricted to the chosen rows.

    A layer's direction is that of the first ablate entry at that layer (the search's
    per-component entries at one layer share it). A flat list or `top:K` applies to every
    layer the recipe edits that has a router (dense first layers are skipped); a per-layer
    mapping must name layers the recipe edits and that route tokens. The scale is
    `strength x scale` (neither the entry's scale nor `gate_scale`: suppression has its own
    strength).
    """
    spec = recipe.router_suppress
    if spec is None:
        return []
    first_entry: dict[int, int] = {}
    for index, item in enumerate(recipe.ablate):
        first_entry.setdefault(item.layer, index)

    def router_of(layer: int) -> Target | None:
        return next((t for t in layout.layer(layer).targets if t.component == "router"), None)

    if spec.per_layer is not None:
        wanted = []
        for layer, experts in spec.per_layer:
            where = f"{recipe.source}: recipe key 'router_suppress.experts' names layer {layer}"
            if layer >= layout.num_layers:
                raise AbliterateError(
                    f"{where}, but the model has {layout.num_layers} decoder layers "
                    f"(0-{layout.num_layers - 1})."
                )
            if router_of(layer) is None:
                raise AbliterateError(
                    f"{where}, which has no router (a dense layer); expected a layer with "
                    "routed experts."
                )
            if layer not in first_entry:
                raise AbliterateError(
                    f"{where}, which no ablate entry edits (the direction comes from that "
                    "layer's entry); add an entry for it or leave the layer out."
                )
            wanted.append((layer, experts))
    else:
        wanted = [(layer, spec.experts) for layer in first_entry if router_of(layer)]
    entries = []
    for layer, experts in wanted:
        router = router_of(layer)
        if spec.top is not None:
            experts = _top_routed_experts(recipe, measurements, layer, spec.top)
            if not experts:
                logger.info("router_suppress: no expert of layer %d rises on target prompts", layer)
                continue
        count = router.shape[0]
        for expert in experts:
            if expert >= count:
                raise AbliterateError(
                    f"Expert {expert} not found (layer {layer} has {count} experts, "
                    f"indices 0-{count - 1})."
                )
        index = first_entry[layer]
        entry = PlanEntry.for_target(
            router,
            layer=layer,
            direction_id=f"entry{index}",
            direction=directions[index],
            scale=spec.strength * recipe.scale,
            norm_preserve=recipe.norm_preserve,
        )
        entries.append(replace(entry, component="router_suppress", rows=tuple(experts)))
    return entries


def file_sha256(path: str | Path, chunk: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def build_plan(
    recipe: Recipe | dict | str | Path,
    *,
    model: str | Path | None = None,
    measurements: str | Path | None = None,
    layout=None,
    overrides: dict | None = None,
) -> Plan:
    """Load everything a recipe names (model layout, measurements) and resolve it.

    `model`/`measurements` override the recipe's own paths (the workflow passes its own);
    `layout` may be a `Layout`, a layout.json path, or None to inspect the model's headers.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    model = model or recipe.model
    measurements = measurements or recipe.measurements
    if not model:
        raise AbliterateError(
            f"{recipe.source}: recipe key 'model' is required (a model directory)."
        )
    if not measurements:
        raise AbliterateError(
            f"{recipe.source}: recipe key 'measurements' is required (a measurements file)."
        )
    if layout is None:
        layout = inspect_checkpoint(model)
    elif isinstance(layout, (str, Path)):
        layout = Layout.load(layout)
    meas = load_measurements(measurements)
    plan = resolve(
        recipe,
        layout,
        meas,
        weight_map=read_weight_map(model),
        measurements_path=measurements,
    )
    plan.model_dir = str(Path(model).resolve())
    return plan


def write_recipe(recipe: dict, path: str | Path) -> Path:
    """Validate a recipe dict (the workflow config's `recipe:`) and write it as YAML."""
    validated = load_recipe(recipe)
    data = {k: v for k, v in validated.to_dict().items() if v is not None}
    return write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))
