"""Class means of the residual stream at every measurement index, and MoE router statistics.

Why hooks and one forward pass: a direction needs one vector per prompt and index (the
residual at the measured position), not the hidden states of every token, and no
generated tokens. Pre-hooks on each decoder layer keep exactly the measured position(s)
of the residual entering it (measurement index m), a hook on the last layer keeps its
output before the final norm (index L), and the language-model head never runs. A hook
on the final norm keeps the same position(s) after it (`*_final_norm_mean`, the residual
as the head reads it; recipes address it as index L + 1). Prompts
are batched by length (little padding), left-padded, with position ids taken from the
attention mask so padding changes nothing. Means are accumulated in float64.

Router statistics (MoE): every router module (`mlp.gate` / `mlp.router`) returns its
top-k expert indices; we count, per layer, how often each routed expert is selected over
*all non-padding prompt tokens* (not only the measured position, which would give one
token per prompt: too few to compare experts), separately for target and benign prompts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import AbliterateError
from .files import write_text_atomic
from .layout import config_int
from .logs import logger
from .prompts import EncodedPrompt, encode, prompt_sha256

POSITIONS = ("last", "post_instruction")
CLASSES = ("target", "benign")
METADATA_KEY = "abliterate"
EPS = 1e-12


# --------------------------------------------------------------------------- the result


@dataclass
class Measurements:
    """Per-index class means (float64 [M, d]), per-prompt projections and router counts.

    M = num_layers + 1 measurement indices; index m is the residual entering decoder layer
    m, index num_layers the last layer's output before the final norm. Projections are
    [M, N_class] (empty for legacy `.refuse` files); expert counts are [L, E] or None.
    `*_final_norm_mean` ([d] or None for older files) are the class means after the final
    norm; they are kept apart from the indexed means so every per-index consumer (analysis,
    `.refuse` export) is unchanged, and recipes address them as index num_layers + 1.
    """

    target_mean: torch.Tensor
    benign_mean: torch.Tensor
    target_proj: torch.Tensor
    benign_proj: torch.Tensor
    meta: dict = field(default_factory=dict)
    target_expert_counts: torch.Tensor | None = None
    benign_expert_counts: torch.Tensor | None = None
    target_router_tokens: torch.Tensor | None = None
    benign_router_tokens: torch.Tensor | None = None
    target_final_norm_mean: torch.Tensor | None = None
    benign_final_norm_mean: torch.Tensor | None = None
    # [M, d]: row m is the weight of the norm that reads index m (layer m's input norm,
    # the final norm for m = L); None for older files and norms without a weight
    norm_weights: torch.Tensor | None = None

    @property
    def num_indices(self) -> int:
        return self.target_mean.shape[0]

    @property
    def num_layers(self) -> int:
        return int(self.meta.get("num_layers", self.num_indices - 1))

    @property
    def hidden_size(self) -> int:
        return self.target_mean.shape[1]

    @property
    def has_router_stats(self) -> bool:
        return self.target_expert_counts is not None

    def check_index(self, m: int) -> int:
        if not 0 <= m < self.num_indices:
            raise AbliterateError(
                f"measurement index {m} is out of range; these measurements have indices "
                f"0..{self.num_indices - 1}."
            )
        return m

    def check_compatible(
        self, hidden_size: int, num_layers: int | None = None, what: str = "the model"
    ) -> None:
        """Raise one sentence when these measurements cannot belong to `what`."""
        source = self.meta.get("source_file", "the measurements")
        if hidden_size != self.hidden_size:
            raise AbliterateError(
                f"{source} has hidden size {self.hidden_size} but {what} has hidden size "
                f"{hidden_size}; measure that model instead."
            )
        if num_layers is not None and self.num_indices > num_layers + 1:
            raise AbliterateError(
                f"{source} has {self.num_indices} measurement indices but {what} has only "
                f"{num_layers} layers ({num_layers + 1} indices)."
            )


# --------------------------------------------------------------------------- accumulation


class RunningMean:
    """A float64 running mean of [M, d] rows, added one batch [B, M, d] at a time."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, batch: torch.Tensor) -> None:
        batch_sum = batch.detach().to("cpu", torch.float64).sum(dim=0)
        self.total = batch_sum if self.total is None else self.total + batch_sum
        self.count += batch.shape[0]

    def mean(self) -> torch.Tensor:
        if self.total is None or self.count == 0:
            raise ValueError("no rows were added")
        return self.total / self.count


def winsorize(acts: torch.Tensor, quantile: float) -> torch.Tensor:
    """Clamp each dimension of `acts` [N, ..., d] to its [q, 1-q] quantiles across prompts."""
    flat = acts.to(torch.float32).reshape(acts.shape[0], -1)
    # torch.quantile takes at most 2**24 elements at once: go through the columns in chunks
    step = max(1, (1 << 24) // max(1, flat.shape[0]))
    out = torch.empty_like(flat)
    for start in range(0, flat.shape[1], step):
        chunk = flat[:, start : start + step]
        bounds = torch.quantile(chunk, torch.tensor([quantile, 1.0 - quantile]), dim=0)
        out[:, start : start + step] = chunk.clamp(min=bounds[0], max=bounds[1])
    return out.reshape(acts.shape)


def unit_directions(target_mean: torch.Tensor, benign_mean: torch.Tensor) -> torch.Tensor:
    """Row-wise normalize(target - benign) in float64; all-zero where the means coincide."""
    diff = (target_mean - benign_mean).to(torch.float64)
    norms = diff.norm(dim=-1, keepdim=True)
    return torch.where(norms > EPS, diff / norms.clamp_min(EPS), torch.zeros_like(diff))


def position_weights(mask: torch.Tensor, tails: torch.Tensor | None) -> torch.Tensor:
    """[B, T] weights that average each row's measured tokens (works for either padding side).

    `tails` None: a one-hot at the last real token (where the first answer token is
    predicted). Otherwise the mean over each row's last `tails[b]` real tokens.
    """
    mask = mask.to(torch.int64)
    # rank of each real token counted from the end: 0 for the last real token
    from_end = mask.flip(-1).cumsum(-1).flip(-1) - 1
    wanted = torch.ones_like(mask) if tails is None else tails.to(mask.device).unsqueeze(-1)
    selected = (mask > 0) & (from_end >= 0) & (from_end < wanted)
    weights = selected.to(torch.float32)
    return weights / weights.sum(-1, keepdim=True).clamp_min(1.0)


# --------------------------------------------------------------------------- model access


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layer list of a causal LM (`model.layers` of its base model)."""
    candidates = [getattr(model, getattr(model, "base_model_prefix", "model"), None), model]
    for base in candidates:
        for path in ("layers", "language_model.layers", "model.layers"):
            node = base
            for part in path.split("."):
                node = getattr(node, part, None) if node is not None else None
            if isinstance(node, torch.nn.ModuleList) and len(node) > 0:
                return node
    raise AbliterateError(
        f"could not find the decoder layers of {type(model).__name__}; expected a "
        "`model.layers` module list."
    )


def base_model(model):
    """The transformer without its head, so no vocabulary-sized logits are computed."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    return base if isinstance(base, torch.nn.Module) else model


def _num_experts(config) -> int | None:
    return config_int(config, "num_experts")


def _experts_per_token(config) -> int | None:
    return config_int(config, "experts_per_token")


def routers(layers: torch.nn.ModuleList) -> dict[int, torch.nn.Module]:
    """Layer index -> router module, for the layers that route tokens to experts."""
    found = {}
    for index, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
        if mlp is None or not hasattr(mlp, "experts"):
            continue
        router = getattr(mlp, "gate", None) or getattr(mlp, "router", None)
        if isinstance(router, torch.nn.Module):
            found[index] = router
    return found


class _Capture:
    """Forward hooks that keep the measured position(s) of each measurement index.

    Set `weights` ([B, T] from `position_weights`) and `token_mask` before each forward;
    read `rows` ([B, M, d] in the model's dtype) and `expert_counts` after it.
    """

    def __init__(self, layers, router_modules, num_experts, top_k, final_norm=None):
        self.layers = layers
        self.final_norm = final_norm
        self.final_slot: torch.Tensor | None = None
        self.num_indices = len(layers) + 1
        self.router_modules = router_modules
        self.num_experts = num_experts
        self.top_k = top_k
        self.weights: torch.Tensor | None = None
        self.token_mask: torch.Tensor | None = None
        self.slots: list[torch.Tensor | None] = []
        self.expert_counts = torch.zeros(len(layers), num_experts or 0, dtype=torch.int64)
        self.router_tokens = torch.zeros(len(layers), dtype=torch.int64)
        self.handles = []

    def __enter__(self):
        for m, layer in enumerate(self.layers):
            self.handles.append(
                layer.register_forward_pre_hook(self._pre_hook(m), with_kwargs=True)
            )
        last = len(self.layers) - 1
        self.handles.append(self.layers[last].register_forward_hook(self._post_hook(last + 1)))
        if self.final_norm is not None:
            self.handles.append(self.final_norm.register_forward_hook(self._final_hook))
        for index, router in self.router_modules.items():
            self.handles.append(router.register_forward_hook(self._router_hook(index)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def start_batch(
        self, weights: torch.Tensor, token_mask: torch.Tensor, single_position: bool = False
    ) -> None:
        self.weights, self.token_mask = weights, token_mask
        self.single_position = single_position
        self.slots = [None] * self.num_indices
        self.final_slot = None

    def rows(self) -> torch.Tensor:
        missing = [m for m, slot in enumerate(self.slots) if slot is None]
        if missing:
            raise AbliterateError(
                f"measurement indices {missing} were not reached by the forward pass."
            )
        return torch.stack(self.slots, dim=1)

    def _keep(self, m: int | None, hidden: torch.Tensor) -> None:
        weights = self.weights.to(hidden.device)
        if self.single_position:  # one token per row: a gather, not a weighted sum
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            kept = hidden[rows, weights.argmax(-1)].to(torch.float32)
        else:
            kept = torch.einsum("bt,btd->bd", weights, hidden.to(torch.float32))
        if m is None:
            self.final_slot = kept.to("cpu")
        else:
            self.slots[m] = kept.to("cpu")

    def _final_hook(self, module, args, output):
        self._keep(None, output[0] if isinstance(output, (tuple, list)) else output)

    def _pre_hook(self, m):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self._keep(m, hidden)

        return hook

    def _post_hook(self, m):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            self._keep(m, hidden)

        return hook

    def _router_hook(self, index):
        def hook(module, args, output):
            indices = _topk_indices(output, self.top_k)
            if indices is None or self.num_experts is None:
                return
            mask = self.token_mask.to(indices.device).reshape(-1)
            if indices.shape[0] != mask.shape[0]:
                return  # a router that sees something other than one row per token
            chosen = indices[mask.bool()].reshape(-1).to("cpu", torch.int64)
            self.expert_counts[index] += torch.bincount(chosen, minlength=self.num_experts)[
                : self.num_experts
            ]
            self.router_tokens[index] += int(mask.sum())

        return hook


def _topk_indices(output, top_k: int | None) -> torch.Tensor | None:
    """The [tokens, k] expert indices from a router's output (tuple ending in them, or logits)."""
    if isinstance(output, (tuple, list)):
        for item in reversed(output):
            if isinstance(item, torch.Tensor) and not item.is_floating_point():
                return item.reshape(-1, item.shape[-1])
        output = output[0]
    if isinstance(output, torch.Tensor) and output.is_floating_point() and top_k:
        logits = output.reshape(-1, output.shape[-1])
        return logits.topk(top_k, dim=-1).indices
    return None


# --------------------------------------------------------------------------- measurement


@dataclass
class ClassActivations:
    """What one prompt class yields: rows [N, M, d] in prompt order, mean, router counts."""

    rows: torch.Tensor
    mean: torch.Tensor
    expert_counts: torch.Tensor
    router_tokens: torch.Tensor
    final_norm_mean: torch.Tensor | None = None


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Prompt indices grouped into batches of similar length (stable for equal lengths)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _pad(encoded: list[EncodedPrompt], pad_id: int, side: str):
    width = max(len(e.ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, item in enumerate(encoded):
        n = len(item.ids)
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[row, cols] = torch.tensor(item.ids, dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def _input_device(model) -> torch.device:
    embeddings = model.get_input_embeddings()
    return embeddings.weight.device


@torch.inference_mode()
def collect(
    model,
    encoded: list[EncodedPrompt],
    *,
    position: str = "last",
    batch_size: int = 32,
    padding_side: str = "left",
    pad_id: int = 0,
    progress: bool = True,
    desc: str = "measure",
) -> ClassActivations:
    """Run every prompt once and keep the measured residual rows at every index."""
    if position not in POSITIONS:
        raise AbliterateError(
            f"measurement position {position!r} is unknown; expected one of {list(POSITIONS)}."
        )
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be left or right, got {padding_side!r}")
    from tqdm.auto import tqdm

    layers = decoder_layers(model)
    router_modules = routers(layers)
    num_experts = _num_experts(model.config) if router_modules else None
    runner = base_model(model)
    final_norm = getattr(runner, "norm", None)
    final_norm = final_norm if isinstance(final_norm, torch.nn.Module) else None
    capture = _Capture(
        layers, router_modules, num_experts, _experts_per_token(model.config), final_norm
    )
    device = _input_device(model)
    running = RunningMean()
    final_running = RunningMean()
    out_rows: list[torch.Tensor | None] = [None] * len(encoded)
    batches = length_batches([len(e.ids) for e in encoded], batch_size)
    with capture, tqdm(total=len(encoded), desc=desc, unit="prompt", disable=not progress) as bar:
        for batch in batches:
            items = [encoded[i] for i in batch]
            ids, mask = _pad(items, pad_id, padding_side)
            tails = (
                torch.tensor([e.tail for e in items]) if position == "post_instruction" else None
            )
            capture.start_batch(position_weights(mask, tails), mask, single_position=tails is None)
            position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
            runner(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=position_ids.to(device),
                use_cache=False,
            )
            rows = capture.rows()  # float32 [B, M, d]
            running.add(rows)
            if capture.final_slot is not None:
                final_running.add(capture.final_slot)
            for slot, i in enumerate(batch):
                out_rows[i] = rows[slot].to(_storage_dtype(model))
            bar.update(len(batch))
    return ClassActivations(
        rows=torch.stack(out_rows),
        mean=running.mean(),
        expert_counts=capture.expert_counts,
        router_tokens=capture.router_tokens,
        final_norm_mean=final_running.mean() if final_running.count else None,
    )


def prompt_rows(
    model,
    tokenizer,
    prompts: list[str],
    *,
    position: str = "last",
    batch_size: int = 32,
    system: str | None = None,
    fallback_template: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """The measured residual rows [N, M, d] of `prompts` (e.g. held-out prompts to project)."""
    encoded = encode(tokenizer, prompts, system=system, fallback_template=fallback_template)
    acts = collect(
        model,
        encoded,
        position=position,
        batch_size=batch_size,
        pad_id=_pad_id(tokenizer),
        progress=progress,
    )
    return acts.rows


def _storage_dtype(model) -> torch.dtype:
    """Per-prompt rows are kept in the model's own precision (float32 for float32 models)."""
    dtype = getattr(model, "dtype", torch.float32)
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def measure(
    model,
    tokenizer,
    target: list[str],
    benign: list[str],
    *,
    position: str = "last",
    batch_size: int = 32,
    clip: float | None = None,
    system: str | None = None,
    fallback_template: bool = False,
    padding_side: str = "left",
    progress: bool = True,
) -> Measurements:
    """Measure class means, per-prompt projections and router counts for two prompt sets."""
    if position not in POSITIONS:
        raise AbliterateError(
            f"measurement position {position!r} is unknown; expected one of {list(POSITIONS)}."
        )
    if clip is not None and not 0.0 <= clip < 0.5:
        raise AbliterateError(f"clip quantile {clip} is invalid; expected a value in [0, 0.5).")
    pad_id = _pad_id(tokenizer)
    layers = decoder_layers(model)
    router_modules = routers(layers)
    if router_modules:
        logger.info(
            "Counting router top-%s selections of %s experts in %d MoE layers",
            _experts_per_token(model.config),
            _num_experts(model.config),
            len(router_modules),
        )
    collected = {}
    for cls, prompts in (("target", target), ("benign", benign)):
        if not prompts:
            raise AbliterateError(f"the {cls} prompt set is empty; expected at least one prompt.")
        encoded = encode(tokenizer, prompts, system=system, fallback_template=fallback_template)
        collected[cls] = collect(
            model,
            encoded,
            position=position,
            batch_size=batch_size,
            padding_side=padding_side,
            pad_id=pad_id,
            progress=progress,
            desc=f"measure {cls}",
        )
    means = {}
    for cls, acts in collected.items():
        if clip:
            means[cls] = winsorize(acts.rows, clip).to(torch.float64).mean(dim=0)
        else:
            means[cls] = acts.mean
    directions = unit_directions(means["target"], means["benign"])
    projections = {
        cls: torch.einsum("nmd,md->mn", acts.rows.to(torch.float64), directions).to(torch.float32)
        for cls, acts in collected.items()
    }
    meta = {
        "num_layers": len(layers),
        "hidden_size": int(means["target"].shape[1]),
        "counts": {"target": len(target), "benign": len(benign)},
        "position": position,
        "clip": clip,
        "dtype": str(_storage_dtype(model)).replace("torch.", ""),
        "prompt_sha256": {"target": prompt_sha256(target), "benign": prompt_sha256(benign)},
        "system": system,
        "router_positions": "all non-padding prompt tokens",
        "model": str(getattr(model.config, "_name_or_path", "")),
        "quantization": _quantization_of(model),
    }
    result = Measurements(
        target_mean=means["target"],
        benign_mean=means["benign"],
        target_proj=projections["target"],
        benign_proj=projections["benign"],
        meta=meta,
        target_final_norm_mean=collected["target"].final_norm_mean,
        benign_final_norm_mean=collected["benign"].final_norm_mean,
        norm_weights=reading_norm_weights(model, layers),
    )
    if router_modules and _num_experts(model.config):
        result.target_expert_counts = collected["target"].expert_counts
        result.benign_expert_counts = collected["benign"].expert_counts
        result.target_router_tokens = collected["target"].router_tokens
        result.benign_router_tokens = collected["benign"].router_tokens
    return result


def reading_norm_weights(model, layers) -> torch.Tensor | None:
    """[L + 1, d] float64: the weight of the norm that reads each measurement index (layer
    m's `input_layernorm`, then the final norm), so a direction can be seen as the next
    reader sees it. None when a norm has no weight of the hidden size."""
    norms = [getattr(layer, "input_layernorm", None) for layer in layers]
    norms.append(getattr(base_model(model), "norm", None))
    weights = []
    for norm in norms:
        weight = getattr(norm, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 1:
            return None
        weights.append(weight.detach().to("cpu", torch.float64))
    if len({w.shape for w in weights}) != 1:
        return None
    return torch.stack(weights)


def _quantization_of(model) -> str | None:
    config = getattr(model.config, "quantization_config", None)
    if config is None:
        return None
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    if get("load_in_4bit"):
        return "4bit"
    if get("load_in_8bit"):
        return "8bit"
    return str(get("quant_method") or "quantized")


def _pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value if not isinstance(value, list) else value[0])
    return 0


# --------------------------------------------------------------------------- loading a model


def resolve_device(device: str) -> str:
    if device != "auto":
        if device == "cuda" and not torch.cuda.is_available():
            raise AbliterateError("measure.device is cuda but no CUDA device is available.")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_model(
    model_dir: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    device_map: str | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    trust_remote_code: bool = False,
):
    """Load a causal LM and its tokenizer for measurement; returns (model, tokenizer, info)."""
    import transformers

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise AbliterateError(
            f"model directory {path} has no config.json; expected a Hugging Face model."
        )
    if load_in_4bit and load_in_8bit:
        raise AbliterateError("load_in_4bit and load_in_8bit are both set; choose one.")
    device = resolve_device(device)
    torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]
    kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    quantization = None
    if load_in_4bit or load_in_8bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise AbliterateError(
                "load_in_4bit/load_in_8bit need `pip install bitsandbytes`."
            ) from None
        compute = DTYPES.get(dtype, torch.float32 if device == "cpu" else torch.bfloat16)
        quantization = "4bit" if load_in_4bit else "8bit"
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=load_in_4bit,
            load_in_8bit=load_in_8bit,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_type="nf4",
        )
        kwargs["device_map"] = device_map or device
    elif device_map:
        kwargs["device_map"] = device_map
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        path, trust_remote_code=trust_remote_code
    )
    info = {
        "model": str(path.resolve()),
        "device": device,
        "device_map": device_map,
        "quantization": quantization,
    }
    return model, tokenizer, info


# --------------------------------------------------------------------------- files


def _tensors(meas: Measurements) -> dict[str, torch.Tensor]:
    tensors = {
        "target_mean": meas.target_mean.to(torch.float64),
        "benign_mean": meas.benign_mean.to(torch.float64),
        "target_proj": meas.target_proj.to(torch.float32),
        "benign_proj": meas.benign_proj.to(torch.float32),
    }
    if meas.has_router_stats:
        tensors["target_expert_counts"] = meas.target_expert_counts.to(torch.int64)
        tensors["benign_expert_counts"] = meas.benign_expert_counts.to(torch.int64)
        tensors["target_router_tokens"] = meas.target_router_tokens.to(torch.int64)
        tensors["benign_router_tokens"] = meas.benign_router_tokens.to(torch.int64)
    if meas.target_final_norm_mean is not None and meas.benign_final_norm_mean is not None:
        tensors["target_final_norm_mean"] = meas.target_final_norm_mean.to(torch.float64)
        tensors["benign_final_norm_mean"] = meas.benign_final_norm_mean.to(torch.float64)
    if meas.norm_weights is not None:
        tensors["norm_weights"] = meas.norm_weights.to(torch.float64)
    return {name: t.contiguous() for name, t in tensors.items()}


def save_measurements(meas: Measurements, path: str | Path) -> Path:
    """Write `path` (.safetensors, metadata inside) and `path.json` beside it, atomically.

    A path ending in `.refuse` is written in the legacy torch format instead.
    """
    path = Path(path)
    if path.suffix == ".refuse":
        return save_refuse(meas, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in meas.meta.items() if k != "source_file"}
    meta_json = json.dumps(meta, indent=2, sort_keys=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(_tensors(meas), str(tmp), metadata={METADATA_KEY: meta_json})
    write_text_atomic(path.with_suffix(".json"), meta_json + "\n")
    os.replace(tmp, path)
    return path


def load_measurements(path: str | Path) -> Measurements:
    """Read measurements from `.safetensors` (this project) or `.refuse` (legacy torch)."""
    path = Path(path)
    if not path.is_file():
        raise AbliterateError(f"measurements file {path} does not exist.")
    if path.suffix == ".refuse":
        return load_refuse(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as error:
        raise AbliterateError(
            f"measurements file {path} is not a readable safetensors file ({error})."
        ) from None
    for name in ("target_mean", "benign_mean"):
        if name not in tensors:
            raise AbliterateError(f"measurements file {path} has no tensor {name!r}.")
    meta = json.loads(metadata.get(METADATA_KEY, "{}"))
    meta["source_file"] = str(path)
    empty = torch.zeros(tensors["target_mean"].shape[0], 0)
    meas = Measurements(
        target_mean=tensors["target_mean"].to(torch.float64),
        benign_mean=tensors["benign_mean"].to(torch.float64),
        target_proj=tensors.get("target_proj", empty),
        benign_proj=tensors.get("benign_proj", empty),
        meta=meta,
        target_expert_counts=tensors.get("target_expert_counts"),
        benign_expert_counts=tensors.get("benign_expert_counts"),
        target_router_tokens=tensors.get("target_router_tokens"),
        benign_router_tokens=tensors.get("benign_router_tokens"),
        target_final_norm_mean=tensors.get("target_final_norm_mean"),
        benign_final_norm_mean=tensors.get("benign_final_norm_mean"),
        norm_weights=tensors.get("norm_weights"),
    )
    if meas.target_mean.shape != meas.benign_mean.shape:
        raise AbliterateError(
            f"measurements file {path} has target and benign means of different shapes."
        )
    return meas


def measure_to_file(
    model_dir: str | Path,
    target_source: str,
    benign_source: str,
    output: str | Path,
    *,
    field: str | None = None,
    split: str = "train",
    max_count: int | None = None,
    seed: int = 0,
    system: str | None = None,
    fallback_template: bool = False,
    position: str = "last",
    batch_size: int = 32,
    clip: float | None = None,
    device: str = "auto",
    dtype: str = "auto",
    device_map: str | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> Measurements:
    """The whole `measure` step: prompts -> model -> measurements file (+ JSON)."""
    from .prompts import load_prompts

    if position not in POSITIONS:
        raise AbliterateError(
            f"measurement position {position!r} is unknown; expected one of {list(POSITIONS)}."
        )
    target = load_prompts(target_source, field=field, split=split, max_count=max_count, seed=seed)
    benign = load_prompts(benign_source, field=field, split=split, max_count=max_count, seed=seed)
    logger.info("Loaded %d target and %d benign prompts", len(target), len(benign))
    model, tokenizer, info = load_model(
        model_dir,
        device=device,
        dtype=dtype,
        device_map=device_map,
        load_in_4bit=load_in_4bit,
        load_in_8bit=load_in_8bit,
        trust_remote_code=trust_remote_code,
    )
    logger.info(
        "Measuring %s on %s (%s)", model_dir, info["device"], info["quantization"] or "unquantized"
    )
    meas = measure(
        model,
        tokenizer,
        target,
        benign,
        position=position,
        batch_size=batch_size,
        clip=clip,
        system=system,
        fallback_template=fallback_template,
        progress=progress,
    )
    meas.meta.update(
        {
            "model": info["model"],
            "quantization": info["quantization"],
            "device": info["device"],
            "prompt_sources": {"target": str(target_source), "benign": str(benign_source)},
        }
    )
    save_measurements(meas, output)
    logger.info("Wrote measurements for %d indices to %s", meas.num_indices, output)
    return meas


# --------------------------------------------------------------------------- legacy .refuse


def save_refuse(meas: Measurements, path: str | Path) -> Path:
    """Write the legacy torch dict: `layers`, `harmful_i`, `harmless_i`, `refuse_i`, `refusenorm_i`.

    Index i is measurement index i (0..L); `layers` is the number of decoder layers.
    Tensors are float32, which every legacy reader accepts.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    directions = unit_directions(meas.target_mean, meas.benign_mean)
    data: dict = {"layers": meas.num_layers}
    for i in range(meas.num_indices):
        data[f"harmful_{i}"] = meas.target_mean[i].to(torch.float32).clone()
        data[f"harmless_{i}"] = meas.benign_mean[i].to(torch.float32).clone()
        data[f"refuse_{i}"] = (meas.target_mean[i] - meas.benign_mean[i]).to(torch.float32)
        data[f"refusenorm_{i}"] = directions[i].to(torch.float32)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)
    return path


def load_refuse(path: str | Path) -> Measurements:
    """Read a legacy `.refuse` file (never unpickled: `weights_only=True`)."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise AbliterateError(
            f"{path} is not a loadable .refuse file (read with weights_only=True: {error})."
        ) from None
    if not isinstance(data, dict):
        raise AbliterateError(
            f"{path} does not hold a dict; expected a legacy .refuse measurement dict."
        )
    count = 0
    while f"harmful_{count}" in data and f"harmless_{count}" in data:
        count += 1
    if count == 0:
        raise AbliterateError(
            f"{path} has no `harmful_0`/`harmless_0` tensors; expected a .refuse file."
        )
    target = torch.stack(
        [torch.as_tensor(data[f"harmful_{i}"]).to(torch.float64).flatten() for i in range(count)]
    )
    benign = torch.stack(
        [torch.as_tensor(data[f"harmless_{i}"]).to(torch.float64).flatten() for i in range(count)]
    )
    layers = data.get("layers")
    num_layers = int(layers) if isinstance(layers, int) and layers >= count - 1 else count - 1
    meta = {
        "num_layers": num_layers,
        "hidden_size": int(target.shape[1]),
        "counts": {"target": None, "benign": None},
        "position": None,
        "source_file": str(path),
        "converted_from": "refuse",
    }
    empty = torch.zeros(count, 0)
    return Measurements(target, benign, empty.clone(), empty.clone(), meta=meta)
