"""Direction math against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from abliterate.directions import direction, orthogonalize, sparsify
from abliterate.errors import AbliterateError
from abliterate.measure import Measurements


def meas_of(target, benign) -> Measurements:
    target = torch.tensor(target, dtype=torch.float64)
    benign = torch.tensor(benign, dtype=torch.float64)
    empty = torch.zeros(target.shape[0], 0)
    return Measurements(target, benign, empty, empty, meta={"num_layers": target.shape[0] - 1})


# index 0: target (3, 4, 0), benign (0, 0, 0): d = (3, 4, 0), r = (0.6, 0.8, 0)
# index 1: target (2, 1, 0), benign (1, 1, 0): d = (1, 0, 0); benign unit (1, 1, 0)/sqrt 2
MEAS = meas_of([[3.0, 4.0, 0.0], [2.0, 1.0, 0.0]], [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])


def test_direction_is_normalized_difference_of_means():
    assert torch.allclose(direction(MEAS, 0), torch.tensor([0.6, 0.8, 0.0], dtype=torch.float64))
    assert direction(MEAS, 1).dtype == torch.float64


def test_projected_removes_the_benign_mean_component():
    # (1,0,0) - ((1,0,0).(1,1,0)/2)(1,1,0) = (0.5, -0.5, 0) -> (1, -1, 0)/sqrt 2
    expected = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64) / math.sqrt(2)
    assert torch.allclose(direction(MEAS, 1, projected=True), expected)


def test_biprojected_also_removes_benign_mean_at_another_index():
    meas = meas_of([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]], [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # r at 1 = (1,1,0)/sqrt2; projected at 1 (benign (0,0,1)): unchanged; then against
    # benign at 0 = (0,1,0): (1,0,0)
    r = direction(meas, 1, projected=True, biprojected_at=0)
    assert torch.allclose(r, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def test_sparsify_zeroes_the_smallest_fraction_and_renormalizes():
    r = torch.tensor([0.1, -0.8, 0.6, 0.0])
    assert torch.allclose(
        sparsify(r, 0.5), torch.tensor([0.0, -0.8, 0.6, 0.0], dtype=torch.float64)
    )
    dense = sparsify(r, 0.0)
    assert torch.allclose(dense, r.double() / r.double().norm())
    # 0.25 of 4 components: drop exactly one (the 0.0)
    assert (sparsify(r, 0.25) != 0).sum() == 3
    with pytest.raises(AbliterateError, match=r"sparsity 1.0 is invalid"):
        sparsify(r, 1.0)


def test_direction_applies_sparsity_last():
    meas = meas_of([[0.1, -0.8, 0.6, 0.0]], [[0.0, 0.0, 0.0, 0.0]])
    r = direction(meas, 0, sparsity=0.5)
    assert torch.allclose(r, torch.tensor([0.0, -0.8, 0.6, 0.0], dtype=torch.float64))
    assert math.isclose(float(r.norm()), 1.0)


def test_orthogonalize_result_is_orthogonal_unit():
    torch.manual_seed(0)
    r, b = torch.randn(64), torch.randn(64)
    out = orthogonalize(r, b)
    assert abs(float(out @ b.double())) < 1e-10
    assert math.isclose(float(out.norm()), 1.0, rel_tol=1e-12)


def test_coinciding_means_and_bad_index_are_one_sentence():
    meas = meas_of([[1.0, 2.0], [1.0, 2.0]], [[1.0, 2.0], [0.0, 2.0]])
    with pytest.raises(AbliterateError, match="index 0 has identical target and benign means"):
        direction(meas, 0)
    with pytest.raises(AbliterateError, match=r"index 5 is out of range.*0\.\.1"):
        direction(meas, 5)
