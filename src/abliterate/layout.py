"""The architecture registry and checkpoint inspection: which tensors a recipe can edit.

Why a registry: the axis of a tensor that indexes the residual stream cannot be read from
its shape (gpt-oss stores `down_proj` as [E, intermediate, hidden] and hidden may equal
intermediate), so every tensor pattern carries its `hidden_axis` from the architecture it
belongs to. Why headers only: inspecting a 200 GB checkpoint must not read 200 GB, so
`inspect_checkpoint` reads `config.json` and the safetensors headers and nothing else
(GLM-4.5-Air's 47 headers and 17k targets: a fraction of a second).

Unknown `model_type`s fall back to the registered family whose key patterns explain the
most tensors, so a renamed fine-tune of a known architecture still works.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

from . import quant
from .components import COMPONENTS, EXPERT_COMPONENTS
from .components import side as component_side
from .errors import AbliterateError
from .files import write_text_atomic
from .logs import logger
from .shards import TensorInfo, read_checkpoint

# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class TensorPattern:
    """One editable tensor of a decoder layer, named relative to `{prefix}.layers.{N}.`.

    `{E}` in `suffix` stands for the expert index of per-expert tensors. `bias` names the
    writer's bias (same convention); by default a `.weight` writer's bias is `.bias`.
    """

    component: str
    suffix: str
    hidden_axis: int
    fused: bool = False
    bias: str | None = None

    @property
    def side(self) -> str:
        return component_side(self.component)

    @property
    def bias_suffix(self) -> str | None:
        if self.side != "write":
            return None
        if self.bias is not None:
            return self.bias
        if self.suffix.endswith(".weight"):
            return self.suffix[: -len(".weight")] + ".bias"
        return None

    def regex(self) -> re.Pattern:
        return re.compile("^" + re.escape(self.suffix).replace(r"\{E\}", r"(\d+)") + "$")


@dataclass(frozen=True)
class Family:
    """A set of tensor patterns shared by architectures with the same on-disk names."""

    name: str
    patterns: tuple[TensorPattern, ...]


ATTN_OUT = TensorPattern("attn_out", "self_attn.o_proj.weight", hidden_axis=0)
MLP_DOWN = TensorPattern("mlp_down", "mlp.down_proj.weight", hidden_axis=0)


def _per_expert(root: str, down: str, gate: str, up: str) -> tuple[TensorPattern, ...]:
    """Per-expert nn.Linear tensors: down [hidden, inter] writes, gate/up [inter, hidden] read."""
    return (
        TensorPattern("expert_down", f"{root}.{{E}}.{down}.weight", hidden_axis=0),
        TensorPattern("expert_gate", f"{root}.{{E}}.{gate}.weight", hidden_axis=1),
        TensorPattern("expert_up", f"{root}.{{E}}.{up}.weight", hidden_axis=1),
    )


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        # Dense decoders: Llama, Mistral, Qwen2/3, Gemma 2/3, GLM-4 (its fused dense
        # gate_up_proj reads the residual but is not a recipe component).
        Family("llama", (ATTN_OUT, MLP_DOWN)),
        # GLM-4.5 / DeepSeek-V3: dense first layers, then routed + shared experts.
        Family(
            "glm4_moe",
            (
                ATTN_OUT,
                MLP_DOWN,
                TensorPattern("shared_down", "mlp.shared_experts.down_proj.weight", 0),
                TensorPattern("router", "mlp.gate.weight", hidden_axis=1),
                *_per_expert("mlp.experts", "down_proj", "gate_proj", "up_proj"),
            ),
        ),
        # Qwen2-MoE: one (gated) shared expert, singular name.
        Family(
            "qwen2_moe",
            (
                ATTN_OUT,
                MLP_DOWN,
                TensorPattern("shared_down", "mlp.shared_expert.down_proj.weight", 0),
                TensorPattern("router", "mlp.gate.weight", hidden_axis=1),
                *_per_expert("mlp.experts", "down_proj", "gate_proj", "up_proj"),
            ),
        ),
        # Qwen3-MoE, OLMoE: routed experts only.
        Family(
            "qwen3_moe",
            (
                ATTN_OUT,
                MLP_DOWN,
                TensorPattern("router", "mlp.gate.weight", hidden_axis=1),
                *_per_expert("mlp.experts", "down_proj", "gate_proj", "up_proj"),
            ),
        ),
        # Mixtral: w1 = gate, w2 = down, w3 = up.
        Family(
            "mixtral",
            (
                ATTN_OUT,
                TensorPattern("router", "block_sparse_moe.gate.weight", hidden_axis=1),
                *_per_expert("block_sparse_moe.experts", "w2", "w1", "w3"),
            ),
        ),
        # gpt-oss: fused experts. down_proj [E, inter, hidden] (+ bias [E, hidden]) writes
        # along axis 2; gate_up_proj [E, hidden, 2*inter] reads along axis 1.
        Family(
            "gpt_oss",
            (
                ATTN_OUT,
                TensorPattern("router", "mlp.router.weight", hidden_axis=1),
                TensorPattern(
                    "expert_down",
                    "mlp.experts.down_proj",
                    hidden_axis=2,
                    fused=True,
                    bias="mlp.experts.down_proj_bias",
                ),
                TensorPattern("expert_gate_up", "mlp.experts.gate_up_proj", 1, fused=True),
            ),
        ),
    )
}

# config.json `model_type` -> family
ARCHITECTURES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma": "llama",
    "gemma2": "llama",
    "gemma3": "llama",
    "gemma3_text": "llama",
    "glm": "llama",
    "glm4": "llama",
    "phi3": "llama",
    "glm4_moe": "glm4_moe",
    "deepseek_v3": "glm4_moe",
    "deepseek_v2": "glm4_moe",
    "qwen2_moe": "qwen2_moe",
    "qwen3_moe": "qwen3_moe",
    "olmoe": "qwen3_moe",
    "mixtral": "mixtral",
    "gpt_oss": "gpt_oss",
}

# Alternative config.json names of the same quantity, first match wins.
CONFIG_KEYS = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "vocab_size": ("vocab_size", "padded_vocab_size"),
    "num_experts": ("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts"),
    "num_shared_experts": ("n_shared_experts", "num_shared_experts"),
    "experts_per_token": (
        "num_experts_per_tok",
        "experts_per_token",
        "moe_top_k",
        "moe_k",
        "top_k",
    ),
}


def config_int(config, quantity: str) -> int | None:
    """The first positive integer among `quantity`'s alternative names in a model config.

    Accepts a config.json dict or a transformers config object; a nested `text_config`
    (multimodal wrappers) is looked into first.
    """
    if not isinstance(config, dict):
        config = config.to_dict()
    config = config.get("text_config") or config
    for name in CONFIG_KEYS[quantity]:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight")
# Stored names of quantized expert tensors: an MXFP4 pair is a target under its logical
# name, so any of these left in a layer were not recognized as a pair.
QUANTIZED_EXPERT_MARKERS = ("_blocks", "_scales")
EDITABLE_DTYPES = ("F32", "F16", "BF16", "F64")

# every layer-relative name some family targets (prefix detection ranks by these)
_KNOWN_NAMES = {
    p.suffix for family in FAMILIES.values() for p in family.patterns if "{E}" not in p.suffix
}
_KNOWN_EXPERT_NAMES = re.compile(
    "|".join(
        sorted(
            {
                p.regex().pattern
                for family in FAMILIES.values()
                for p in family.patterns
                if "{E}" in p.suffix
            }
        )
    )
)

LAYER_KEY = re.compile(r"^(?P<prefix>.+?)\.layers\.(?P<index>\d+)\.(?P<rest>.+)$")

# --------------------------------------------------------------------------- layout data


@dataclass(frozen=True)
class Target:
    """One tensor a recipe can edit (see docs/architecture.md, `layout.json`)."""

    key: str
    component: str
    side: str
    hidden_axis: int
    expert: int | None
    fused: bool
    shape: tuple[int, ...]
    dtype: str
    shard: str
    bias: str | None = None
    # how a quantized target is stored (`quant.QuantizedTensor.to_dict()`); None: plain floats
    quant: dict | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["shape"] = list(self.shape)
        if data["quant"] is None:
            del data["quant"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Target:
        return cls(**{**data, "shape": tuple(data["shape"])})


@dataclass(frozen=True)
class LayerTargets:
    index: int
    targets: tuple[Target, ...]

    @property
    def is_moe(self) -> bool:
        return any(t.component in EXPERT_COMPONENTS + ("router",) for t in self.targets)


@dataclass(frozen=True)
class Layout:
    """What `inspect_checkpoint` found; the JSON form is `layout.json`."""

    model_dir: str
    model_type: str | None
    architecture: str | None
    family: str
    layer_prefix: str
    num_layers: int
    hidden_size: int
    vocab_size: int | None
    is_moe: bool
    num_experts: int
    num_shared_experts: int
    experts_per_token: int
    moe_layers: tuple[int, ...]
    dense_layers: tuple[int, ...]
    tie_word_embeddings: bool
    shards: tuple[str, ...]
    globals: tuple[Target, ...] = ()
    layers: tuple[LayerTargets, ...] = field(default_factory=tuple)

    # ---- accessors

    def targets(
        self,
        layer: int | Iterable[int] | None = None,
        component: str | Iterable[str] | None = None,
        expert: int | Iterable[int] | None = None,
        side: str | None = None,
    ) -> list[Target]:
        """Targets filtered by layer(s), component(s), expert(s) and side.

        `layer=None` includes the global targets (the embedding); an `expert` filter keeps
        only per-expert tensors of those experts (fused expert tensors have no index).
        """
        layers = _as_set(layer)
        components = _as_set(component)
        experts = _as_set(expert)
        if components is not None and not components <= set(COMPONENTS):
            unknown = sorted(components - set(COMPONENTS))
            raise AbliterateError(
                f"unknown component(s) {', '.join(unknown)}; expected one of {', '.join(COMPONENTS)}."
            )
        pool: list[Target] = list(self.globals) if layers is None else []
        for entry in self.layers:
            if layers is None or entry.index in layers:
                pool.extend(entry.targets)
        return [
            t
            for t in pool
            if (components is None or t.component in components)
            and (experts is None or t.expert in experts)
            and (side is None or t.side == side)
        ]

    def layer(self, index: int) -> LayerTargets:
        if not 0 <= index < len(self.layers):
            raise AbliterateError(
                f"layer {index} is out of range; the model has layers 0..{self.num_layers - 1}."
            )
        return self.layers[index]

    @cached_property
    def _by_key(self) -> dict[str, Target]:
        return {t.key: t for t in self.targets()}

    def target(self, key: str) -> Target:
        """The target named `key` (a dict look-up: GLM-4.5-Air has ~17k targets)."""
        if key in self._by_key:
            return self._by_key[key]
        raise AbliterateError(f"tensor {key!r} is not an editable target of {self.model_dir}.")

    def component_counts(self, layer: int) -> dict[str, int]:
        return dict(Counter(t.component for t in self.layer(layer).targets))

    # ---- JSON

    def to_dict(self) -> dict:
        data = {
            name: getattr(self, name)
            for name in self.__dataclass_fields__
            if name not in ("globals", "layers")
        }
        for name in ("moe_layers", "dense_layers", "shards"):
            data[name] = list(data[name])
        data["globals"] = [t.to_dict() for t in self.globals]
        data["layers"] = [
            {"index": e.index, "targets": [t.to_dict() for t in e.targets]} for e in self.layers
        ]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Layout:
        fields = dict(data)
        for name in ("moe_layers", "dense_layers", "shards"):
            fields[name] = tuple(fields[name])
        fields["globals"] = tuple(Target.from_dict(t) for t in data["globals"])
        fields["layers"] = tuple(
            LayerTargets(e["index"], tuple(Target.from_dict(t) for t in e["targets"]))
            for e in data["layers"]
        )
        return cls(**fields)

    def to_json(self) -> str:
        """Readable JSON: one line per field and per target (GLM-4.5-Air has ~18k targets)."""

        def targets(items: list[dict], indent: str) -> str:
            lines = [f"{indent}  {json.dumps(t)}" for t in items]
            return "[\n" + ",\n".join(lines) + f"\n{indent}]" if lines else "[]"

        data = self.to_dict()
        lines = [
            f"  {json.dumps(k)}: {json.dumps(v)}"
            for k, v in data.items()
            if k not in ("globals", "layers")
        ]
        lines.append(f'  "globals": {targets(data["globals"], "  ")}')
        layers = [
            f'    {{"index": {e["index"]}, "targets": {targets(e["targets"], "    ")}}}'
            for e in data["layers"]
        ]
        lines.append('  "layers": [\n' + ",\n".join(layers) + "\n  ]")
        return "{\n" + ",\n".join(lines) + "\n}\n"

    def save(self, path: str | Path) -> Path:
        """Write layout.json atomically (temp file + rename): a partial file never exists."""
        return write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Layout:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            return cls.from_dict(data)
        except FileNotFoundError:
            raise AbliterateError(f"{path}: layout file not found.") from None
        except (ValueError, KeyError, TypeError) as error:
            raise AbliterateError(
                f"{path}: malformed layout (expected the JSON written by `abliterate inspect "
                f"--json`: {error})."
            ) from None


def _as_set(value) -> set | None:
    if value is None:
        return None
    if isinstance(value, (str, int)):
        return {value}
    return set(value)


# --------------------------------------------------------------------------- inspection


def read_config(model_dir: str | Path) -> dict:
    """config.json as a dict; nested `text_config` values win (multimodal wrappers)."""
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise AbliterateError(f"{model_dir}: model directory not found.")
    if not path.is_file():
        raise AbliterateError(f"{path}: not found; expected the model's Hugging Face config.json.")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise AbliterateError(f"{path}: malformed JSON ({error}).") from None
    if not isinstance(config, dict):
        raise AbliterateError(f"{path}: expected a JSON object, got {type(config).__name__}.")
    text_config = config.get("text_config")
    if isinstance(text_config, dict):
        return {**config, **text_config, "model_type": config.get("model_type")}
    return config


def _config_name(config: dict, quantity: str) -> str:
    """The config.json key that holds `quantity` (its first alternative when none does)."""
    names = CONFIG_KEYS[quantity]
    return next((name for name in names if config.get(name) is not None), names[0])


def _config_int(config: dict, quantity: str, config_path: Path) -> int | None:
    name = _config_name(config, quantity)
    value = config.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise AbliterateError(
            f"{config_path}: {name} is {value!r}; expected a non-negative integer."
        )
    return value


def detect_layer_prefix(keys: Iterable[str], model_dir: str | Path) -> str:
    """The prefix before `.layers.{N}.` of the language model's decoder layers.

    Multimodal checkpoints also have vision-encoder layers (`...encoder.layers.N.`), and
    there may be about as many of them, so prefixes are ranked by how many of their layer
    tensors any registered family knows, then by tensor count.
    """
    keys = list(keys)
    counts: Counter = Counter()
    known: Counter = Counter()
    for match in map(LAYER_KEY.match, keys):
        if match:
            counts[match["prefix"]] += 1
            known[match["prefix"]] += match["rest"] in _KNOWN_NAMES or bool(
                _KNOWN_EXPERT_NAMES.match(match["rest"])
            )
    if not counts:
        roots = sorted({key.split(".")[0] for key in keys})
        examples = ", ".join(sorted(keys)[:5])
        raise AbliterateError(
            f"{model_dir}: Could not detect layer structure (no '<prefix>.layers.<N>.' tensor "
            f"names; found {len(keys)} tensors under {', '.join(roots[:8]) or 'nothing'}, "
            f"e.g. {examples})."
        )
    return max(counts, key=lambda prefix: (known[prefix], counts[prefix]))


def _layer_tensors(tensors: dict[str, TensorInfo], prefix: str) -> dict[int, dict[str, TensorInfo]]:
    """Tensors of each on-disk layer index, keyed by their name relative to the layer."""
    by_layer: dict[int, dict[str, TensorInfo]] = {}
    for key, info in tensors.items():
        match = LAYER_KEY.match(key)
        if match and match["prefix"] == prefix:
            by_layer.setdefault(int(match["index"]), {})[match["rest"]] = info
    return by_layer


def _match_family(family: Family, layer: dict[str, TensorInfo]) -> list[tuple]:
    """(pattern, relative name, expert index) for every tensor of `layer` the family names."""
    found = []
    regexes = [(p, p.regex()) for p in family.patterns]
    for rest in layer:
        for pattern, regex in regexes:
            match = regex.match(rest)
            if match:
                expert = int(match.group(1)) if match.groups() else None
                found.append((pattern, rest, expert))
                break
    return found


def choose_family(
    model_type: str | None, by_layer: dict[int, dict[str, TensorInfo]], model_dir
) -> Family:
    """The registry's family for `model_type`, else the one that explains the most tensors."""
    if model_type in ARCHITECTURES:
        return FAMILIES[ARCHITECTURES[model_type]]

    # the first and last decoder layers tell dense-first MoE models apart cheaply
    sample = [by_layer[i] for i in sorted({min(by_layer), max(by_layer)})] if by_layer else []

    def score(family: Family) -> tuple[int, int]:
        matched = sum(len(_match_family(family, layer)) for layer in sample)
        return matched, -len(family.patterns)

    best = max(FAMILIES.values(), key=score)
    if score(best)[0] == 0:
        names = sorted({rest for layer in by_layer.values() for rest in layer})
        raise AbliterateError(
            f"{model_dir}: Could not detect layer structure (model_type {model_type!r} is not "
            f"registered and its layers have none of the known target tensors; found "
            f"{', '.join(names[:8])})."
        )
    logger.warning(
        "model_type %r is not in the architecture registry; using the %r layout, which "
        "matches its tensor names",
        model_type,
        best.name,
    )
    return best


def _target(key: str, info: TensorInfo, pattern: TensorPattern, expert, bias) -> Target:
    return Target(
        key=key,
        component=pattern.component,
        side=pattern.side,
        hidden_axis=pattern.hidden_axis,
        expert=expert,
        fused=pattern.fused,
        shape=tuple(info.shape),
        dtype=info.dtype,
        shard=info.shard,
        bias=bias,
    )


def _check_target(target: Target, hidden_size: int, model_dir) -> None:
    ndim = 3 if target.fused else 2
    if len(target.shape) != ndim:
        raise AbliterateError(
            f"{model_dir}: tensor {target.key!r} has shape {list(target.shape)}; expected "
            f"{ndim} dimensions for a {target.component} tensor."
        )
    if target.shape[target.hidden_axis] != hidden_size:
        raise AbliterateError(
            f"{model_dir}: tensor {target.key!r} has shape {list(target.shape)}, whose hidden "
            f"axis {target.hidden_axis} should have hidden_size {hidden_size} from config.json."
        )


def _layer_targets(
    family: Family, prefix: str, index: int, layer: dict[str, TensorInfo], hidden_size, model_dir
) -> LayerTargets:
    targets = []
    for pattern, rest, expert in _match_family(family, layer):
        key = f"{prefix}.layers.{index}.{rest}"
        bias = None
        if pattern.bias_suffix is not None:
            bias_rest = pattern.bias_suffix.replace("{E}", str(expert))
            bias = f"{prefix}.layers.{index}.{bias_rest}" if bias_rest in layer else None
        target = _target(key, layer[rest], pattern, expert, bias)
        _check_target(target, hidden_size, model_dir)
        targets.append(target)
    order = {c: i for i, c in enumerate(COMPONENTS)}
    targets.sort(key=lambda t: (order[t.component], -1 if t.expert is None else t.expert))
    return LayerTargets(index, tuple(targets))


def _expert_count(entry: LayerTargets, model_dir) -> int:
    """Routed experts of one layer: distinct per-expert indices, else a fused tensor's E."""
    indices = {t.expert for t in entry.targets if t.expert is not None}
    if indices:
        if indices != set(range(len(indices))):
            missing = sorted(set(range(max(indices) + 1)) - indices)
            raise AbliterateError(
                f"{model_dir}: layer {entry.index} has experts {min(indices)}..{max(indices)} "
                f"but lacks expert(s) "
                f"{missing[:10]}; expected contiguous 0-based expert indices."
            )
        return len(indices)
    fused = [t for t in entry.targets if t.fused]
    if fused:
        return fused[0].shape[0]
    routers = [t for t in entry.targets if t.component == "router"]
    return routers[0].shape[0] if routers else 0


def _expected_moe_layers(config: dict, num_layers: int) -> set[int] | None:
    """MoE layers according to config.json, where it says (DeepSeek/GLM, Qwen-MoE)."""
    if config.get("first_k_dense_replace") is not None:
        k = int(config["first_k_dense_replace"])
        freq = int(config.get("moe_layer_freq") or 1)
        return {i for i in range(num_layers) if i >= k and i % freq == 0}
    if "mlp_only_layers" in config or "decoder_sparse_step" in config:
        only = set(config.get("mlp_only_layers") or [])
        step = int(config.get("decoder_sparse_step") or 1)
        return {i for i in range(num_layers) if i not in only and (i + 1) % step == 0}
    return None


def _count_layers(config: dict, by_layer: dict, prefix: str, model_dir: Path) -> int:
    """Decoder layers: config.json's count (all of them present), else 0, 1, 2, ... on disk.

    Layers at or beyond the count (multi-token-prediction layers) are left out.
    """
    config_path = model_dir / "config.json"
    num_layers = _config_int(config, "num_layers", config_path)
    on_disk = sorted(by_layer)
    if num_layers is None:  # no layer count in config.json: count 0, 1, 2, ... on disk
        num_layers = next(i for i in range(len(on_disk) + 1) if i not in by_layer)
        if num_layers == 0:
            raise AbliterateError(
                f"{model_dir}: layers under '{prefix}.layers' start at {on_disk[0]} and "
                "config.json has no num_hidden_layers; expected 0-based decoder layers."
            )
    missing = [i for i in range(num_layers) if i not in by_layer]
    if missing:
        raise AbliterateError(
            f"{config_path}: {_config_name(config, 'num_layers')} is {num_layers}, but the "
            "checkpoint has no "
            f"tensors for layer(s) {missing[:10]} under '{prefix}.layers'."
        )
    extra = [i for i in on_disk if i >= num_layers]
    if extra:
        logger.info(
            "Ignoring layer(s) %s beyond num_hidden_layers=%d (e.g. multi-token-prediction layers)",
            extra,
            num_layers,
        )
    return num_layers


def _decoder_targets(family, prefix, by_layer, num_layers, hidden_size, model_dir):
    """Every decoder layer's targets; at least one layer must have some."""
    layers = tuple(
        _layer_targets(family, prefix, i, by_layer[i], hidden_size, model_dir)
        for i in range(num_layers)
    )
    if not any(entry.targets for entry in layers):
        found = sorted({rest for layer in by_layer.values() for rest in layer})
        raise AbliterateError(
            f"{model_dir}: Could not detect layer structure (no {family.name} target tensors "
            f"in {num_layers} layer(s) under '{prefix}.layers'; found e.g. "
            f"{', '.join(found[:8])})."
        )
    return layers


def _moe_fields(layers, config: dict, config_path: Path) -> dict:
    """MoE/dense layer lists and expert counts, checked against config.json."""
    moe_layers = tuple(e.index for e in layers if e.is_moe)
    is_moe = bool(moe_layers)
    num_experts = _check_experts(layers, moe_layers, config, config_path)
    expected = _expected_moe_layers(config, len(layers)) if is_moe else None
    if expected is not None and expected != set(moe_layers):
        logger.warning(
            "config.json implies MoE layers %s but the checkpoint has experts in layers %s",
            _ranges(sorted(expected)),
            _ranges(moe_layers),
        )
    shared = _config_int(config, "num_shared_experts", config_path)
    has_shared = any(t.component == "shared_down" for e in layers for t in e.targets)
    if shared is None or not has_shared:
        shared = 1 if has_shared else 0
    per_token = _config_int(config, "experts_per_token", config_path) if is_moe else 0
    return {
        "is_moe": is_moe,
        "num_experts": num_experts,
        "num_shared_experts": shared if is_moe else 0,
        "experts_per_token": per_token or 0,
        "moe_layers": moe_layers,
        "dense_layers": tuple(e.index for e in layers if not e.is_moe),
    }


def inspect_checkpoint(model_dir: str | Path) -> Layout:
    """Find every editable tensor of a safetensors checkpoint from config.json + headers.

    Steps: read config and headers (a pre-quantized checkpoint is refused, FP8/MXFP4
    storage validated), detect the layer prefix, count the decoder layers, choose the
    architecture family, match every layer's targets (marking quantized ones), then
    describe the MoE structure and the global (embedding) target.
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    config_path = model_dir / "config.json"
    tensors = read_checkpoint(model_dir)
    quantization = quant.checkpoint_quantization(config, tensors)
    quant.require_editable(quantization, model_dir)
    quantized = quant.quantized_tensors(tensors, quantization)
    # MXFP4 pairs under their parameter names (`mlp.experts.down_proj`), so the patterns match
    tensors = quant.logical_tensors(tensors, quantized)

    prefix = detect_layer_prefix(tensors, model_dir)
    logger.info("Detected layer prefix: %s", prefix)
    by_layer = _layer_tensors(tensors, prefix)
    num_layers = _count_layers(config, by_layer, prefix, model_dir)
    hidden_size = _config_int(config, "hidden_size", config_path)
    if not hidden_size:
        raise AbliterateError(f"{config_path}: no hidden_size; expected a positive integer.")

    model_type = config.get("model_type")
    family = choose_family(model_type, {i: by_layer[i] for i in range(num_layers)}, model_dir)
    layers = _decoder_targets(family, prefix, by_layer, num_layers, hidden_size, model_dir)
    layers = tuple(_mark_quantized(entry, quantized) for entry in layers)
    _warn_quantized(by_layer, layers, model_dir)
    globals_ = _global_targets(tensors, prefix, hidden_size, model_dir)
    moe = _moe_fields(layers, config, config_path)

    tie = config.get("tie_word_embeddings")
    if tie is None:
        tie = "lm_head.weight" not in tensors
    architectures = config.get("architectures") or [None]

    layout = Layout(
        model_dir=str(model_dir.resolve()),
        model_type=model_type,
        architecture=architectures[0],
        family=family.name,
        layer_prefix=prefix,
        num_layers=num_layers,
        hidden_size=hidden_size,
        vocab_size=_config_int(config, "vocab_size", config_path)
        or (globals_[0].shape[0] if globals_ else None),
        tie_word_embeddings=bool(tie),
        shards=tuple(sorted({info.shard for info in tensors.values()})),
        globals=globals_,
        layers=layers,
        **moe,
    )
    logger.info("MoE architecture: %s", layout.is_moe)
    if layout.is_moe:
        logger.info("Detected %d experts per layer", layout.num_experts)
    logger.info("%s", summary_line(layout))
    return layout


def _check_experts(layers, moe_layers, config: dict, config_path: Path) -> int:
    """Routed experts per MoE layer, counted from the keys and checked against config.json."""
    if not moe_layers:
        return 0
    counts = {i: _expert_count(layers[i], config_path.parent) for i in moe_layers}
    distinct = sorted(set(counts.values()))
    if len(distinct) != 1:
        found = "; ".join(
            f"{n} in layers {_ranges(i for i in counts if counts[i] == n)}" for n in distinct
        )
        raise AbliterateError(
            f"{config_path.parent}: MoE layers have different expert counts ({found}); "
            "expected the same number in every MoE layer."
        )
    count = distinct[0]
    for i in moe_layers:
        for t in layers[i].targets:
            if t.component == "router" and t.shape[0] != count:
                raise AbliterateError(
                    f"{config_path.parent}: router {t.key!r} has shape {list(t.shape)} but the "
                    f"layer has {count} experts; expected {count} router rows."
                )
    configured = _config_int(config, "num_experts", config_path)
    if configured is not None and configured != count:
        name = _config_name(config, "num_experts")
        raise AbliterateError(
            f"{config_path}: {name} is {configured}, but the checkpoint has {count} experts "
            "per MoE layer; expected them to agree."
        )
    return count


def _global_targets(tensors, prefix: str, hidden_size: int, model_dir) -> tuple[Target, ...]:
    for suffix in EMBED_SUFFIXES:
        key = f"{prefix}.{suffix}"
        if key in tensors:
            pattern = TensorPattern("embed", suffix, hidden_axis=1)
            target = _target(key, tensors[key], pattern, None, None)
            _check_target(target, hidden_size, model_dir)
            return (target,)
    return ()


def _mark_quantized(entry: LayerTargets, quantized: dict) -> LayerTargets:
    """Targets stored quantized (FP8 + block scales, MXFP4 blocks + scales) carry their
    storage, for the exporter."""
    from dataclasses import replace

    targets = tuple(
        replace(t, quant=quantized[t.key].to_dict()) if t.key in quantized else t
        for t in entry.targets
    )
    return LayerTargets(entry.index, targets)


def _warn_quantized(by_layer: dict[int, dict[str, TensorInfo]], layers, model_dir) -> None:
    """Say so when quantized weights are present: the edit needs real-valued tensors."""
    blocks = sorted(
        {
            rest
            for i in range(len(layers))
            for rest in by_layer[i]
            if ".experts." in rest and rest.endswith(QUANTIZED_EXPERT_MARKERS)
        }
    )
    if blocks:
        logger.warning(
            "%s: expert tensors are stored quantized (%s); they are not editable and are left "
            "out of the layout (dequantize the checkpoint to edit experts)",
            model_dir,
            ", ".join(blocks[:4]),
        )
    quantized = Counter(
        t.dtype
        for e in layers
        for t in e.targets
        if t.dtype not in EDITABLE_DTYPES and t.quant is None
    )
    if quantized:
        logger.warning(
            "%s: %s target tensors are not stored as floats (%s); editing them needs a "
            "dequantized checkpoint",
            model_dir,
            sum(quantized.values()),
            ", ".join(sorted(quantized)),
        )


def _ranges(indices: Iterable[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    indices = sorted(indices)
    parts, start = [], None
    for i, n in enumerate(indices):
        if start is None:
            start = n
        if i + 1 == len(indices) or indices[i + 1] != n + 1:
            parts.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(parts) or "none"


def summary_line(layout: Layout) -> str:
    kind = (
        f"{len(layout.dense_layers)} dense + {len(layout.moe_layers)} MoE layers, "
        f"{layout.num_experts} routed experts (top-{layout.experts_per_token}), "
        f"{layout.num_shared_experts} shared"
        if layout.is_moe
        else "dense"
    )
    return (
        f"{layout.architecture or layout.model_type} ({layout.family} layout): "
        f"{layout.num_layers} layers, hidden {layout.hidden_size}, vocab {layout.vocab_size}, "
        f"{kind}; {len(layout.targets())} target tensors in {len(layout.shards)} shard(s)"
    )


def component_table(layout: Layout) -> str:
    """A per-component summary: count, layers, example key and shape."""
    rows = [("component", "side", "tensors", "layers", "hidden_axis", "shape", "example")]
    for component in COMPONENTS:
        found = layout.targets(component=component)
        if not found:
            continue
        layers = sorted(
            {e.index for e in layout.layers for t in e.targets if t.component == component}
        )
        shapes = sorted({tuple(t.shape) for t in found})
        rows.append(
            (
                component,
                found[0].side,
                str(len(found)),
                _ranges(layers) if layers else "global",
                ",".join(sorted({str(t.hidden_axis) for t in found})),
                " ".join("x".join(map(str, s)) for s in shapes[:2]),
                found[0].key,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
