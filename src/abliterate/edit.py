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

Router suppression (`suppress_rows`) is the one edit that acts on chosen vectors only:
the router rows of chosen experts, and only their positive component along r.
"""

from __future__ import annotations

import torch

from .directions import EPS

PRESERVE_MODES = ("hidden", "other")


def unit(direction: torch.Tensor) -> torch.Tensor:
    """`direction` as a float32 unit vector; a zero vector is a bug upstream, so it raises."""
    r = direction.detach().to(torch.float32).flatten()
    norm = r.norm()
    if not torch.isfinite(norm) or norm <= EPS:
        raise ValueError("direction has zero or non-finite norm")
    return r / norm


def column_norms(matrix: torch.Tensor) -> torch.Tensor:
    """Norms of a float32 matrix's columns: a matrix-vector product over the squares.

    Why not `matrix.norm(dim=0)`: PyTorch reduces across rows with a strided loop that
    is several times slower than one squared copy plus a BLAS product.
    """
    ones = torch.ones(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    return (ones @ matrix.square()).sqrt()


def _edit_matrix(
    matrix: torch.Tensor,
    r: torch.Tensor,
    scale: float,
    axis: int,
    norm_preserve: bool,
    preserve: str,
) -> torch.Tensor:
    """Edit a float32 2-D `matrix` in place along its hidden `axis` (0 or 1); returns it.

    Works in the tensor's own memory layout (rank-1 updates with `addr_`, dot products
    as matrix-vector products), so a 4096 x 12288 o_proj costs one float32 copy and a few
    passes over it, not a transposed copy per step: this is what makes the export run at
    disk speed and keeps a shard job's memory at about two copies of its largest tensor.
    """
    other = 1 - axis

    def along_r(m: torch.Tensor) -> torch.Tensor:  # r . v for every vector v along `axis`
        return r @ m if axis == 0 else m @ r

    def rank_one(m: torch.Tensor, coefficients: torch.Tensor, alpha: float) -> torch.Tensor:
        if axis == 0:
            return m.addr_(r, coefficients, alpha=alpha)
        return m.addr_(coefficients, r, alpha=alpha)

    if norm_preserve and preserve == "hidden":
        # With u = v/|v| and p = r.u: u' = u - s p r has |u'|^2 = 1 - (2s - s^2) p^2, so
        # v' = |v| u'/|u'| = (v - s (r.v) r) / sqrt(1 - (2s - s^2) p^2): two passes, no
        # unit-vector copy. At s = 1 the factor is |v| / |v - (r.v) r| exactly.
        norms = column_norms(matrix) if axis == 0 else matrix.norm(dim=1)
        projections = along_r(matrix)
        p = projections / norms.clamp_min(EPS)
        factor = (1.0 - (2.0 * scale - scale * scale) * p * p).clamp_min(EPS).rsqrt()
        factor = torch.where(norms > EPS, factor, torch.ones_like(factor))
        matrix.mul_(factor.unsqueeze(axis))
        return rank_one(matrix, projections * factor, -scale)
    before = matrix.norm(dim=other, keepdim=True) if norm_preserve else None
    rank_one(matrix, along_r(matrix), -scale)
    if before is not None:  # preserve == "other": norms across the other axis, per hidden unit
        matrix.mul_(before / matrix.norm(dim=other, keepdim=True).clamp_min(EPS))
    return matrix


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
    if weight.ndim == 1:  # a single vector (a bias): plain projection
        vector = weight.detach().to(compute, torch.float32)
        edited = vector - scale * (vector @ r) * r
        return edited.to(weight.dtype).to(weight.device)
    # 2-D, or N-D with the hidden axis first: vectors along axis 0 of a [d, rest] matrix
    matrix = weight.detach().to(compute, torch.float32, copy=True)
    if matrix.ndim > 2:
        matrix = matrix.reshape(matrix.shape[0], -1)
    _edit_matrix(matrix, r, scale, hidden_axis, norm_preserve, preserve)
    return matrix.reshape(weight.shape).to(weight.dtype).to(weight.device)


def ablate_bias(bias: torch.Tensor, direction: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Remove `scale` times the direction from a writer's bias (last axis is hidden).

    Biases are plain-projected: a bias is one vector written into the residual on every
    token, and rescaling it to its old norm would re-inject the removed magnitude elsewhere.
    """
    return ablate_tensor(bias, direction, scale, hidden_axis=-1, norm_preserve=False)


def suppress_rows(
    weight: torch.Tensor,
    direction: torch.Tensor,
    scale: float,
    rows: tuple[int, ...],
    *,
    norm_preserve: bool = True,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Lower chosen experts' routing on inputs along `direction`: edit only their router rows.

    `weight` is a router [experts, d]; expert e's logit is w_e . x. With r the unit
    direction (target mean minus benign mean, normalized), the expert's mean logit on
    target inputs exceeds that on benign ones by exactly (w_e . r) |mu_t - mu_b|, so each
    chosen row becomes w_e - s max(w_e . r, 0) r: s = 1 closes the gap (the expert no
    longer prefers target-like inputs), s > 1 turns it into a preference for benign inputs.
    Rows with w_e . r <= 0 already route less on target-like inputs and are left as they
    are, so suppression never raises an expert's routing. Other rows are untouched; the
    correction bias some routers add to the scores is not an input of this function.
    With `norm_preserve` each edited row keeps its norm (the hidden-axis closed form of
    `ablate_tensor`), so only the row's angle to r changes.
    """
    if weight.ndim != 2 or direction.numel() != weight.shape[1]:
        raise ValueError(
            f"router suppression needs a [experts, {direction.numel()}] router weight, "
            f"got shape {tuple(weight.shape)}"
        )
    if any(not 0 <= row < weight.shape[0] for row in rows):
        raise ValueError(f"router rows {list(rows)} out of range 0-{weight.shape[0] - 1}")
    compute = torch.device(device) if device is not None else weight.device
    r = unit(direction).to(compute)
    matrix = weight.detach().to(compute, torch.float32, copy=True)
    index = torch.tensor(sorted(set(rows)), dtype=torch.long, device=compute)
    chosen = matrix.index_select(0, index)
    positive = (chosen @ r) > 0
    if bool(positive.any()):
        picked = index[positive]
        edited = _edit_matrix(chosen[positive], r, scale, 1, norm_preserve, "hidden")
        matrix.index_copy_(0, picked, edited)
    return matrix.to(weight.dtype).to(weight.device)


def apply_edit(weight: torch.Tensor, edit, *, is_bias: bool = False, device=None) -> torch.Tensor:
    """Apply one plan entry to `weight`: the single dispatch the exporter and evaluator share.

    `edit` is anything with `direction`, `scale`, `hidden_axis`, `norm_preserve` and
    `preserve` (a `recipe.PlanEntry`, or the evaluator's resolved edit); `is_bias` says the
    tensor is the entry's writer bias rather than its weight. An edit with `rows` (router
    suppression) edits only those router rows (`suppress_rows`).
    """
    if is_bias:
        return ablate_bias(weight, edit.direction, edit.scale)
    rows = getattr(edit, "rows", None)
    if rows is not None:
        return suppress_rows(
            weight,
            edit.direction,
            edit.scale,
            tuple(rows),
            norm_preserve=edit.norm_preserve,
            device=device,
        )
    return ablate_tensor(
        weight,
        edit.direction,
        edit.scale,
        hidden_axis=edit.hidden_axis,
        norm_preserve=edit.norm_preserve,
        preserve=edit.preserve,
        device=device,
    )
