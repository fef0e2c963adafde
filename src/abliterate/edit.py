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


def _edit_keeping_hidden_unit_norms(
    matrix: torch.Tensor, r: torch.Tensor, scale: float, axis: int
) -> None:
    """`preserve: other` on a float32 2-D `matrix`, in place: project, then give every
    hidden unit (the slices across the other axis) its norm from before the edit.

    Why not streamed like the default: those norms span every vector, so they need the
    whole edited matrix; this rarely used mode keeps one float32 copy instead.
    """
    other = 1 - axis
    before = matrix.norm(dim=other, keepdim=True)
    if axis == 0:
        matrix.addr_(r, r @ matrix, alpha=-scale)
    else:
        matrix.addr_(matrix @ r, r, alpha=-scale)
    matrix.mul_(before / matrix.norm(dim=other, keepdim=True).clamp_min(EPS))


# float32 elements per block of the streamed CPU edit: 1 MiB, about one core's L2 cache
BLOCK_ELEMENTS = 1 << 18


def _block_rows(rows: int, cols: int, device: torch.device) -> int:
    """Rows per block: L2-sized on CPU; the whole matrix on an accelerator, where one big
    kernel beats many small ones."""
    if device.type != "cpu":
        return max(1, rows)
    return max(1, min(rows, BLOCK_ELEMENTS // max(1, cols)))


def _edit_rows(block: torch.Tensor, r: torch.Tensor, scale: float, norm_preserve: bool) -> None:
    """Edit a float32 block whose rows are the vectors (hidden axis 1), in place."""
    projections = block @ r
    if not norm_preserve:
        block.addr_(projections, r, alpha=-scale)
        return
    norms = torch.linalg.vector_norm(block, dim=1)
    factor = _norm_factor(projections, norms, scale)
    block.mul_(factor.unsqueeze(1))
    block.addr_(projections * factor, r, alpha=-scale)


def _norm_factor(projections: torch.Tensor, norms: torch.Tensor, scale: float) -> torch.Tensor:
    """|v| / |v - s (r.v) r| for unit r, from p = r.v / |v|: sqrt(1 - (2s - s^2) p^2)^-1
    (1 for a zero vector), so the edited vector keeps its norm without normalising twice."""
    p = projections / norms.clamp_min(EPS)
    factor = (1.0 - (2.0 * scale - scale * scale) * p * p).clamp_min(EPS).rsqrt()
    return torch.where(norms > EPS, factor, torch.ones_like(factor))


def _column_reductions(
    weight: torch.Tensor, r: torch.Tensor, step: int, buffer: torch.Tensor, with_squares: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum_i r_i W_ij, sum_i W_ij^2 or None) over all rows of a 2-D `weight`, `step` rows
    at a time through the float32 `buffer`: the reducing pass for vectors along axis 0
    (columns), shared by the edit and the verifier's invariants."""
    rows, cols = weight.shape
    projections = torch.zeros(cols, dtype=torch.float32, device=buffer.device)
    squares = torch.zeros(cols, dtype=torch.float32, device=buffer.device) if with_squares else None
    ones = torch.ones(step, dtype=torch.float32, device=buffer.device)
    for i in range(0, rows, step):
        block = buffer[: min(step, rows - i)]
        block.copy_(weight[i : i + step])
        projections.addmv_(block.t(), r[i : i + step])
        if squares is not None:
            squares.addmv_(block.square_().t(), ones[: block.shape[0]])
    return projections, squares


def _edit_streamed(
    weight: torch.Tensor,
    out: torch.Tensor,
    r: torch.Tensor,
    scale: float,
    axis: int,
    norm_preserve: bool,
    compute: torch.device,
) -> None:
    """Write the edit of a 2-D `weight` (any float dtype) into `out`, block of rows by block.

    Why blocks: converting the whole tensor to float32 and making five passes over it is
    bound by memory bandwidth and page faults (a fresh 200 MB buffer per o_proj); a block
    of rows that fits in cache is converted, reduced or edited and written back while it is
    hot, so the edit runs at several GB/s per core. Vectors along axis 1 (readers, rows)
    are edited block-locally in one pass. Vectors along axis 0 (writers, columns) need
    their projections (and norms) over all rows first: one reducing pass, then one
    editing pass, each reading the source block again. `out` may be `weight` itself.
    """
    rows, cols = weight.shape
    step = _block_rows(rows, cols, compute)
    buffer = torch.empty(step, cols, dtype=torch.float32, device=compute)
    if axis == 1:
        for i in range(0, rows, step):
            block = buffer[: min(step, rows - i)]
            block.copy_(weight[i : i + step])
            _edit_rows(block, r, scale, norm_preserve)
            out[i : i + step].copy_(block)
        return
    projections, squares = _column_reductions(weight, r, step, buffer, norm_preserve)
    if squares is not None:
        factor = _norm_factor(projections, squares.sqrt(), scale)
        coefficients = projections * factor
    else:
        factor, coefficients = None, projections
    for i in range(0, rows, step):
        block = buffer[: min(step, rows - i)]
        block.copy_(weight[i : i + step])
        if factor is not None:
            block.mul_(factor)
        block.addr_(r[i : i + step], coefficients, alpha=-scale)
        out[i : i + step].copy_(block)


def vector_stats(
    weight: torch.Tensor, r: torch.Tensor, axis: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r . v, |v|) in float32 for every vector v of a 2-D `weight` laid along `axis`.

    Streamed in cache-sized blocks of rows like the edit, so checking an edited o_proj
    costs no float32 or transposed copy of it (the verifier's invariants).
    """
    compute = torch.device(device) if device is not None else weight.device
    r = r.to(compute, torch.float32)
    rows, cols = weight.shape
    step = _block_rows(rows, cols, compute)
    buffer = torch.empty(step, cols, dtype=torch.float32, device=compute)
    if axis == 1:
        projections = torch.empty(rows, dtype=torch.float32, device=compute)
        norms = torch.empty(rows, dtype=torch.float32, device=compute)
        for i in range(0, rows, step):
            block = buffer[: min(step, rows - i)]
            block.copy_(weight[i : i + step])
            projections[i : i + step] = block @ r
            norms[i : i + step] = torch.linalg.vector_norm(block, dim=1)
        return projections, norms
    projections, squares = _column_reductions(weight, r, step, buffer, with_squares=True)
    return projections, squares.sqrt()


def hidden_vector_stats(
    tensor: torch.Tensor, r: torch.Tensor, hidden_axis: int, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r . v, |v|) for every hidden-axis vector v of `tensor` (any rank), flattened.

    The vectors are those `ablate_tensor` edits: along `hidden_axis`, per leading slice for
    a fused 3-D tensor whose hidden axis is not the first. Streamed like the edit.
    """
    hidden_axis = hidden_axis % tensor.ndim
    if tensor.ndim >= 3 and hidden_axis != 0:
        stats = [hidden_vector_stats(t, r, hidden_axis - 1, device) for t in tensor]
        return torch.cat([p for p, _ in stats]), torch.cat([n for _, n in stats])
    if tensor.ndim == 1:
        return hidden_vector_stats(tensor.unsqueeze(0), r, 1, device)
    shape = (tensor.shape[0], -1) if hidden_axis == 0 else (-1, tensor.shape[-1])
    return vector_stats(tensor.reshape(shape), r, 0 if hidden_axis == 0 else 1, device)


def edit_errors(before, after, scale: float, norm_preserve: bool) -> tuple[float, float]:
    """How far an edited tensor is from the edit's exact effect on each vector's component
    along r and on its norm: (max |r.v' - expected| / |v|, max ||v'| - expected| / |v|).

    `before` and `after` are `hidden_vector_stats` of the source and of the edited tensor
    as stored. The edit v' = f (v - s (r.v) r), with f = |v| / |v - s (r.v) r| when
    norm-preserving (else 1), gives r.v' = (1 - s) f (r.v) and
    |v'| = f sqrt(|v|^2 - (2s - s^2) (r.v)^2), so both are known from (r.v, |v|) alone at
    any scale. Why this exists: the exporter checks its edit on the tensor in memory, from
    two cheap reducing passes, before it writes it, so verification need not read the
    source and recompute the edit (`verify(..., written=...)`).
    """
    p, n = before
    p_after, n_after = after
    remaining = (n * n - (2.0 * scale - scale * scale) * p * p).clamp_min(0.0).sqrt()
    if norm_preserve:
        factor = _norm_factor(p, n, scale)
        expected_p, expected_n = (1.0 - scale) * factor * p, n
    else:
        expected_p, expected_n = (1.0 - scale) * p, remaining
    denominator = n.clamp_min(1e-12)
    residual = ((p_after - expected_p).abs() / denominator).max().item() if p.numel() else 0.0
    drift = ((n_after - expected_n).abs() / denominator).max().item() if p.numel() else 0.0
    return residual, drift


def ablate_tensor(
    weight: torch.Tensor,
    direction: torch.Tensor,
    scale: float = 1.0,
    *,
    hidden_axis: int,
    norm_preserve: bool = True,
    preserve: str = "hidden",
    device: str | torch.device | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return `weight` with `scale` times its component along `direction` removed.

    `hidden_axis` is the axis of `weight` that indexes the residual stream (0 for an
    nn.Linear writer [d, in], 1 for a reader [out, d] or an embedding [vocab, d], the last
    axis for gpt-oss' fused down_proj [E, intermediate, d]); it comes from the architecture
    registry, never from the shape. Computation is float32 on `device` (default: the
    weight's); the result has the weight's dtype and device. 3-D tensors are processed one
    leading slice (expert) at a time, so peak memory is one expert, not the whole tensor.
    s = 1 removes the component, s = 2 reflects it, s < 0 adds it. `out` (same dtype,
    shape and device as `weight`, contiguous; `weight` itself for an in-place edit)
    receives the result instead of a new tensor, which is what lets the exporter reuse
    one buffer per worker.
    """
    if preserve not in PRESERVE_MODES:
        raise ValueError(f"preserve must be one of {PRESERVE_MODES}, got {preserve!r}")
    hidden_axis = hidden_axis % weight.ndim
    if weight.shape[hidden_axis] != direction.numel():
        raise ValueError(
            f"direction has {direction.numel()} components but the tensor's hidden axis "
            f"{hidden_axis} has size {weight.shape[hidden_axis]} (shape {tuple(weight.shape)})"
        )
    if out is None:
        out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    compute = torch.device(device) if device is not None else weight.device
    r = unit(direction).to(compute)
    if weight.ndim >= 3 and hidden_axis != 0:
        for i in range(weight.shape[0]):
            ablate_tensor(
                weight[i],
                direction,
                scale,
                hidden_axis=hidden_axis - 1,
                norm_preserve=norm_preserve,
                preserve=preserve,
                device=compute,
                out=out[i],
            )
        return out
    if weight.ndim == 1:  # a single vector (a bias): plain projection
        vector = weight.detach().to(compute, torch.float32)
        out.copy_(vector - scale * (vector @ r) * r)
        return out
    # 2-D, or N-D with the hidden axis first: vectors along axis 0 of a [d, rest] matrix
    source = weight.detach()
    if source.ndim > 2:
        source = source.reshape(source.shape[0], -1)
    target = out.view(source.shape)
    if norm_preserve and preserve == "other":
        matrix = source.to(compute, torch.float32, copy=True)
        _edit_keeping_hidden_unit_norms(matrix, r, scale, hidden_axis)
        target.copy_(matrix)
        return out
    _edit_streamed(source, target, r, scale, hidden_axis, norm_preserve, compute)
    return out


def ablate_bias(
    bias: torch.Tensor, direction: torch.Tensor, scale: float = 1.0, *, out=None
) -> torch.Tensor:
    """Remove `scale` times the direction from a writer's bias (last axis is hidden).

    Biases are plain-projected: a bias is one vector written into the residual on every
    token, and rescaling it to its old norm would re-inject the removed magnitude elsewhere.
    """
    return ablate_tensor(bias, direction, scale, hidden_axis=-1, norm_preserve=False, out=out)


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
        edited = ablate_tensor(
            chosen[positive], r, scale, hidden_axis=1, norm_preserve=norm_preserve
        )
        matrix.index_copy_(0, picked, edited)
    return matrix.to(weight.dtype).to(weight.device)


def apply_edit(
    weight: torch.Tensor, edit, *, is_bias: bool = False, device=None, out=None
) -> torch.Tensor:
    """Apply one plan entry to `weight`: the single dispatch the exporter and evaluator share.

    `edit` is anything with `direction`, `scale`, `hidden_axis`, `norm_preserve` and
    `preserve` (a `recipe.PlanEntry`, or the evaluator's resolved edit); `is_bias` says the
    tensor is the entry's writer bias rather than its weight; `out` as in `ablate_tensor`.
    An edit with `rows` (router suppression) edits only those router rows (`suppress_rows`).
    """
    if is_bias:
        return ablate_bias(weight, edit.direction, edit.scale, out=out)
    rows = getattr(edit, "rows", None)
    if rows is not None:
        edited = suppress_rows(
            weight,
            edit.direction,
            edit.scale,
            tuple(rows),
            norm_preserve=edit.norm_preserve,
            device=device,
        )
        return edited if out is None else out.copy_(edited)
    return ablate_tensor(
        weight,
        edit.direction,
        edit.scale,
        hidden_axis=edit.hidden_axis,
        norm_preserve=edit.norm_preserve,
        preserve=edit.preserve,
        device=device,
        out=out,
    )
