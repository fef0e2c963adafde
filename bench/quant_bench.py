"""Benchmark: how much precision the quantized edit costs, against editing in bf16.

For GLM-4.5-Air-shaped tensors (o_proj [4096, 12288] and an expert down_proj
[4096, 1408], 128 x 128 FP8 blocks, 1408 = 11 blocks so no padding; a dense down_proj
[4096, 10944] with a partial last block column) and gpt-oss-20b-shaped MXFP4 experts
(down_proj [4, 2880, 2880] as 4 of 32 experts), it starts from a quantized source (the
way the checkpoint is shipped), takes the exact float32 edit of its dequantized values as
the reference, and reports for each storage of the result (FP8 / MXFP4 requantized, or
bf16):

- `rel_error`: |W'_stored - W'_exact|_F / |W'_exact|_F,
- `residual`: |r^T W'_stored|_F / |r^T W_source|_F, what is left of the removed
  component (0 would be exact; the s = 1 norm-preserving edit removes it entirely),
- `col_norm_drift`: the largest relative change of a column (write vector) norm.

Weights are Gaussian with a few large outliers per row, as trained LLM weights have; r
is a random unit vector mixed with the weights' top singular direction, so r^T W is not
negligible. Prints JSON; docs/quantized.md quotes the numbers.

    .venv/bin/python bench/quant_bench.py
"""

from __future__ import annotations

import json

import torch

from abliterate import quant
from abliterate.edit import ablate_tensor


def weights(shape, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=generator) * 0.02
    outliers = torch.rand(shape, generator=generator) < 1e-3
    return torch.where(outliers, w * 20, w)


def direction(w: torch.Tensor, hidden_axis: int, seed: int) -> torch.Tensor:
    """A unit vector that W actually writes along: half random, half W's top direction."""
    generator = torch.Generator().manual_seed(seed)
    matrix = w.movedim(hidden_axis, 0).reshape(w.shape[hidden_axis], -1)  # hidden x vectors
    top = torch.linalg.svd(matrix[:, :2048], full_matrices=False).U[:, 0]
    r = torch.randn(w.shape[hidden_axis], generator=generator)
    r = r / r.norm() + top
    return r / r.norm()


def report(source: torch.Tensor, stored: torch.Tensor, exact: torch.Tensor, r, axis) -> dict:
    def along(w):
        return torch.tensordot(w, r, dims=([axis], [0]))

    drift = (stored.norm(dim=axis) / source.norm(dim=axis).clamp_min(1e-12) - 1).abs().max()
    return {
        "rel_error": round(((stored - exact).norm() / exact.norm()).item(), 5),
        "residual": round((along(stored).norm() / along(source).norm()).item(), 5),
        "col_norm_drift": round(drift.item(), 5),
    }


def fp8_case(name: str, shape, seed: int) -> dict:
    q, s = quant.quantize_fp8_blocks(weights(shape, seed))
    source = quant.dequantize_fp8_blocks(q, s)
    r = direction(source, 0, seed)

    def edit(w):
        return ablate_tensor(w, r, 1.0, hidden_axis=0)

    exact = edit(source)
    q2, s2 = quant.edit_fp8(q, s, edit)
    as_fp8 = quant.dequantize_fp8_blocks(q2, s2)
    as_bf16 = edit(source.to(torch.bfloat16)).float()
    untouched = quant.dequantize_fp8_blocks(*quant.quantize_fp8_blocks(source))
    return {
        "tensor": name,
        "shape": list(shape),
        "fp8_requantized": report(source, as_fp8, exact, r, 0),
        "bf16": report(source, as_bf16, exact, r, 0),
        "fp8_round_trip_rel_error": round(((untouched - source).norm() / source.norm()).item(), 5),
    }


def mxfp4_case(name: str, shape, seed: int) -> dict:
    blocks, scales = quant.mxfp4_from_parameter(weights(shape, seed))
    source = quant.mxfp4_parameter(blocks, scales)
    axis = 2  # gpt-oss down_proj [E, intermediate, hidden]
    r = direction(source, axis, seed)

    def edit(w):
        return ablate_tensor(w, r, 1.0, hidden_axis=axis)

    exact = edit(source)
    as_mxfp4 = quant.mxfp4_parameter(*quant.edit_mxfp4(blocks, scales, edit, output="requantize"))
    as_bf16 = quant.edit_mxfp4(blocks, scales, edit, output="bf16").float()
    again = quant.mxfp4_parameter(*quant.mxfp4_from_parameter(source))
    return {
        "tensor": name,
        "shape": list(shape),
        "mxfp4_requantized": report(source, as_mxfp4, exact, r, axis),
        "bf16": report(source, as_bf16, exact, r, axis),
        "mxfp4_requantize_unedited_exact": bool(torch.equal(again, source)),
    }


def main() -> None:
    torch.set_num_threads(2)
    results = [
        fp8_case("GLM-4.5-Air o_proj", (4096, 12288), 0),
        fp8_case("GLM-4.5-Air expert down_proj", (4096, 1408), 1),
        fp8_case("GLM-4.5-Air dense down_proj (partial blocks)", (4096, 10944), 2),
        mxfp4_case("gpt-oss-20b down_proj, 4 experts", (4, 2880, 2880), 3),
    ]
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
