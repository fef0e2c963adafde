"""Quantized checkpoints: FP8 block scales, MXFP4 expert blocks, and what cannot be edited.

Why a module of its own: the edit (`edit.ablate_tensor`) is defined on real-valued weights,
so a quantized target is dequantized, edited in float32 and requantized here, and every
other stage (inspection, export) only asks this module what a tensor's storage is.

The formats, as transformers reads them (`integrations/finegrained_fp8.py`, `mxfp4.py`):

- FP8 block quantization (DeepSeek-V3, GLM-4.5-Air-FP8; `quantization_config.quant_method`
  "fp8" with `weight_block_size` [128, 128]): `X` is float8_e4m3fn and `X_scale_inv`
  (float32, stored beside it in the same shard) holds one factor per block of the last two
  axes, `ceil(rows / 128) x ceil(cols / 128)` of them; dequantized = fp8 value times its
  block's `scale_inv`. A block that does not fill 128 x 128 (e.g. 10944 columns) is scaled
  by the values it has.
- MXFP4 (gpt-oss originals; `quant_method` "mxfp4"): a fused expert tensor `X` is stored as
  `X_blocks` uint8 [E, out, in / 32, 16] (two e2m1 values per byte, the low nibble first)
  and `X_scales` uint8 [E, out, in / 32] (e8m0 exponents, bias 127: factor 2^(byte - 127)
  per 32 consecutive values). transformers' parameter is the transpose, [E, in, out]
  (down_proj [E, intermediate, hidden], gate_up_proj [E, hidden, 2 * intermediate]), which
  is the layout the architecture registry's `hidden_axis` refers to.
- bitsandbytes (and GPTQ/AWQ/...): the float weights are gone; such checkpoints can be
  measured (transformers runs them) but not edited.

Requantization error is the price of keeping the format: see docs/quantized.md for the
numbers, which tests/test_quant.py bounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .errors import AbliterateError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_SAFETENSORS_DTYPE = "F8_E4M3"
FP8_SCALE_DTYPES = ("F32", "BF16", "F16")
FP8_SCALE_SUFFIX = "_scale_inv"
DEFAULT_FP8_BLOCK = (128, 128)

# e2m1 code (sign bit 3, exponent bits 2-1, mantissa bit 0) -> value
FP4_VALUES = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)
FP4_MAX = 6.0
E8M0_BIAS = 127
MXFP4_GROUP = 32  # values per scale
MXFP4_BYTES = MXFP4_GROUP // 2  # bytes per group (two values per byte)
MXFP4_BLOCKS_SUFFIX = "_blocks"
MXFP4_SCALES_SUFFIX = "_scales"
# What an edited MXFP4 tensor is written as (`export.mxfp4`, `abliterate ablate --mxfp4`):
# bf16 (the edit holds to bf16 precision, the tensor grows 4x) or requantize (same size and
# byte layout, but 4-bit requantization leaves part of the removed component behind).
# docs/quantized.md has the numbers behind the default.
MXFP4_OUTPUTS = ("bf16", "requantize")
DEFAULT_MXFP4_OUTPUT = "bf16"

EDITABLE_METHODS = ("fp8", "mxfp4")
FULL_PRECISION_NEEDED = (
    "export needs full-precision weights (use the original bf16/fp16 checkpoint, not a "
    "pre-quantized one)"
)


# --------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class CheckpointQuantization:
    """How a checkpoint is quantized, from config.json and, failing that, its tensors.

    `method` is transformers' `quant_method` ("fp8", "mxfp4", "bitsandbytes", "gptq", ...)
    or None for a full-precision checkpoint; `block_size` is FP8's `weight_block_size`
    (None: one scale per tensor).
    """

    method: str | None
    block_size: tuple[int, int] | None = DEFAULT_FP8_BLOCK
    config: Mapping | None = None

    @property
    def editable(self) -> bool:
        return self.method is None or self.method in EDITABLE_METHODS

    def describe(self) -> str:
        if self.method == "bitsandbytes" and self.config:
            bits = "4-bit" if self.config.get("load_in_4bit") else "8-bit"
            return f"bitsandbytes {bits}"
        return self.method or "not quantized"


def _method_name(value) -> str | None:
    """quant_method as a plain lower-case string ("QuantizationMethod.FP8" -> "fp8")."""
    if value is None:
        return None
    text = str(getattr(value, "value", value)).lower()
    return {"bitsandbytes_4bit": "bitsandbytes", "bitsandbytes_8bit": "bitsandbytes"}.get(
        text, text
    )


def checkpoint_quantization(config: Mapping, tensors: Mapping) -> CheckpointQuantization:
    """The quantization of a checkpoint: its config.json (`quantization_config`) first.

    `tensors` maps names to anything with a safetensors `dtype` string (`shards.TensorInfo`);
    it decides only when config.json says nothing (a hand-converted checkpoint that kept
    `weight_scale_inv` or `_blocks` tensors but lost its `quantization_config`).
    """
    quant_config = config.get("quantization_config")
    if quant_config is None and isinstance(config.get("text_config"), Mapping):
        quant_config = config["text_config"].get("quantization_config")
    if isinstance(quant_config, Mapping):
        method = _method_name(quant_config.get("quant_method"))
        if method is None and (
            quant_config.get("load_in_4bit") or quant_config.get("load_in_8bit")
        ):
            method = "bitsandbytes"
        block = quant_config.get("weight_block_size", DEFAULT_FP8_BLOCK)
        block = None if block is None else (int(block[0]), int(block[1]))
        return CheckpointQuantization(method, block, dict(quant_config))
    names = set(tensors)
    if any(
        name.endswith(FP8_SCALE_SUFFIX) and name[: -len(FP8_SCALE_SUFFIX)] in names
        for name in names
    ):
        return CheckpointQuantization("fp8", DEFAULT_FP8_BLOCK, None)
    if any(
        name.endswith(MXFP4_BLOCKS_SUFFIX)
        and name[: -len(MXFP4_BLOCKS_SUFFIX)] + MXFP4_SCALES_SUFFIX in names
        for name in names
    ):
        return CheckpointQuantization("mxfp4", None, None)
    if any(".quant_state." in name or name.endswith(".SCB") for name in names):
        return CheckpointQuantization("bitsandbytes", None, None)
    return CheckpointQuantization(None, None, None)


def require_editable(quantization: CheckpointQuantization, model_dir) -> None:
    """Refuse checkpoints whose float weights are gone (bitsandbytes, GPTQ, AWQ, ...)."""
    if not quantization.editable:
        raise AbliterateError(
            f"{model_dir}: the checkpoint is pre-quantized ({quantization.describe()}), and "
            f"{FULL_PRECISION_NEEDED}."
        )


@dataclass(frozen=True)
class QuantizedTensor:
    """How one logical tensor (a transformers parameter name) is stored on disk.

    FP8: `stored` is (`X`, `X_scale_inv`), the logical key is `X` itself. MXFP4: `stored`
    is (`X_blocks`, `X_scales`) and `X` does not exist on disk; `shape` is transformers'
    parameter shape [E, in, out].
    """

    key: str
    format: str  # "fp8" | "mxfp4"
    stored: tuple[str, str]
    shape: tuple[int, ...]
    block_size: tuple[int, int] | None = None

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "stored": list(self.stored),
            "block_size": None if self.block_size is None else list(self.block_size),
        }


def fp8_scale_key(key: str) -> str:
    """`model.layers.0.self_attn.o_proj.weight` -> `...o_proj.weight_scale_inv`."""
    return key + FP8_SCALE_SUFFIX


def mxfp4_keys(key: str) -> tuple[str, str]:
    """`...mlp.experts.down_proj` -> (`..._blocks`, `..._scales`)."""
    return key + MXFP4_BLOCKS_SUFFIX, key + MXFP4_SCALES_SUFFIX


def fp8_scale_shape(shape, block_size: tuple[int, int] | None) -> tuple[int, ...]:
    """The `weight_scale_inv` shape an FP8 weight of `shape` needs (ceil-divided blocks)."""
    shape = tuple(shape)
    if block_size is None:
        return ()
    rows, cols = shape[-2:]
    return (*shape[:-2], math.ceil(rows / block_size[0]), math.ceil(cols / block_size[1]))


def check_fp8_pair(key: str, weight, scale, block_size: tuple[int, int] | None) -> None:
    """One sentence naming the key when an FP8 weight and its scale tensor do not fit.

    `weight` and `scale` are anything with `.shape` and a safetensors `.dtype` string
    (`shards.TensorInfo`), so the whole checkpoint is checked from headers before a job runs.
    """
    scale_key = fp8_scale_key(key)
    if weight.dtype != FP8_SAFETENSORS_DTYPE:
        raise AbliterateError(
            f"tensor {key!r} has a {scale_key!r} scale but dtype {weight.dtype}; expected "
            f"{FP8_SAFETENSORS_DTYPE} (float8_e4m3fn)."
        )
    if len(weight.shape) < 2:
        raise AbliterateError(
            f"tensor {key!r} has shape {list(weight.shape)}; expected at least 2 dimensions "
            "for an FP8 block-quantized weight."
        )
    if scale.dtype not in FP8_SCALE_DTYPES:
        raise AbliterateError(
            f"scale tensor {scale_key!r} has dtype {scale.dtype}; expected one of "
            f"{', '.join(FP8_SCALE_DTYPES)}."
        )
    expected = fp8_scale_shape(weight.shape, block_size)
    found = tuple(scale.shape)
    per_tensor = block_size is None and math.prod(found) == 1
    if found != expected and not per_tensor:
        raise AbliterateError(
            f"scale tensor {scale_key!r} has shape {list(found)}, but {key!r} "
            f"{list(weight.shape)} with weight_block_size {list(block_size or [])} needs "
            f"{list(expected)} blocks; the scale does not belong to this weight."
        )


def check_mxfp4_pair(key: str, blocks, scales) -> None:
    """One sentence naming the key when MXFP4 blocks and scales do not fit each other."""
    blocks_key, scales_key = mxfp4_keys(key)
    for name, info in ((blocks_key, blocks), (scales_key, scales)):
        if info.dtype != "U8":
            raise AbliterateError(
                f"MXFP4 tensor {name!r} has dtype {info.dtype}; expected U8 (packed e2m1 "
                "values and e8m0 scales are bytes)."
            )
    if len(blocks.shape) < 2 or blocks.shape[-1] != MXFP4_BYTES:
        raise AbliterateError(
            f"MXFP4 tensor {blocks_key!r} has shape {list(blocks.shape)}; expected "
            f"[..., groups, {MXFP4_BYTES}] ({MXFP4_GROUP} values in {MXFP4_BYTES} bytes per group)."
        )
    if tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise AbliterateError(
            f"MXFP4 scale tensor {scales_key!r} has shape {list(scales.shape)}, but "
            f"{blocks_key!r} {list(blocks.shape)} needs {list(blocks.shape[:-1])} (one scale per "
            f"group of {MXFP4_GROUP}); the scales do not belong to these blocks."
        )


def mxfp4_parameter_shape(blocks_shape) -> tuple[int, ...]:
    """transformers' parameter shape [E, in, out] of MXFP4 blocks [E, out, in / 32, 16]."""
    *lead, out, groups, _ = blocks_shape
    return (*lead, groups * MXFP4_GROUP, out)


def quantized_tensors(
    tensors: Mapping, quantization: CheckpointQuantization
) -> dict[str, QuantizedTensor]:
    """Every quantized logical tensor of a checkpoint, validated from its headers.

    `tensors` maps names to `shards.TensorInfo`. FP8 pairs are found by their
    `_scale_inv` sibling, MXFP4 pairs by `_blocks` + `_scales`; a weight in F8_E4M3
    without a scale, or half an MXFP4 pair, is an error naming the key (editing it would
    silently drop its scale).
    """
    found: dict[str, QuantizedTensor] = {}
    if quantization.method == "fp8":
        for name, info in tensors.items():
            scale = tensors.get(fp8_scale_key(name))
            if scale is None:
                if info.dtype == FP8_SAFETENSORS_DTYPE:
                    raise AbliterateError(
                        f"tensor {name!r} is stored as {FP8_SAFETENSORS_DTYPE} but the checkpoint "
                        f"has no {fp8_scale_key(name)!r}; expected a scale tensor beside it."
                    )
                continue
            check_fp8_pair(name, info, scale, quantization.block_size)
            if scale.shard != info.shard:  # the exporter rewrites both in one shard job
                raise AbliterateError(
                    f"scale tensor {fp8_scale_key(name)!r} is in {scale.shard}, not beside "
                    f"{name!r} in {info.shard}; expected each weight and its scale in one shard."
                )
            found[name] = QuantizedTensor(
                name, "fp8", (name, fp8_scale_key(name)), tuple(info.shape), quantization.block_size
            )
    elif quantization.method == "mxfp4":
        for name, info in tensors.items():
            for suffix, other in (
                (MXFP4_BLOCKS_SUFFIX, MXFP4_SCALES_SUFFIX),
                (MXFP4_SCALES_SUFFIX, MXFP4_BLOCKS_SUFFIX),
            ):
                if name.endswith(suffix) and name[: -len(suffix)] + other not in tensors:
                    raise AbliterateError(
                        f"MXFP4 tensor {name!r} has no {name[: -len(suffix)] + other!r} beside "
                        "it; expected blocks and scales in pairs."
                    )
            if not name.endswith(MXFP4_BLOCKS_SUFFIX):
                continue
            key = name[: -len(MXFP4_BLOCKS_SUFFIX)]
            scales = tensors[key + MXFP4_SCALES_SUFFIX]
            check_mxfp4_pair(key, info, scales)
            if scales.shard != info.shard:  # one shard job rewrites (or replaces) both
                raise AbliterateError(
                    f"MXFP4 tensor {key + MXFP4_SCALES_SUFFIX!r} is in {scales.shard}, not "
                    f"beside {name!r} in {info.shard}; expected blocks and scales in one shard."
                )
            found[key] = QuantizedTensor(
                key, "mxfp4", mxfp4_keys(key), mxfp4_parameter_shape(info.shape)
            )
    return found


# --------------------------------------------------------------------------- FP8 math


def _block_pad(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    return (-rows) % block[0], (-cols) % block[1]


def dequantize_fp8_blocks(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size: tuple[int, int] | None = DEFAULT_FP8_BLOCK,
) -> torch.Tensor:
    """float32 values of an FP8 weight [..., rows, cols]: each block times its `scale_inv`."""
    values = weight.to(torch.float32)
    scale = scale_inv.to(torch.float32)
    if block_size is None:
        return values * scale.reshape(())
    expected = fp8_scale_shape(weight.shape, block_size)
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"scale_inv has shape {list(scale.shape)}; a {list(weight.shape)} weight with "
            f"blocks {list(block_size)} needs {list(expected)}"
        )
    rows, cols = weight.shape[-2:]
    expanded = scale.repeat_interleave(block_size[0], dim=-2)[..., :rows, :]
    expanded = expanded.repeat_interleave(block_size[1], dim=-1)[..., :cols]
    return values.mul_(expanded)


def quantize_fp8_blocks(
    weight: torch.Tensor, block_size: tuple[int, int] | None = DEFAULT_FP8_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale_inv) with fresh per-block scales.

    Each block's largest magnitude maps to 448 (e4m3's largest finite value), so
    `scale_inv = amax / 448` (1 for an all-zero block); a partial edge block is scaled by
    the values it has, as DeepSeek-V3's zero padding does.
    """
    values = weight.to(torch.float32)
    if block_size is None:
        amax = values.abs().amax()
        scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        quantized = (values / scale_inv).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return quantized, scale_inv.reshape(())
    rows, cols = values.shape[-2:]
    pad_rows, pad_cols = _block_pad(rows, cols, block_size)
    padded = torch.nn.functional.pad(values, (0, pad_cols, 0, pad_rows))
    lead = padded.shape[:-2]
    row_blocks = padded.shape[-2] // block_size[0]
    col_blocks = padded.shape[-1] // block_size[1]
    tiles = padded.reshape(*lead, row_blocks, block_size[0], col_blocks, block_size[1])
    amax = tiles.abs().amax(dim=(-3, -1))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    tiles = tiles / scale_inv.unsqueeze(-1).unsqueeze(-3)
    quantized = tiles.clamp_(-FP8_MAX, FP8_MAX).reshape(padded.shape)[..., :rows, :cols]
    return quantized.to(FP8_DTYPE).contiguous(), scale_inv.contiguous()


# --------------------------------------------------------------------------- MXFP4 math

# Midpoints between consecutive e2m1 magnitudes (codes 0..7), for round-to-nearest.
_FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Values of MXFP4 `blocks` [..., G, 16] with e8m0 `scales` [..., G]: shape [..., G*32].

    Byte j of a group holds values 2j (low nibble) and 2j + 1 (high nibble); each group of
    32 is multiplied by 2^(scale - 127). The result keeps the on-disk orientation (for
    gpt-oss [E, out, in]); `mxfp4_parameter` gives transformers' [E, in, out].
    """
    if blocks.shape[-1] != MXFP4_BYTES or tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise ValueError(
            f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not fit "
            f"(expected [..., G, {MXFP4_BYTES}] and [..., G])"
        )
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    packed = blocks.to(torch.uint8)
    values = torch.empty(*blocks.shape[:-1], MXFP4_GROUP, dtype=torch.float32, device=blocks.device)
    values[..., 0::2] = lut[(packed & 0x0F).long()]
    values[..., 1::2] = lut[(packed >> 4).long()]
    exponents = scales.to(torch.int32) - E8M0_BIAS
    values = torch.ldexp(values, exponents.unsqueeze(-1))
    return values.reshape(*blocks.shape[:-2], -1).to(dtype)


def _round_to_fp4_codes(scaled: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (uint8, sign in bit 3) nearest to `scaled`; ties go to the even code."""
    magnitude = scaled.abs().contiguous()
    midpoints = torch.tensor(_FP4_MIDPOINTS, dtype=torch.float32, device=scaled.device)
    index = torch.bucketize(magnitude, midpoints)  # a value on a midpoint gets the lower code
    on_midpoint = midpoints[index.clamp(max=len(_FP4_MIDPOINTS) - 1)] == magnitude
    index = index + (on_midpoint & (index % 2 == 1)).long()
    sign = ((scaled < 0) & (index > 0)).long() << 3
    return (index | sign).to(torch.uint8)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks uint8 [..., G, 16], scales uint8 [..., G]) of `weight` [..., G*32].

    The scale of each group of 32 is the smallest power of two 2^e with amax <= 6 * 2^e
    (e2m1's largest value is 6), so nothing clips; values round to the nearest e2m1 value.
    A tensor that already lies on an MXFP4 grid requantizes to the same values.
    """
    values = weight.to(torch.float32)
    if values.shape[-1] % MXFP4_GROUP:
        raise ValueError(
            f"MXFP4 needs the last axis to be a multiple of {MXFP4_GROUP}, got shape "
            f"{list(values.shape)}"
        )
    groups = values.reshape(*values.shape[:-1], -1, MXFP4_GROUP)
    amax = groups.abs().amax(dim=-1)
    mantissa, exponent = torch.frexp(amax)  # amax = mantissa * 2^exponent, mantissa in [0.5, 1)
    # amax <= 6 * 2^e = 0.75 * 2^(e + 3): e = exponent - 3 if mantissa <= 0.75, else exponent - 2
    e = exponent - 3 + (mantissa > 0.75).to(exponent.dtype)
    e = torch.where(amax > 0, e, torch.full_like(e, -E8M0_BIAS)).clamp(-E8M0_BIAS, 127)
    scaled = torch.ldexp(groups, (-e).unsqueeze(-1))
    codes = _round_to_fp4_codes(scaled)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.contiguous(), (e + E8M0_BIAS).to(torch.uint8).contiguous()


def mxfp4_parameter(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 transformers parameter [E, in, out] of gpt-oss MXFP4 blocks [E, out, in/32, 16]."""
    return dequantize_mxfp4(blocks, scales).transpose(-1, -2)


def mxfp4_from_parameter(parameter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss (blocks, scales) of a transformers parameter [E, in, out] (the inverse)."""
    return quantize_mxfp4(parameter.transpose(-1, -2))


# --------------------------------------------------------------------------- the edit


EditFunction = Callable[[torch.Tensor], torch.Tensor]


def edit_fp8(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    edit: EditFunction,
    block_size: tuple[int, int] | None = DEFAULT_FP8_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize, `edit` in float32, requantize with fresh block scales.

    `edit` is the shared edit (`lambda w: export.edit_tensor(w, edits)`): it receives and
    returns a float32 tensor of the weight's shape. The scale keeps its dtype, so the
    rewritten pair has the source's exact byte layout.
    """
    edited = edit(dequantize_fp8_blocks(weight, scale_inv, block_size))
    quantized, new_scale = quantize_fp8_blocks(edited, block_size)
    return quantized, new_scale.to(scale_inv.dtype).reshape(scale_inv.shape)


def edit_mxfp4(
    blocks: torch.Tensor,
    scales: torch.Tensor,
    edit: EditFunction,
    output: str = DEFAULT_MXFP4_OUTPUT,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Edit a gpt-oss MXFP4 expert tensor in transformers' [E, in, out] layout.

    Returns the bf16 parameter (`output="bf16"`) or requantized (blocks, scales)
    (`output="requantize"`, same shapes and bytes as the source).
    """
    if output not in MXFP4_OUTPUTS:
        raise AbliterateError(
            f"mxfp4 output is {output!r}; expected one of {', '.join(MXFP4_OUTPUTS)}."
        )
    edited = edit(mxfp4_parameter(blocks, scales))
    if output == "bf16":
        return edited.to(torch.bfloat16).contiguous()
    return mxfp4_from_parameter(edited)


def mxfp4_module(key: str) -> str:
    """`model.layers.3.mlp.experts.down_proj` -> `model.layers.3.mlp.experts`: the module
    transformers converts (or, listed in `modules_to_not_convert`, leaves plain) as a whole."""
    return key.rsplit(".", 1)[0]


def mxfp4_output_config(config: Mapping, converted_keys, pairs_left: bool) -> dict:
    """config.json of an export whose `converted_keys` are now bf16 tensors.

    With MXFP4 pairs left elsewhere in the checkpoint, the converted modules join
    `modules_to_not_convert` (transformers loads them as plain parameters beside the
    quantized experts); with none left, `quantization_config` is dropped, so the export
    loads as the plain bf16 model it now is.
    """
    if not pairs_left:
        return {k: v for k, v in config.items() if k != "quantization_config"}
    return mxfp4_bf16_config(config, sorted({mxfp4_module(k) for k in converted_keys}))


def mxfp4_bf16_config(config: Mapping, edited_modules) -> dict:
    """config.json for a checkpoint whose `edited_modules` (e.g. `model.layers.3.mlp.experts`)
    are now bf16 while other experts may stay MXFP4: listing them in the quantization
    config's `modules_to_not_convert` makes transformers load them as plain parameters."""
    config = dict(config)
    quant = dict(config.get("quantization_config") or {})
    keep = sorted(set(quant.get("modules_to_not_convert") or []) | set(edited_modules))
    quant["modules_to_not_convert"] = keep
    config["quantization_config"] = quant
    return config


# --------------------------------------------------------------------------- wiring helpers


def _model_config(model_dir) -> dict:
    """config.json, or {} where there is none (the exporter needs only headers; names decide)."""
    from pathlib import Path

    from .layout import read_config  # layout imports this module

    return read_config(model_dir) if (Path(model_dir) / "config.json").is_file() else {}


def require_full_precision(model_dir, tensor_names) -> None:
    """The exporter's guard: refuse a pre-quantized checkpoint (bitsandbytes, GPTQ, ...)."""
    require_editable(
        checkpoint_quantization(_model_config(model_dir), dict.fromkeys(tensor_names)), model_dir
    )


def fp8_scales(model_dir, tensors: Mapping, keys) -> dict:
    """{key: (scale TensorInfo, block_size)} for the FP8 weights among `keys`.

    `tensors` maps names to `shards.TensorInfo` (one shard's header, or the checkpoint);
    the pairs are validated again here (a plan may come from another copy of the model),
    and a scale must sit in its weight's shard.
    """
    fp8 = [k for k in keys if k in tensors and tensors[k].dtype == FP8_SAFETENSORS_DTYPE]
    if not fp8:
        return {}
    quantization = checkpoint_quantization(_model_config(model_dir), tensors)
    found = quantized_tensors(tensors, quantization)
    return {k: (tensors[found[k].stored[1]], found[k].block_size) for k in fp8}


def logical_tensors(tensors: Mapping, quantized: Mapping[str, QuantizedTensor]) -> dict:
    """`tensors` (name -> `shards.TensorInfo`) as transformers names its parameters: each
    MXFP4 pair replaced by its logical key, a BF16 `TensorInfo` of the parameter shape in
    the shard of its `_blocks` (bf16 is what transformers dequantizes it to).

    Why: inspection matches the architecture's patterns (`mlp.experts.down_proj`) and the
    planner checks a plan's shapes against these names. The byte range of a logical entry
    is not in any file (begin 0); the exporter reads the stored pair (`mxfp4_pairs`).
    """
    logical = dict(tensors)
    for key, found in quantized.items():
        if found.format != "mxfp4":
            continue
        logical[key] = mxfp4_logical_info(key, logical.pop(found.stored[0]))
        logical.pop(found.stored[1])
    return logical


def mxfp4_logical_info(key: str, blocks):
    """The `shards.TensorInfo` of the BF16 parameter an MXFP4 pair stands for (in the
    shard of its `blocks`; no byte range of any file)."""
    from .shards import TensorInfo

    shape = mxfp4_parameter_shape(blocks.shape)
    return TensorInfo(key, blocks.shard, "BF16", shape, 0, 2 * math.prod(shape))


def mxfp4_pairs(tensors: Mapping, keys) -> dict:
    """{key: (blocks TensorInfo, scales TensorInfo)} for the MXFP4 logical keys among `keys`.

    `tensors` maps stored names to `shards.TensorInfo` (one shard's header or the
    checkpoint); a key that is stored under its own name is not an MXFP4 key. The pairs
    are validated again here (a plan may come from another copy of the model).
    """
    pairs = {}
    for key in keys:
        blocks_key, scales_key = mxfp4_keys(key)
        if key in tensors or blocks_key not in tensors:
            continue
        if scales_key not in tensors:
            raise AbliterateError(
                f"MXFP4 tensor {blocks_key!r} has no {scales_key!r} beside it; expected blocks "
                "and scales in pairs."
            )
        check_mxfp4_pair(key, tensors[blocks_key], tensors[scales_key])
        pairs[key] = (tensors[blocks_key], tensors[scales_key])
    return pairs


def stored_values(model_dir, tensors: Mapping, key: str, get_tensor) -> torch.Tensor:
    """`key` as transformers loads it dequantized: an FP8 weight times its block scales,
    an MXFP4 expert tensor from its blocks and scales (float32), any other tensor as stored. `tensors`: the shard's header (name ->
    `shards.TensorInfo`); `get_tensor(name)` reads one tensor of that shard.

    Why: the in-memory evaluator checks a few loaded parameters against the file, and an
    FP8 checkpoint's parameters are those values, not the float8 bytes.
    """
    mxfp4 = mxfp4_pairs(tensors, [key])
    if key in mxfp4:  # a gpt-oss expert tensor: its blocks times their scales, [E, in, out]
        blocks, scales = mxfp4[key]
        return mxfp4_parameter(get_tensor(blocks.name), get_tensor(scales.name))
    fp8 = fp8_scales(model_dir, tensors, [key])
    if key not in fp8:
        return get_tensor(key)
    scale, block = fp8[key]
    return dequantize_fp8_blocks(get_tensor(key), get_tensor(scale.name), block)


def dequantizing_load_kwargs(model_dir) -> dict:
    """from_pretrained kwargs that load an FP8/MXFP4 checkpoint as real-valued parameters.

    Why: the in-memory evaluator edits parameters with the same function as the exporter,
    which needs floats; transformers dequantizes to bf16 by itself on a CPU (or a GPU
    without FP8 support), and this asks for the same on any machine.
    """
    method = checkpoint_quantization(_model_config(model_dir), {}).method
    if method == "fp8":
        from transformers import FineGrainedFP8Config

        return {"quantization_config": FineGrainedFP8Config(dequantize=True)}
    if method == "mxfp4":
        from transformers import Mxfp4Config

        return {"quantization_config": Mxfp4Config(dequantize=True)}
    return {}
