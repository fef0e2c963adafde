"""Direction math on measurements: pure functions on tensors.

Why separate from `measure`: recipe resolution, the sweep and the analysis all derive
directions from the same stored means, and must derive them identically.

- `direction(meas, m)`: r = normalize(mean_target[m] - mean_benign[m]) in float64.
- `projected=True`: remove from r its component along the unit benign mean at m (the
  part of the difference that only rescales what benign prompts already have).
- `biprojected`: recipe resolution calls `orthogonalize(r, benign_unit(meas, layer))`
  again at the *target* layer's index.
- `sparsity=p`: zero the fraction p of r's components with the smallest magnitude, then
  renormalize (p = 0 keeps r dense). This is the plain meaning of "sparsity".
"""

from __future__ import annotations

import math

import torch

from .errors import AbliterateError

# Below this a norm counts as zero: the one threshold of every module that normalizes.
EPS = 1e-12


def normalize(v: torch.Tensor) -> torch.Tensor:
    """`v` as a float64 unit vector; a zero vector cannot be a direction, so it raises."""
    v = v.to(torch.float64)
    norm = v.norm()
    if not torch.isfinite(norm) or norm <= EPS:
        raise AbliterateError("the direction has zero length: the two class means coincide there.")
    return v / norm


def orthogonalize(r: torch.Tensor, against: torch.Tensor) -> torch.Tensor:
    """Unit r with its component along `against` removed (two Gram-Schmidt passes)."""
    u = normalize(against)
    r = r.to(torch.float64)
    for _ in range(2):  # the second pass removes what float cancellation left behind
        r = r - (r @ u) * u
    return normalize(r)


def sparsify(r: torch.Tensor, p: float) -> torch.Tensor:
    """Zero the fraction `p` of components with the smallest magnitude; renormalize."""
    if not 0.0 <= p < 1.0:
        raise AbliterateError(f"sparsity {p} is invalid; expected a fraction in [0, 1).")
    r = r.to(torch.float64)
    drop = math.floor(p * r.numel())
    if drop == 0:
        return normalize(r)
    smallest = r.abs().argsort()[:drop]
    kept = r.clone()
    kept[smallest] = 0.0
    return normalize(kept)


def benign_unit(meas, m: int) -> torch.Tensor:
    """The unit benign mean at measurement index `m`."""
    return normalize(meas.benign_mean[meas.check_index(m)])


def raw_direction(meas, m: int) -> torch.Tensor:
    """mean_target[m] - mean_benign[m] (float64, not normalized)."""
    m = meas.check_index(m)
    return (meas.target_mean[m] - meas.benign_mean[m]).to(torch.float64)


def direction(
    meas,
    m: int,
    *,
    sparsity: float = 0.0,
    projected: bool = False,
    biprojected_at: int | None = None,
) -> torch.Tensor:
    """The unit direction at measurement index `m` (float64 [d]).

    `projected` orthogonalizes against the benign mean at `m`; `biprojected_at=k` also
    against the benign mean at index k (the target layer's), as recipe resolution needs.
    Sparsity is applied last, so the returned vector is exactly what gets ablated.
    """
    r = raw_direction(meas, m)
    if not torch.isfinite(r).all():
        source = getattr(meas, "meta", {}).get("source_file", "the measurements")
        raise AbliterateError(
            f"{source}: measurement index {m} holds non-finite values (NaN or inf) in its "
            "target or benign mean, so it defines no direction; re-run the measurement."
        )
    try:
        r = normalize(r)
    except AbliterateError:
        raise AbliterateError(
            f"measurement index {m} has identical target and benign means, so it defines no "
            "direction; choose another index."
        ) from None
    if projected:
        r = orthogonalize(r, meas.benign_mean[m])
    if biprojected_at is not None:
        r = orthogonalize(r, meas.benign_mean[meas.check_index(biprojected_at)])
    return sparsify(r, sparsity)
