"""The tensor edit's invariants on random matrices: the math a user relies on."""

from __future__ import annotations

import pytest
import torch

from abliterate.edit import ablate_bias, ablate_tensor

D = 48  # hidden size
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def random_direction(seed: int = 0, d: int = D) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(d, generator=g, dtype=torch.float64)
    return (r / r.norm()).to(torch.float32)


def random_weight(shape, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def vectors(weight: torch.Tensor, hidden_axis: int) -> torch.Tensor:
    """The vectors laid along the hidden axis, as float32 rows [n, d]."""
    w = weight.to(torch.float32).movedim(hidden_axis, -1)
    return w.reshape(-1, w.shape[-1])


# (shape, hidden_axis): writer [d, in], reader [out, d], gpt-oss fused down_proj
# [E, intermediate, d], a fused tensor whose hidden axis is in the middle, and the
# hidden == intermediate case where only the registry's axis tells them apart.
ORIENTATIONS = [
    ((D, 20), 0),
    ((12, D), 1),
    ((3, 20, D), 2),
    ((3, D, 20), 1),
    ((4, D, D), 2),
    ((4, D, D), 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,hidden_axis", ORIENTATIONS)
def test_scale_one_removes_the_direction_and_keeps_every_norm(shape, hidden_axis, dtype):
    r = random_direction()
    w = random_weight(shape, dtype)
    edited = ablate_tensor(w, r, 1.0, hidden_axis=hidden_axis)
    assert edited.dtype == dtype and edited.shape == w.shape
    before, after = vectors(w, hidden_axis), vectors(edited, hidden_axis)
    norms = before.norm(dim=-1)
    # r^T W' = 0 for every vector along the hidden axis, within the dtype's rounding
    assert ((after @ r).abs() / norms).max() < TOL[dtype]
    # every such vector keeps its norm
    assert ((after.norm(dim=-1) - norms).abs() / norms).max() < TOL[dtype]
    # and it really changed (the direction had a component to remove)
    assert not torch.equal(edited, w)


def test_hidden_equal_intermediate_uses_the_given_axis_not_the_shape():
    r = random_direction()
    w = random_weight((2, D, D))
    along_last = ablate_tensor(w, r, 1.0, hidden_axis=2)
    along_middle = ablate_tensor(w, r, 1.0, hidden_axis=1)
    assert (vectors(along_last, 2) @ r).abs().max() < 1e-5
    assert (vectors(along_middle, 1) @ r).abs().max() < 1e-5
    assert (vectors(along_last, 1) @ r).abs().max() > 1e-2  # the other axis is untouched


def test_writer_plain_projection_is_w_minus_r_rt_w():
    r = random_direction().to(torch.float64)
    w = random_weight((D, 20)).to(torch.float64)
    for s in (1.0, 0.5, 2.0, -1.0):
        edited = ablate_tensor(w, r, s, hidden_axis=0, norm_preserve=False)
        expected = w - s * torch.outer(r, r @ w)
        torch.testing.assert_close(edited, expected, rtol=1e-5, atol=1e-5)


def test_reader_plain_projection_is_w_minus_w_r_rt():
    r = random_direction().to(torch.float64)
    w = random_weight((12, D)).to(torch.float64)
    edited = ablate_tensor(w, r, 0.5, hidden_axis=1, norm_preserve=False)
    torch.testing.assert_close(edited, w - 0.5 * torch.outer(w @ r, r), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm_preserve", [False, True])
def test_scale_two_reflects_the_component(norm_preserve):
    r = random_direction()
    w = random_weight((D, 20))
    edited = ablate_tensor(w, r, 2.0, hidden_axis=0, norm_preserve=norm_preserve)
    before, after = r @ w, r @ edited
    if norm_preserve:  # unit columns reflect exactly, then get their own norm back
        torch.testing.assert_close(after, -before, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(edited.norm(dim=0), w.norm(dim=0))
    else:
        torch.testing.assert_close(after, -before, rtol=1e-5, atol=1e-5)


def test_negative_scale_adds_the_direction():
    r = random_direction()
    w = random_weight((D, 20))
    plain = ablate_tensor(w, r, -1.0, hidden_axis=0, norm_preserve=False)
    torch.testing.assert_close(r @ plain, 2 * (r @ w))
    kept = ablate_tensor(w, r, -1.0, hidden_axis=0)
    cosine_before = (r @ w) / w.norm(dim=0)
    cosine_after = (r @ kept) / kept.norm(dim=0)
    assert (cosine_after.abs() > cosine_before.abs()).all()  # more aligned with r
    torch.testing.assert_close(kept.norm(dim=0), w.norm(dim=0))


def test_fractional_scale_shrinks_the_component_monotonically():
    r = random_direction()
    w = random_weight((D, 20))
    parts = [(r @ ablate_tensor(w, r, s, hidden_axis=0)).abs().sum() for s in (0, 0.25, 0.5, 1)]
    assert parts[0] > parts[1] > parts[2] > parts[3]
    assert torch.equal(ablate_tensor(w, r, 0.0, hidden_axis=0, norm_preserve=False), w)


def test_preserve_other_keeps_the_norms_across_the_other_axis():
    r = random_direction()
    w = random_weight((D, 20))
    edited = ablate_tensor(w, r, 1.0, hidden_axis=0, preserve="other")
    torch.testing.assert_close(edited.norm(dim=1), w.norm(dim=1))
    # ...which is why it is only an option: the direction is no longer fully removed
    assert (r @ edited).abs().max() > 1e-3


def test_bias_is_plain_projected():
    r = random_direction()
    b = random_weight((D,))
    edited = ablate_bias(b, r)
    assert abs(float(edited @ r)) < 1e-5
    torch.testing.assert_close(edited, b - (b @ r) * r)
    fused = random_weight((3, D))  # gpt-oss down_proj_bias [E, hidden]
    assert (ablate_bias(fused, r) @ r).abs().max() < 1e-5


def test_direction_is_normalised_and_its_size_checked():
    w = random_weight((D, 20))
    r = random_direction()
    torch.testing.assert_close(
        ablate_tensor(w, 7.0 * r, 1.0, hidden_axis=0), ablate_tensor(w, r, 1.0, hidden_axis=0)
    )
    with pytest.raises(ValueError, match="hidden axis"):
        ablate_tensor(w, random_direction(d=D + 1), 1.0, hidden_axis=0)
    with pytest.raises(ValueError, match="zero"):
        ablate_tensor(w, torch.zeros(D), 1.0, hidden_axis=0)


def test_storage_dtype_result_is_the_rounded_float32_result():
    r = random_direction()
    w = random_weight((D, 20), torch.bfloat16)
    edited = ablate_tensor(w, r, 1.0, hidden_axis=0)
    reference = ablate_tensor(w.to(torch.float32), r, 1.0, hidden_axis=0).to(torch.bfloat16)
    assert torch.equal(edited, reference)


# Shapes that span several cache-sized blocks with a remainder (edit.BLOCK_ELEMENTS):
# a writer [d, in] and a reader [out, d].
BLOCKED = [((700, 1000), 0), ((1200, 500), 1)]


def reference_edit(weight: torch.Tensor, r: torch.Tensor, scale: float, hidden_axis: int):
    """Norm-preserving edit in float64, straight from the definition: v' = |v| u'/|u'|."""
    w = weight.to(torch.float64).movedim(hidden_axis, -1)
    r = r.to(torch.float64)
    edited = w - scale * (w @ r).unsqueeze(-1) * r
    edited = edited * (w.norm(dim=-1) / edited.norm(dim=-1)).unsqueeze(-1)
    return edited.movedim(-1, hidden_axis)


@pytest.mark.parametrize(("shape", "hidden_axis"), BLOCKED)
@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_the_blockwise_edit_matches_the_definition_across_block_boundaries(
    shape, hidden_axis, scale
):
    from abliterate.edit import BLOCK_ELEMENTS

    other = shape[1 - hidden_axis]
    assert shape[0] % (BLOCK_ELEMENTS // shape[1]) != 0 and shape[0] > BLOCK_ELEMENTS // shape[1]
    r = random_direction(3, shape[hidden_axis])
    weight = random_weight(shape, seed=4)
    edited = ablate_tensor(weight, r, scale, hidden_axis=hidden_axis)
    expected = reference_edit(weight, r, scale, hidden_axis)
    assert (edited.to(torch.float64) - expected).abs().max() < 1e-5 * max(other, 1) ** 0.5


@pytest.mark.parametrize(("shape", "hidden_axis"), BLOCKED + [((3, 20, D), 2)])
@pytest.mark.parametrize("norm_preserve", [True, False])
def test_editing_in_place_or_into_out_gives_the_same_bits(shape, hidden_axis, norm_preserve):
    """The exporter edits its read buffer in place; the evaluator gets a new tensor: both
    must be bit-identical, or the export would not be what the sweep evaluated."""
    r = random_direction(5, shape[hidden_axis])
    weight = random_weight(shape, torch.bfloat16, seed=6)
    kwargs = {"hidden_axis": hidden_axis, "norm_preserve": norm_preserve}
    fresh = ablate_tensor(weight, r, 1.0, **kwargs)
    into = ablate_tensor(weight, r, 1.0, out=torch.empty_like(weight), **kwargs)
    in_place = weight.clone()
    ablate_tensor(in_place, r, 1.0, out=in_place, **kwargs)
    assert torch.equal(fresh.view(torch.int16), into.view(torch.int16))
    assert torch.equal(fresh.view(torch.int16), in_place.view(torch.int16))
    assert not torch.equal(fresh.view(torch.int16), weight.view(torch.int16))


@pytest.mark.parametrize(("shape", "hidden_axis"), BLOCKED + [((3, 20, D), 2), ((3, D, 20), 1)])
def test_the_streamed_invariant_check_agrees_with_the_whole_matrix_one(shape, hidden_axis):
    """verify measures residual and norm drift block by block; on any tensor it must report
    what the direct float32 computation does."""
    from types import SimpleNamespace

    from abliterate.verify import invariant_errors

    r = random_direction(7, shape[hidden_axis])
    weight = random_weight(shape, torch.bfloat16, seed=8)
    edited = ablate_tensor(weight, r, 1.0, hidden_axis=hidden_axis)
    entry = SimpleNamespace(direction=r, preserve="hidden")
    residual, drift = invariant_errors(weight, edited, entry, hidden_axis)
    before, after = vectors(weight, hidden_axis), vectors(edited, hidden_axis)
    scale = before.norm(dim=-1)
    assert residual == pytest.approx(((after @ r).abs() / scale).max().item(), rel=1e-3, abs=1e-7)
    assert drift == pytest.approx(
        ((after.norm(dim=-1) - scale).abs() / scale).max().item(), rel=1e-3, abs=1e-7
    )
    assert 0 < drift < 2e-2 and residual < 2e-2  # bf16 rounding, not a broken edit


@pytest.mark.parametrize(("shape", "hidden_axis"), BLOCKED)
def test_the_edit_has_the_same_bits_with_one_or_two_torch_threads(shape, hidden_axis):
    """The exporter's workers run the edit with one torch thread each, the evaluator with
    the process's count: the export equals the evaluation only if the bits do not depend
    on it."""
    r = random_direction(9, shape[hidden_axis])
    weight = random_weight(shape, torch.bfloat16, seed=10)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(ablate_tensor(weight, r, 1.0, hidden_axis=hidden_axis))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0].view(torch.int16), results[1].view(torch.int16))


@pytest.mark.parametrize(("shape", "hidden_axis"), [((D, 40), 0), ((40, D), 1), ((3, 20, D), 2)])
@pytest.mark.parametrize("norm_preserve", [True, False])
@pytest.mark.parametrize("scale", [1.0, 0.7, -0.5, 1.5])
def test_the_in_memory_check_knows_the_edit_at_any_scale(shape, hidden_axis, norm_preserve, scale):
    """The exporter judges each edit from (r.v, |v|) before and after; the real edit must pass
    at every scale and mode, and an edit at another scale must not."""
    from abliterate.edit import edit_errors, hidden_vector_stats
    from abliterate.verify import tolerance

    r = random_direction(11, shape[hidden_axis])
    weight = random_weight(shape, torch.bfloat16, seed=12)
    before = hidden_vector_stats(weight, r, hidden_axis)
    kwargs = {"hidden_axis": hidden_axis, "norm_preserve": norm_preserve}
    edited = ablate_tensor(weight, r, scale, **kwargs)
    residual, drift = edit_errors(
        before, hidden_vector_stats(edited, r, hidden_axis), scale, norm_preserve
    )
    assert residual <= tolerance("BF16") and drift <= tolerance("BF16")
    wrong = ablate_tensor(weight, r, scale - 0.3, **kwargs)
    errors = edit_errors(before, hidden_vector_stats(wrong, r, hidden_axis), scale, norm_preserve)
    assert max(errors) > tolerance("BF16")


def test_the_in_memory_check_of_a_bias():
    from abliterate.edit import edit_errors, hidden_vector_stats

    r = random_direction(13, D)
    bias = random_weight((D,), torch.float32, seed=14)
    before = hidden_vector_stats(bias, r, -1)
    after = hidden_vector_stats(ablate_bias(bias, r, 0.8), r, -1)
    assert max(edit_errors(before, after, 0.8, norm_preserve=False)) < 1e-5
