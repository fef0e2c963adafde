"""Routing shift: how far an edit moves an MoE model's expert routing, per layer.

Why: a router edit (or any edit upstream of a router) changes which experts a token
reaches. Refusal rate and KL on the output say whether the edit worked and what it cost;
the routing shift says *how* it acts on the experts, which is what decides between the
expert strategies (editing routers, suppressing experts, editing experts).

What is measured, per MoE layer, on the prompt tokens of the evaluation's own generation
passes (the prefill forward of each batch, every non-padding prompt token: the base model
and a variant see exactly the same tokens there, so token i of one is token i of the other):

- `kl`: the mean over tokens of KL(base || edited) between the router's distributions over
  experts, as the model computes them: softmax of the router logits (Mixtral, Qwen-MoE,
  gpt-oss), or for sigmoid routers (GLM-4.5, DeepSeek-V3) the sigmoid scores normalized to
  sum to 1 (their correction bias only shifts which experts are chosen, so it is left out
  of the distribution and shows in the next number);
- `topk_changed`: the share of top-k selections that changed, i.e. per token the fraction
  of the base's k chosen experts that the edited model does not choose, averaged. The
  chosen experts are the router's own output (correction bias and group limits included).

Memory: the base distributions are kept on the host, tokens x experts x MoE layers x 4
bytes per prompt class (about 120 MB for 100 prompts of 50 tokens with 128 experts in 46
layers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .measure import routers
from .model import decoder_layers


def _is_sigmoid_router(router: torch.nn.Module, config) -> bool:
    """GLM-4.5 / DeepSeek-V3 score experts with a sigmoid (and carry a correction bias)."""
    if getattr(config, "scoring_func", None) == "sigmoid":
        return True
    return hasattr(router, "e_score_correction_bias")


def log_distribution(logits: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    """Log-probabilities over experts [tokens, E] from router logits, as the router scores."""
    logits = logits.to(torch.float32)
    if sigmoid:
        scores = torch.nn.functional.logsigmoid(logits)
        return scores - torch.logsumexp(scores, dim=-1, keepdim=True)
    return torch.log_softmax(logits, dim=-1)


def _parse(output, top_k: int | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(logits [tokens, E], chosen experts [tokens, k]) from a router's output.

    Transformers 5 routers return (logits, weights, indices); a router returning only its
    logits gets the top-k of them as its choice.
    """
    logits = indices = None
    if isinstance(output, (tuple, list)):
        floats = [t for t in output if isinstance(t, torch.Tensor) and t.is_floating_point()]
        ints = [t for t in output if isinstance(t, torch.Tensor) and not t.is_floating_point()]
        logits = floats[0] if floats else None
        indices = ints[-1] if ints else None
    elif isinstance(output, torch.Tensor) and output.is_floating_point():
        logits = output
    if logits is None:
        return None, None
    logits = logits.reshape(-1, logits.shape[-1])
    if indices is None and top_k:
        indices = logits.topk(top_k, dim=-1).indices
    if indices is not None:
        indices = indices.reshape(logits.shape[0], -1)
    return logits, indices


@dataclass
class RouterRecord:
    """What one class of prompts did at each MoE layer: log-distributions and choices."""

    logp: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    chosen: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        logp = torch.cat(self.logp[index]) if self.logp.get(index) else torch.empty(0, 0)
        chosen = self.chosen.get(index)
        return logp, (torch.cat(chosen) if chosen else None)


class RoutingCapture:
    """Forward hooks that record the router outputs of each generation's prefill forward.

    Why the prefill only: after it, each variant generates its own tokens, so later steps
    are not comparable between variants; the prefill sees the prompts, identically batched.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        config = getattr(model, "config", None)
        self.routers = routers(decoder_layers(model))
        self.sigmoid = {i: _is_sigmoid_router(r, config) for i, r in self.routers.items()}
        top_k = None
        for name in ("num_experts_per_tok", "experts_per_token", "moe_topk"):
            top_k = top_k or getattr(config, name, None)
        self.top_k = top_k if isinstance(top_k, int) else None
        self._mask: torch.Tensor | None = None
        self._record: RouterRecord | None = None

    @property
    def active(self) -> bool:
        return bool(self.routers)

    def _model_hook(self, module, args, kwargs):
        """Note the token mask of a prefill forward; None on decoding steps.

        A decoding step has a non-empty cache (transformers 5 passes it as `cache`, older
        versions as `past_key_values`) and an attention mask longer than its input ids;
        either marks it, so a cache object this code cannot read still cannot pass a
        decoding step off as a prefill.
        """
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cached = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        mask = kwargs.get("attention_mask")
        if cached or not isinstance(ids, torch.Tensor) or ids.ndim != 2:
            self._mask = None
        elif isinstance(mask, torch.Tensor):
            self._mask = mask.reshape(-1).bool() if mask.shape == ids.shape else None
        else:
            self._mask = torch.ones(ids.numel(), dtype=torch.bool)

    def _router_hook(self, index: int):
        def hook(module, args, output):
            if self._mask is None or self._record is None:
                return
            logits, chosen = _parse(output, self.top_k)
            if logits is None or logits.shape[0] != self._mask.numel():
                return  # a router that sees something other than one row per token
            mask = self._mask.to(logits.device)
            logp = log_distribution(logits.detach()[mask], self.sigmoid[index])
            self._record.logp.setdefault(index, []).append(logp.cpu())
            if chosen is not None:
                self._record.chosen.setdefault(index, []).append(chosen[mask].cpu())

        return hook

    @contextlib.contextmanager
    def recording(self) -> Iterator[RouterRecord]:
        """Record router outputs of the forwards inside the block into a `RouterRecord`."""
        record = RouterRecord()
        if not self.active:
            yield record
            return
        handles = [self.model.register_forward_pre_hook(self._model_hook, with_kwargs=True)]
        handles += [r.register_forward_hook(self._router_hook(i)) for i, r in self.routers.items()]
        self._record = record
        try:
            yield record
        finally:
            for handle in handles:
                handle.remove()
            self._record = self._mask = None


def layer_shift(
    base_logp: torch.Tensor,
    edited_logp: torch.Tensor,
    base_chosen: torch.Tensor | None,
    edited_chosen: torch.Tensor | None,
) -> tuple[float, float]:
    """(mean KL(base || edited) over tokens, share of the base's top-k choices changed)."""
    if base_logp.shape != edited_logp.shape or base_logp.numel() == 0:
        return float("nan"), float("nan")
    kl = (base_logp.exp() * (base_logp - edited_logp)).sum(-1).clamp_min(0.0)
    changed = float("nan")
    if base_chosen is not None and edited_chosen is not None:
        k = base_chosen.shape[-1]
        kept = (base_chosen.unsqueeze(-1) == edited_chosen.unsqueeze(-2)).any(-1).sum(-1)
        changed = float((1.0 - kept.to(torch.float64) / k).mean())
    return float(kl.mean()), changed


def routing_shift(base: RouterRecord, edited: RouterRecord) -> dict[int, dict[str, float]]:
    """Per MoE layer, `{"kl": ..., "topk_changed": ...}` of `edited` against `base`."""
    shift = {}
    for index in sorted(base.logp):
        if index not in edited.logp:
            continue
        base_logp, base_chosen = base.layer(index)
        edited_logp, edited_chosen = edited.layer(index)
        kl, changed = layer_shift(base_logp, edited_logp, base_chosen, edited_chosen)
        shift[index] = {"kl": kl, "topk_changed": changed}
    return shift


def mean_over_layers(shift: dict[int, dict[str, float]], key: str) -> float:
    """The mean of one metric over the MoE layers (NaN layers left out)."""
    values = [v[key] for v in shift.values() if v[key] == v[key]]
    return sum(values) / len(values) if values else float("nan")
