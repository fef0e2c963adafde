"""The one function that edits a tensor.

Both the sharded exporter and the in-memory evaluator call `ablate_tensor`, so what the
sweep evaluates is, bit for bit, what the export writes.

Writers into the residual stream (o_proj, down_proj, expert down_proj, embeddings) and
readers of it (router gate, expert gate/up) receive the same operation on the tensor's
*hidden axis*: every vector v laid along that axis becomes v - s (r . v) r. For a writer
W [d, in] those vectors are the columns (each input unit's write vector), giving
W' = W - s r (r^T W); for a reader W [out, d] they are the rows, giving W' = W - s (W r) r^T.

Norm preservation (magnitude-preserving orthogonal ablation) edits the unit vectors and
multiplies back each vector's original norm, so at s = 1 the direction is gone exactly
(r^T W' = 0) and no unit's write (or read) magnitude changes.
"""

from __future__ import annotations

import torch

EPS = 1e-12
PRESERVE_MODES = ("hidden", "other")


def unit(direction: torch.Tensor) -> torch.Tensor:
    """`direction` as a float32 unit vector; a zero vector is a bug upstream, so it raises."""
    r = direction.detach().to(torch.float32).flatten()
    norm = r.norm()
    if not torch.isfinite(norm) or norm <= EPS:
        raise ValueError("direction has zero or non-finite norm")
    return r / norm


def _edit_rows(
    rows: torch.Tensor, r: torch.Tensor, scale: float, norm_preserve: bool, preserve: str
) -> torch.Tensor:
    """Edit float32 `rows` [..., d] whose last axis is the hidden axis."""
    if norm_preserve and preserve == "hidden":
        norms = rows.norm(dim=-1, keepdim=True)
        units = rows / norms.clamp_min(EPS)
        units = units - scale * (units @ r).unsqueeze(-1) * r
        units = units / units.norm(dim=-1, keepdim=True).clamp_min(EPS)
        return units * norms
    edited = rows - scale * (rows @ r).unsqueeze(-1) * r
    if norm_preserve:  # preserve == "other": norms across the non-hidden axis, per hidden unit
        before = rows.norm(dim=-2, keepdim=True)
        after = edited.norm(dim=-2, keepdim=True)
        edited = edited * (before / after.clamp_min(EPS))
    return edited


def ablate_tensor(
    weight: torch.Tensor,
    direction: torch.Tensor,
    scale: float = 1.0,
    *,
    hidden_axis: int,
    norm_preserve: bool = True,
    preserve: str = "hidden",
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Return `weight` with `scale` times its component along `direction` removed.

    `hidden_axis` is the axis of `weight` that indexes the residual stream (0 for an
    nn.Linear writer [d, in], 1 for a reader [out, d] or an embedding [vocab, d], the last
    axis for gpt-oss' fused down_proj [E, intermediate, d]); it comes from the architecture
    registry, never from the shape. Computation is float32 on `device` (default: the
    weight's); the result has the weight's dtype and device. 3-D tensors are processed one
    leading slice (expert) at a time, so peak memory is one expert, not the whole tensor.
    s = 1 removes the component, s = 2 reflects it, s < 0 adds it.
    """
    if preserve not in PRESERVE_MODES:
        raise ValueError(f"preserve must be one of {PRESERVE_MODES}, got {preserve!r}")
    hidden_axis = hidden_axis % weight.ndim
    if weight.shape[hidden_axis] != direction.numel():
        raise ValueError(
            f"direction has {direction.numel()} components but the tensor's hidden axis "
            f"{hidden_axis} has size {weight.shape[hidden_axis]} (shape {tuple(weight.shape)})"
        )
    compute = torch.device(device) if device is not None else weight.device
    r = unit(direction).to(compute)
    if weight.ndim >= 3 and hidden_axis != 0:
        out = torch.empty_like(weight)
        for i in range(weight.shape[0]):
            out[i] = ablate_tensor(
                weight[i],
                direction,
                scale,
                hidden_axis=hidden_axis - 1,
                norm_preserve=norm_preserve,
                preserve=preserve,
                device=compute,
            )
        return out
    rows = weight.detach().to(compute, torch.float32).movedim(hidden_axis, -1)
    if rows.ndim == 1:
        rows = rows.unsqueeze(0)
        edited = _edit_rows(rows, r, scale, False, preserve).squeeze(0)
    else:
        edited = _edit_rows(rows, r, scale, norm_preserve, preserve)
    return edited.movedim(-1, hidden_axis).to(weight.dtype).to(weight.device)


def ablate_bias(bias: torch.Tensor, direction: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Remove `scale` times the direction from a writer's bias (last axis is hidden).

    Biases are plain-projected: a bias is one vector written into the residual on every
    token, and rescaling it to its old norm would re-inject the removed magnitude elsewhere.
    """
    return ablate_tensor(bias, direction, scale, hidden_axis=-1, norm_preserve=False)
