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

Expert attribution (MoE, `attribution`): in the same forward passes, each layer's fused
experts module is called once per top-k slot instead of once for all slots (the same
expert work, split so that every row of an output is one expert's weighted write), and
per class we add up, per routed expert, its weighted writes (gate weight x expert output,
float64 [L, E, d]) and its gate weights over the same tokens. No direction is needed yet:
the analysis projects the means onto whichever direction it ranks by.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .directions import EPS
from .errors import AbliterateError
from .files import write_text_atomic
from .layout import config_int
from .logs import logger
from .model import (
    PADDING_SIDES,
    LoadOptions,
    base_model,
    decoder_layers,
    input_device,
    length_batches,
    load_model,
    mask_positions,
    option_values,
    pad_batch,
    pad_id,
    quantization_of,
)
from .prompts import EncodedPrompt, PromptOptions, prompt_sha256

POSITIONS = ("last", "post_instruction")
CLASSES = ("target", "benign")
METADATA_KEY = "abliterate"
# expert attribution tensors, stored per class as `{class}_{name}`
ATTRIBUTION_TENSORS = {
    "expert_write": torch.float32,
    "expert_gate": torch.float32,
    "expert_selections": torch.int64,
}


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class MeasureOptions:
    """Everything `measure` can be told; defaults match the workflow schema's `measure:`.

    `load` and `prompts` are the shared loading and prompt options; `padding_side` and
    `progress` are library-only (the workflow always left-pads and logs instead of bars).
    `attribution` (MoE only) also records each routed expert's weighted write per class.
    """

    position: str = "last"
    batch_size: int = 32
    clip: float | None = None
    padding_side: str = "left"
    progress: bool = True
    attribution: bool = True
    load: LoadOptions = field(default_factory=LoadOptions)
    prompts: PromptOptions = field(default_factory=PromptOptions)

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise AbliterateError(
                f"measurement position {self.position!r} is unknown; expected one of "
                f"{list(POSITIONS)}."
            )
        if self.clip is not None and not 0.0 <= self.clip < 0.5:
            raise AbliterateError(
                f"clip quantile {self.clip} is invalid; expected a value in [0, 0.5)."
            )
        if self.padding_side not in PADDING_SIDES:
            raise AbliterateError(
                f"padding side {self.padding_side!r} is unknown; expected left or right."
            )
        if self.batch_size < 1:
            raise AbliterateError(
                f"measure batch_size is {self.batch_size}; expected a positive integer."
            )

    @classmethod
    def from_config(cls, config: dict) -> MeasureOptions:
        """The options of a validated workflow config (`measure:`, `prompts:`, `model:`)."""
        section = config["measure"]
        return cls(
            **option_values(cls, section),
            progress=False,
            load=LoadOptions.from_config(section, config["model"]["trust_remote_code"]),
            prompts=PromptOptions.from_config(config["prompts"]),
        )


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
    # expert attribution (MoE; None for dense models and older files): per layer and
    # routed expert, the mean weighted write (gate x output) per selection [L, E, d]
    # float32, the mean gate weight per selection [L, E] float32, and the number of
    # selections those means are over [L, E] int64 (zero rows: dense layers)
    target_expert_write: torch.Tensor | None = None
    benign_expert_write: torch.Tensor | None = None
    target_expert_gate: torch.Tensor | None = None
    benign_expert_gate: torch.Tensor | None = None
    target_expert_selections: torch.Tensor | None = None
    benign_expert_selections: torch.Tensor | None = None

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

    @property
    def has_attribution(self) -> bool:
        """Whether per-expert weighted writes were recorded (MoE, this version on)."""
        return (
            self.target_expert_write is not None
            and self.benign_expert_write is not None
            and self.has_router_stats
        )

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
            raise AbliterateError("no prompt was measured; expected at least one prompt.")
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


def expert_modules(layers: torch.nn.ModuleList) -> dict[int, torch.nn.Module]:
    """Layer index -> its fused experts module (`mlp.experts`, one module holding every
    routed expert and called as `experts(hidden [T, d], indices [T, k], weights [T, k])`,
    the form of every MoE model in transformers 5: GLM-4.5, DeepSeek-V3, Qwen3-MoE,
    Mixtral, gpt-oss). Per-expert module lists (remote code) are not attributed."""
    found = {}
    for index, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
        experts = getattr(mlp, "experts", None)
        if isinstance(experts, torch.nn.Module) and not isinstance(
            experts, (torch.nn.ModuleList, torch.nn.ModuleDict)
        ):
            found[index] = experts
    return found


class ExpertWrites:
    """Per-layer, per-expert sums of weighted writes and gate weights for one class.

    float64 on the CPU: [L, E, d] writes, [L, E] gates and selection counts; for a
    GLM-4.5-Air-sized model (46 layers, 128 experts, d 4096) the write sums are 193 MB per
    class (96 MB as the float32 means stored in the file).
    """

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.num_layers, self.num_experts = num_layers, num_experts
        self.writes: torch.Tensor | None = None  # allocated at the first write (d known)
        self.gates = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.selections = torch.zeros(num_layers, num_experts, dtype=torch.int64)
        self.unattributed_calls = 0  # experts calls of an unexpected form, run unwrapped

    def slot_sums(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Empty float32 sums for one experts call, on the device of `like` [n, d]."""
        return {
            "writes": like.new_zeros(self.num_experts, like.shape[-1], dtype=torch.float32),
            "gates": like.new_zeros(self.num_experts, dtype=torch.float32),
            "counts": like.new_zeros(self.num_experts, dtype=torch.int64),
        }

    def accumulate(self, sums: dict, experts: torch.Tensor, gates: torch.Tensor, out):
        """Add one top-k slot's rows (expert index [n], gate weight [n], write [n, d])."""
        experts = experts.to(torch.int64)
        valid = experts < self.num_experts  # an index of E means "no expert" in some kernels
        experts, gates, out = experts[valid], gates[valid], out[valid]
        sums["writes"].index_add_(0, experts, out.to(torch.float32))
        sums["gates"].index_add_(0, experts, gates.to(torch.float32))
        sums["counts"] += torch.bincount(experts, minlength=self.num_experts)[: self.num_experts]

    def commit(self, layer: int, sums: dict) -> None:
        """Move one call's sums to the float64 totals: one [E, d] transfer per MoE layer
        and batch, not one per slot."""
        if self.writes is None:
            self.writes = torch.zeros(
                self.num_layers, self.num_experts, sums["writes"].shape[-1], dtype=torch.float64
            )
        self.writes[layer] += sums["writes"].to("cpu", torch.float64)
        self.gates[layer] += sums["gates"].to("cpu", torch.float64)
        self.selections[layer] += sums["counts"].to("cpu")

    def means(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean write per selection [L, E, d], mean gate per selection [L, E]) float32."""
        if self.writes is None:
            return None
        per = self.selections.to(torch.float64).clamp_min(1)
        return (
            (self.writes / per.unsqueeze(-1)).to(torch.float32),
            (self.gates / per).to(torch.float32),
        )


class _Capture:
    """Forward hooks that keep the measured position(s) of each measurement index.

    Set `weights` ([B, T] from `position_weights`) and `token_mask` before each forward;
    read `rows` ([B, M, d] in the model's dtype) and `expert_counts` after it. With
    `experts` (layer -> fused experts module) the experts' forwards are wrapped while the
    capture is active, recording each routed expert's weighted write in `expert_writes`.
    """

    def __init__(self, layers, router_modules, num_experts, top_k, final_norm=None, experts=None):
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
        self.expert_modules = dict(experts or {}) if num_experts else {}
        self.expert_writes = ExpertWrites(len(layers), num_experts) if self.expert_modules else None
        self._wrapped: list[tuple[torch.nn.Module, object]] = []

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
        for index, module in self.expert_modules.items():
            # an instance attribute shadows the class's forward; whatever forward the
            # instance had (e.g. accelerate's device hook) is what the wrapper calls
            self._wrapped.append((module, module.__dict__.get("forward")))
            module.forward = self._experts_forward(index, module.forward)
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for module, previous in reversed(self._wrapped):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._wrapped.clear()

    def _experts_forward(self, index: int, original):
        """The experts' forward, called once per top-k slot so each output row is one
        expert's weighted write; the slots are summed in ascending expert order, the
        order transformers' eager loop adds them in. The layer's output is the same sum,
        equal up to rounding (bit for bit on the bf16 GLM tiny model with eager experts;
        grouped_mm, or a float32 product over fewer rows, may round differently)."""

        def forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            plain = (
                args
                or kwargs
                or not isinstance(top_k_index, torch.Tensor)
                or not isinstance(top_k_weights, torch.Tensor)
                or top_k_index.ndim != 2
                or hidden_states.ndim != 2
                or top_k_weights.shape != top_k_index.shape
                or hidden_states.shape[0] != top_k_index.shape[0]
            )
            mask = self.token_mask.reshape(-1) if self.token_mask is not None else None
            if plain or mask is None or mask.shape[0] != hidden_states.shape[0]:
                self.expert_writes.unattributed_calls += 1
                return original(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
            mask = mask.to(hidden_states.device).bool()
            order = top_k_index.argsort(dim=-1)
            total, sums = None, self.expert_writes.slot_sums(hidden_states)
            for slot in range(top_k_index.shape[1]):
                pick = order[:, slot : slot + 1]
                experts, gates = top_k_index.gather(1, pick), top_k_weights.gather(1, pick)
                out = original(hidden_states, experts, gates)
                total = out if total is None else total + out
                self.expert_writes.accumulate(sums, experts[mask, 0], gates[mask, 0], out[mask])
            self.expert_writes.commit(index, sums)
            return total

        return forward

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
    expert_writes: ExpertWrites | None = None


@torch.inference_mode()
def collect(
    model,
    encoded: list[EncodedPrompt],
    options: MeasureOptions,
    *,
    pad_value: int = 0,
    desc: str = "measure",
) -> ClassActivations:
    """Run every prompt once and keep the measured residual rows at every index."""
    from tqdm.auto import tqdm

    layers = decoder_layers(model)
    router_modules = routers(layers)
    num_experts = _num_experts(model.config) if router_modules else None
    runner = base_model(model)
    final_norm = getattr(runner, "norm", None)
    final_norm = final_norm if isinstance(final_norm, torch.nn.Module) else None
    experts = expert_modules(layers) if options.attribution and num_experts else {}
    capture = _Capture(
        layers,
        router_modules,
        num_experts,
        _experts_per_token(model.config),
        final_norm,
        experts={i: m for i, m in experts.items() if i in router_modules},
    )
    device = input_device(model)
    running = RunningMean()
    final_running = RunningMean()
    out_rows: list[torch.Tensor | None] = [None] * len(encoded)
    batches = length_batches([len(e.ids) for e in encoded], options.batch_size)
    progress = tqdm(total=len(encoded), desc=desc, unit="prompt", disable=not options.progress)
    with capture, progress as bar:
        for batch in batches:
            items = [encoded[i] for i in batch]
            ids, mask = pad_batch([e.ids for e in items], pad_value, options.padding_side)
            tails = (
                torch.tensor([e.tail for e in items])
                if options.position == "post_instruction"
                else None
            )
            capture.start_batch(position_weights(mask, tails), mask, single_position=tails is None)
            position_ids = mask_positions(mask)
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
        expert_writes=capture.expert_writes,
    )


def prompt_rows(
    model, tokenizer, prompts: list[str], options: MeasureOptions | None = None
) -> torch.Tensor:
    """The measured residual rows [N, M, d] of `prompts` (e.g. held-out prompts to project)."""
    # rows only: no expert attribution (it would cost time and be thrown away)
    options = replace(options or MeasureOptions(progress=False), attribution=False)
    encoded = options.prompts.encode(tokenizer, prompts, model.config)
    return collect(model, encoded, options, pad_value=pad_id(tokenizer)).rows


def _storage_dtype(model) -> torch.dtype:
    """Per-prompt rows are kept in the model's own precision (float32 for float32 models)."""
    dtype = getattr(model, "dtype", torch.float32)
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def measure(
    model,
    tokenizer,
    target: list[str],
    benign: list[str],
    options: MeasureOptions | None = None,
) -> Measurements:
    """Measure class means, per-prompt projections and router counts for two prompt sets."""
    options = options or MeasureOptions()
    position, clip, system = options.position, options.clip, options.prompts.system
    pad_value = pad_id(tokenizer)
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
        encoded = options.prompts.encode(tokenizer, prompts, model.config)
        collected[cls] = collect(
            model, encoded, options, pad_value=pad_value, desc=f"measure {cls}"
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
        "quantization": quantization_of(model),
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
        attributed = {cls: acts.expert_writes for cls, acts in collected.items()}
        skipped = sum(w.unattributed_calls for w in attributed.values() if w is not None)
        if skipped:
            logger.warning(
                "%d experts calls did not look like experts(hidden [T, d], indices [T, k], "
                "weights [T, k]) and were not attributed; the expert writes miss them.",
                skipped,
            )
        if all(w is not None and w.means() is not None for w in attributed.values()):
            for cls, writes in attributed.items():
                write, gate = writes.means()
                setattr(result, f"{cls}_expert_write", write)
                setattr(result, f"{cls}_expert_gate", gate)
                setattr(result, f"{cls}_expert_selections", writes.selections)
            logger.info(
                "Recorded the weighted writes of %d experts in %d MoE layers",
                _num_experts(model.config),
                len(expert_modules(layers)),
            )
        elif options.attribution:
            logger.info(
                "Expert attribution skipped: no fused experts module was found in the MoE "
                "layers (routing statistics are still recorded)."
            )
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
    if meas.has_attribution:
        for cls in CLASSES:
            for name, dtype in ATTRIBUTION_TENSORS.items():
                tensors[f"{cls}_{name}"] = getattr(meas, f"{cls}_{name}").to(dtype)
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
    try:
        meta = json.loads(metadata.get(METADATA_KEY, "{}"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except ValueError as error:
        raise AbliterateError(
            f"measurements file {path} has malformed '{METADATA_KEY}' metadata (expected a "
            f"JSON object: {error})."
        ) from None
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
        **{
            f"{cls}_{name}": tensors.get(f"{cls}_{name}")
            for cls in CLASSES
            for name in ATTRIBUTION_TENSORS
        },
    )
    if meas.target_mean.shape != meas.benign_mean.shape:
        raise AbliterateError(
            f"measurements file {path} has target and benign means of different shapes."
        )
    check_finite_means(meas, f"measurements file {path}")
    return meas


def check_finite_means(meas: Measurements, source: str) -> None:
    """NaN or inf in a class mean (a diverged bf16 run, a damaged file) poisons every
    direction derived from it, so it is refused at load and analysis time, naming the
    indices (`source` names the file or run in the sentence)."""
    bad = sorted(
        {
            int(i)
            for mean in (meas.target_mean, meas.benign_mean)
            for i in (~torch.isfinite(mean)).any(dim=-1).nonzero().flatten()
        }
    )
    if bad:
        shown = ", ".join(str(i) for i in bad[:8]) + (" ..." if len(bad) > 8 else "")
        raise AbliterateError(
            f"{source} holds non-finite values (NaN or inf) in the class means "
            f"at measurement indices {shown}; expected finite means, re-run the measurement."
        )


def measure_to_file(
    model_dir: str | Path,
    target_source: str,
    benign_source: str,
    output: str | Path,
    options: MeasureOptions | None = None,
) -> Measurements:
    """The whole `measure` step: prompts -> model -> measurements file (+ JSON)."""
    options = options or MeasureOptions()
    target = options.prompts.load(target_source)
    benign = options.prompts.load(benign_source)
    logger.info("Loaded %d target and %d benign prompts", len(target), len(benign))
    model, tokenizer, info = load_model(model_dir, options.load)
    logger.info(
        "Measuring %s on %s (%s)", model_dir, info["device"], info["quantization"] or "unquantized"
    )
    meas = measure(model, tokenizer, target, benign, options)
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


def _check_finite_refuse(data, path: Path) -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                if not torch.isfinite(value).all():
                    raise AbliterateError(
                        f"{path}: tensor {key!r} holds non-finite values (NaN or inf); "
                        "expected finite measurements."
                    )


def load_refuse(path: str | Path) -> Measurements:
    """Read a legacy `.refuse` file (never unpickled: `weights_only=True`)."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False, which would run the file's code.
        raise AbliterateError(
            f"{path} holds Python objects besides tensors, and loading those would run code "
            "from the file, so it is refused; expected a .refuse file of plain tensors "
            "(harmful_i, harmless_i, ...) saved from a trusted source."
        ) from None
    except Exception as error:
        raise AbliterateError(
            f"{path} is not a loadable .refuse file ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'})."
        ) from None
    _check_finite_refuse(data, path)
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
