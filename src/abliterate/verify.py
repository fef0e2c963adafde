"""Verify an exported checkpoint against its source and its plan.

Why a separate pass: the export is many independent jobs; this reads the result as a user
would and checks what a user would want to know: nothing is missing or reshaped, nothing
the plan does not name has changed by a single bit, every edited tensor is exactly the
plan's edit of the source (recomputed here) and meets the math's invariants (at scale 1:
no component along the direction left, preserved norms unchanged), and a small model
loads with transformers and generates.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
from pathlib import Path

import torch

from . import quant
from .edit import unit, vector_stats
from .errors import AbliterateError
from .export import mxfp4_slices
from .files import write_json, write_text_atomic
from .recipe import Plan, edit_tensor, file_sha256, tensor_chunks
from .shards import DTYPES, read_checkpoint, read_tensor

SMALL_MODEL_BYTES = 2 * 1024**3  # generate / hash checks only below this size
MAX_FAILURES = 20


def tolerance(dtype: str) -> float:
    """Relative tolerance of an invariant after rounding to the stored dtype."""
    torch_dtype = DTYPES[dtype][0]
    eps = torch.finfo(torch_dtype).eps if torch_dtype.is_floating_point else 1.0
    return max(4 * eps, 1e-5)


COMPARE_CHUNK = 16 * 1024 * 1024  # below glibc's mmap ceiling: freed chunks are reused


def _same_bytes(src, dst, src_info, dst_info) -> bool:
    position = 0
    size = src_info.nbytes
    while position < size:
        n = min(COMPARE_CHUNK, size - position)
        a = os.pread(src.fileno(), n, src_info.begin + position)
        b = os.pread(dst.fileno(), n, dst_info.begin + position)
        if a != b:
            return False
        position += n
    return True


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same bytes; compared as 64-bit words where the layout allows (several times faster
    than byte-wise `torch.equal`)."""
    flat_a = a.contiguous().reshape(-1).view(torch.uint8)
    flat_b = b.contiguous().reshape(-1).view(torch.uint8)
    if flat_a.numel() != flat_b.numel():
        return False
    if flat_a.numel() % 8 == 0:
        try:
            return torch.equal(flat_a.view(torch.int64), flat_b.view(torch.int64))
        except RuntimeError:  # a storage offset that is not 8-byte aligned
            pass
    return torch.equal(flat_a, flat_b)


def invariant_errors(
    source: torch.Tensor, edited: torch.Tensor, entry, hidden_axis: int, device=None
) -> tuple[float, float]:
    """(max relative component along r, max relative norm change) of an edited tensor.

    Vectors are laid along the hidden axis; norms are those the entry's mode preserves
    (along the hidden axis for 'hidden', across the other axes for 'other'). The
    'hidden' and plain cases stream (`edit.vector_stats`); 'other' needs whole matrices.
    """
    r = unit(entry.direction)
    hidden_axis = hidden_axis % source.ndim
    if entry.preserve == "hidden" and source.ndim >= 3 and hidden_axis != 0:
        worst = [
            invariant_errors(a, b, entry, hidden_axis - 1, device)
            for a, b in zip(source, edited, strict=True)
        ]
        return max(w[0] for w in worst), max(w[1] for w in worst)
    if entry.preserve == "hidden" and source.ndim >= 2:
        shape = (source.shape[0], -1) if hidden_axis == 0 else (-1, source.shape[-1])
        axis = 0 if hidden_axis == 0 else 1
        _, before = vector_stats(source.reshape(shape), r, axis, device)
        along, after = vector_stats(edited.reshape(shape), r, axis, device)
        scale = before.clamp_min(1e-12)
        residual = (along.abs() / scale).max().item()
        drift = ((after - before).abs() / scale).max().item()
        return residual, drift
    before = source.to(torch.float32).movedim(hidden_axis, -1).reshape(-1, r.numel())
    after = edited.to(torch.float32).movedim(hidden_axis, -1).reshape(-1, r.numel())
    scale = before.norm(dim=-1).clamp_min(1e-12)
    residual = ((after @ r).abs() / scale).max().item()
    if entry.preserve == "hidden":
        drift = ((after.norm(dim=-1) - before.norm(dim=-1)).abs() / scale).max().item()
    else:
        n_before = before.norm(dim=0).clamp_min(1e-12)
        drift = ((after.norm(dim=0) - n_before).abs() / n_before).max().item()
    return residual, drift


def _check_structure(source: dict, result: dict, fail) -> dict:
    """Same tensor names, dtypes and shapes in the output as in the source."""
    missing = sorted(set(source) - set(result))
    extra = sorted(set(result) - set(source))
    for key in missing[:MAX_FAILURES]:
        fail(f"{key}: missing from the output")
    for key in extra[:MAX_FAILURES]:
        fail(f"{key}: in the output but not in the source")
    reshaped = 0
    for key in sorted(set(source) & set(result)):
        a, b = source[key], result[key]
        if a.dtype != b.dtype or a.shape != b.shape:
            reshaped += 1
            fail(f"{key}: {a.dtype} {list(a.shape)} became {b.dtype} {list(b.shape)}")
    return {"missing": len(missing), "extra": len(extra), "dtype_or_shape_changed": reshaped}


class _Files:
    """Read handles on the shards, opened once each and closed together, and two read
    buffers reused for every edited tensor (a fresh one per tensor costs page faults)."""

    def __init__(self):
        self._handles: dict[Path, object] = {}
        self._buffers: list[bytearray] = [bytearray(), bytearray()]

    def buffer(self, slot: int, nbytes: int) -> bytearray:
        if len(self._buffers[slot]) < nbytes:
            self._buffers[slot] = bytearray(nbytes)
        return self._buffers[slot]

    def __call__(self, path: Path):
        if path not in self._handles:
            self._handles[path] = open(path, "rb")  # noqa: SIM115 - closed in close()
        return self._handles[path]

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()


class _Tally:
    """The counters and worst invariant errors the report carries."""

    def __init__(self):
        self.stats = {
            "untouched": 0,
            "untouched_linked": 0,
            "untouched_by_digest": 0,
            "edited": 0,
            "edited_by_digest": 0,
            "invariants_checked": 0,
        }
        self.stats["mxfp4_dequantized"] = 0  # unedited MXFP4 tensors of edited modules, now bf16
        self.worst = {"residual": 0.0, "norm_drift": 0.0}
        self.requantized = {"residual": 0.0, "norm_drift": 0.0}  # MXFP4 requantize output


def _check_untouched(key, a, b, src_path, dst_path, files: _Files, tally: _Tally, fail) -> None:
    """A tensor the plan does not name is the source's, bit for bit (or the same file)."""
    if os.path.samefile(src_path, dst_path):
        tally.stats["untouched_linked"] += 1
    elif _same_bytes(files(src_path), files(dst_path), a, b):
        tally.stats["untouched"] += 1
    else:
        fail(f"{key}: not in the plan but its bytes differ from the source")


def _check_invariants(key, errors, entry, dtype: str, tally: _Tally, fail) -> None:
    """At scale 1 nothing is left along r and the preserved norms are unchanged."""
    residual, drift = errors
    tally.stats["invariants_checked"] += 1
    tally.worst["residual"] = max(tally.worst["residual"], residual)
    tol = tolerance(dtype)
    if (entry.preserve == "hidden" or not entry.norm_preserve) and residual > tol:
        fail(f"{key}: component along r is {residual:.2e} of the norm after a scale-1 edit "
             f"(tolerance {tol:.1e})")  # fmt: skip
    if entry.norm_preserve:
        tally.worst["norm_drift"] = max(tally.worst["norm_drift"], drift)
        if drift > tol:
            fail(f"{key}: preserved norms changed by {drift:.2e} (tolerance {tol:.1e})")


def _check_edited(key, a, b, src_path, dst_path, edits, files, tally, fail, device) -> None:
    """An edited tensor equals the plan's edit of the source, recomputed here.

    The source chunk is read into a reused buffer and edited in place there; the
    invariants are measured before that, on the source and the written chunk.
    """
    tally.stats["edited"] += 1
    offset = b.begin - a.begin
    for begin, shape, chunk_edits in tensor_chunks(a, edits):
        nbytes = math.prod(shape) * DTYPES[a.dtype][1]
        original = read_tensor(
            files(src_path), a, begin=begin, shape=shape, buffer=files.buffer(0, nbytes)
        )
        written = read_tensor(
            files(dst_path), b, begin=begin + offset, shape=shape, buffer=files.buffer(1, nbytes)
        )
        # router suppression edits chosen rows only (those along r), so the whole-tensor
        # invariants do not apply to it; the bit-for-bit comparison below still does
        entry = _scale_one_plain(chunk_edits)
        errors = (
            invariant_errors(original, written, entry, entry.hidden_axis, device)
            if entry is not None
            else None
        )
        if not _bit_equal(edit_tensor(original, chunk_edits, device, out=original), written):
            fail(f"{key}: differs from the plan's edit of the source tensor")
            return
        if errors is not None:
            _check_invariants(key, errors, entry, a.dtype, tally, fail)


def _check_fp8_pair(
    key, a, b, src_path, dst_path, fp8, result, edits, files, tally, fail, device
) -> None:
    """An FP8 target and its block scales are exactly the exporter's dequant -> edit ->
    requant of the source pair (recomputed here)."""
    tally.stats["edited"] += 1
    scale_a, block = fp8
    scale_b = result.get(scale_a.name)
    if scale_b is None or (scale_b.dtype, scale_b.shape) != (scale_a.dtype, scale_a.shape):
        return  # already reported by _check_structure
    weight, scale = quant.edit_fp8(
        read_tensor(files(src_path), a),
        read_tensor(files(src_path), scale_a),
        lambda w: edit_tensor(w, edits, device),
        block,
    )
    if not (
        _bit_equal(weight, read_tensor(files(dst_path), b))
        and _bit_equal(scale, read_tensor(files(dst_path.parent / scale_b.shard), scale_b))
    ):
        fail(f"{key}: differs from the plan's edit of the source (FP8 with scales)")


def _check_record(key, errors, dtype: str, tally: _Tally, fail) -> None:
    """The exporter's in-memory invariants of an edited tensor (any scale, `edit.edit_errors`)."""
    residual, drift = errors
    tally.stats["invariants_checked"] += 1
    tally.worst["residual"] = max(tally.worst["residual"], residual)
    tally.worst["norm_drift"] = max(tally.worst["norm_drift"], drift)
    tol = tolerance(dtype)
    if residual > tol:
        fail(f"{key}: its component along r is off the edit's by {residual:.2e} of the norm "
             f"(measured before writing; tolerance {tol:.1e})")  # fmt: skip
    if drift > tol:
        fail(f"{key}: its norms are off the edit's by {drift:.2e} (measured before writing; "
             f"tolerance {tol:.1e})")  # fmt: skip


def _check_digests(output: Path, written: dict, jobs: int, fail) -> int:
    """Each shard the exporter hashed on the way has that digest on disk.

    The exporter hashed the source's untouched byte ranges (read from the source file) and
    the edited buffers it wrote, so a match proves the file holds exactly those bytes:
    untouched tensors equal to the source, edited ones as checked in memory.
    """
    shards = sorted(written)
    with concurrent.futures.ThreadPoolExecutor(max(1, min(jobs, len(shards) or 1))) as pool:
        digests = pool.map(file_sha256, [output / shard for shard in shards])
        for shard, digest in zip(shards, digests, strict=True):
            if digest != written[shard]["sha256"]:
                fail(f"{shard}: its SHA-256 on disk differs from the bytes the exporter wrote")
    return len(shards)


def _scale_one_plain(chunk_edits):
    """The single scale-1 weight edit whose invariants can be checked, else None (router
    suppression edits chosen rows only, several edits compose)."""
    plain = [e for e, is_bias in chunk_edits if not is_bias and getattr(e, "rows", None) is None]
    if len(chunk_edits) == 1 and plain and plain[0].scale == 1.0:
        return plain[0]
    return None


def _check_mxfp4(key, pair, written, files, src_path, dst_path, edits, tally, fail, device):
    """An MXFP4 target (or, with bf16 output, an unedited tensor of an edited module) is
    exactly the exporter's dequant -> edit -> bf16 / requantized pair of the source,
    recomputed one expert at a time (`export.mxfp4_slices`), and meets the invariants
    after dequantization.

    `written` is the output's bf16 `TensorInfo`, or its (blocks, scales) pair for the
    requantize output. bf16 results are held to bf16's tolerance; a requantized result's
    invariants are recorded (verify.json `mxfp4.requantized_max_*`), not failed: 4-bit rounding puts back
    a part of the removed component that no tolerance short of that part would pass
    (docs/quantized.md), so the bit-exact recomputation is what vouches for it.
    """
    blocks, scales = pair
    tally.stats["edited" if edits else "mxfp4_dequantized"] += 1
    experts = blocks.shape[0]
    out = files(dst_path)
    for piece in mxfp4_slices(files(src_path), blocks, scales, edits, device):
        count = piece.packed.shape[0]
        if isinstance(written, tuple):
            got = [
                read_tensor(
                    out,
                    info,
                    begin=info.begin + piece.index * (info.nbytes // experts),
                    shape=(count, *info.shape[1:]),
                )  # fmt: skip
                for info in written
            ]
            expected = piece.requantized()
            same = _bit_equal(expected[0], got[0]) and _bit_equal(expected[1], got[1])
            after = quant.mxfp4_parameter(*got)
            after = after if piece.edited.ndim == 3 else after[0]
        else:
            step = written.nbytes // experts
            after = read_tensor(
                out, written, begin=written.begin + piece.index * step,
                shape=tuple(piece.edited.shape),
            )  # fmt: skip
            same = _bit_equal(piece.edited.to(torch.bfloat16), after)
        if not same:
            what = "the plan's edit" if edits else "the dequantization"
            fail(f"{key}: differs from {what} of the source MXFP4 blocks and scales")
            return
        entry = _scale_one_plain(piece.edits)
        if entry is None:
            continue
        errors = invariant_errors(piece.source, after, entry, entry.hidden_axis, device)
        if isinstance(written, tuple):
            for name, value in zip(("residual", "norm_drift"), errors, strict=True):
                tally.requantized[name] = max(tally.requantized[name], value)
        else:
            _check_invariants(key, errors, entry, "BF16", tally, fail)


def _mxfp4_outputs(source, result, by_key) -> dict:
    """{key: (source pair, written)} of the MXFP4 tensors the export rewrote: the plan's
    (bf16 in the output, or a requantized pair) and the converted unedited ones (bf16)."""
    found = {}
    for key, pair in quant.mxfp4_pairs(source, set(by_key) | set(result)).items():
        blocks_key, scales_key = quant.mxfp4_keys(key)
        if key in result:
            found[key] = (pair, result[key])
        elif key in by_key and blocks_key in result and scales_key in result:
            found[key] = (pair, (result[blocks_key], result[scales_key]))
    return found


def _check_tensors(
    model_dir, output, source, result, by_key, mxfp4, fail, device, by_digest
) -> _Tally:
    """Every tensor present in both: untouched ones bit-identical, edited ones the plan's;
    `mxfp4` (`_mxfp4_outputs`): the MXFP4 tensors the export rewrote.

    For a shard in `by_digest` (hashed by its exporter on the way) untouched tensors are
    covered by the shard's digest, and edited ones with an in-memory record by that record;
    everything else is read back and compared (edits recomputed from the source).
    """
    tally, files = _Tally(), _Files()
    fp8 = quant.fp8_scales(model_dir, source, by_key)  # edited FP8 weights rewrite their scales
    fp8_scale_keys = {scale.name for scale, _ in fp8.values()}
    rewritten = fp8_scale_keys | {n for pair, _ in mxfp4.values() for n in (p.name for p in pair)}
    try:
        for key, (pair, written) in sorted(mxfp4.items()):
            if isinstance(written, tuple):
                fits = all(
                    (a.dtype, a.shape) == (b.dtype, b.shape)
                    for a, b in zip(pair, written, strict=True)
                )
            else:
                shape = quant.mxfp4_parameter_shape(pair[0].shape)
                fits = (written.dtype, tuple(written.shape)) == ("BF16", shape)
            if not fits:
                continue  # reported by _check_structure
            shard = written[0].shard if isinstance(written, tuple) else written.shard
            _check_mxfp4(key, pair, written, files, model_dir / pair[0].shard, output / shard,
                         by_key.get(key, []), tally, fail, device)  # fmt: skip
        for key in sorted(set(source) & set(result)):
            a, b = source[key], result[key]
            if a.dtype != b.dtype or a.shape != b.shape or key in rewritten:
                continue  # reported by _check_structure; a scale is checked with its weight
            src_path, dst_path = model_dir / a.shard, output / b.shard
            record = by_digest.get(b.shard)
            if record is not None and key in record["tensors"] and key in by_key:
                tally.stats["edited_by_digest"] += 1
                _check_record(key, record["tensors"][key], a.dtype, tally, fail)
            elif record is not None and key not in by_key and key not in fp8:
                tally.stats["untouched_by_digest"] += 1
            elif key in fp8:
                _check_fp8_pair(key, a, b, src_path, dst_path, fp8[key], result, by_key[key],
                                files, tally, fail, device)  # fmt: skip
            elif key in by_key:
                _check_edited(key, a, b, src_path, dst_path, by_key[key], files, tally, fail,
                              device)  # fmt: skip
            else:
                _check_untouched(key, a, b, src_path, dst_path, files, tally, fail)
    finally:
        files.close()
    for key in sorted(set(by_key) - set(result) - set(mxfp4))[:MAX_FAILURES]:
        fail(f"{key}: the plan edits it but the output lacks it")
    return tally


def verify(
    model_dir: str | Path,
    output: str | Path,
    plan: Plan,
    *,
    generate: bool | None = None,
    device: str | None = None,
    written: dict | None = None,
    jobs: int = 2,
) -> dict:
    """Check `output` against `model_dir` and `plan`; returns the report (never raises on a
    failed check: a failing report is the answer). `generate=None`: only for small models.

    Steps: structure (names, dtypes, shapes), tensors (untouched bit-identical, edited
    equal to the recomputed plan edit and its invariants; an FP8 target with its block
    scales), manifest, generation.

    `written` (`export_model(..., written=)`: what each shard job knew as it wrote its
    shard) turns the tensor step into digests: a shard hashed on the way is hashed once
    more on disk (`jobs` at a time) instead of being compared with the source, and an edit
    whose invariants were measured in memory before writing is judged by them instead of
    being recomputed. Without it (e.g. `abliterate verify` on an existing export) every
    tensor is read back and every edit recomputed.
    """
    model_dir, output = Path(model_dir), Path(output)
    if not output.is_dir():
        raise AbliterateError(f"{output}: exported model directory not found.")
    source = read_checkpoint(model_dir)
    result = read_checkpoint(output)
    failures: list[str] = []
    fail = failures.append
    by_key = plan.edits()
    mxfp4 = _mxfp4_outputs(source, result, by_key)
    converted = {k: pair for k, (pair, out) in mxfp4.items() if not isinstance(out, tuple)}
    structure = _check_structure(_converted_source(source, converted), result, fail)
    if converted:
        _check_mxfp4_config(model_dir, output, source, result, converted, fail)
    written = written or {}
    tally = _check_tensors(model_dir, output, source, result, by_key, mxfp4, fail, device, written)
    tally.stats["shards_checked_by_digest"] = _check_digests(output, written, jobs, fail)
    small = sum(info.nbytes for info in result.values()) <= SMALL_MODEL_BYTES
    manifest = _check_manifest(output, small, fail)
    generation = None
    if generate or (generate is None and small):
        generation = _generate_check(output, fail)
    return {
        "ok": not failures,
        "model": str(model_dir),
        "output": str(output),
        "tensors": len(source),
        **structure,
        **tally.stats,
        "plan_tensors": len(by_key),
        "max_residual_along_direction": tally.worst["residual"],
        "max_norm_drift": tally.worst["norm_drift"],
        **(
            {
                "mxfp4": {
                    "output": "bf16" if converted else "requantize",
                    "rewritten": len(mxfp4),
                    "requantized_max_residual": tally.requantized["residual"],
                    "requantized_max_norm_drift": tally.requantized["norm_drift"],
                }
            }
            if mxfp4
            else {}
        ),
        "manifest": manifest,
        "generation": generation,
        "failures": failures[:MAX_FAILURES],
        "failure_count": len(failures),
    }


def _converted_source(source: dict, converted: dict) -> dict:
    """The source's tensors as a bf16-converting export should hold them: each converted
    MXFP4 pair replaced by its bf16 parameter (name, shape), everything else as it is."""
    expected = dict(source)
    for key, (blocks, scales) in converted.items():
        del expected[blocks.name], expected[scales.name]
        expected[key] = quant.mxfp4_logical_info(key, blocks)
    return expected


def _check_mxfp4_config(model_dir: Path, output: Path, source, result, converted, fail) -> None:
    """A module transformers converts as a whole has all of its MXFP4 tensors converted,
    and config.json says what the shards hold (`quant.mxfp4_output_config` of the source's)."""
    modules = {quant.mxfp4_module(key) for key in converted}
    suffix = quant.MXFP4_BLOCKS_SUFFIX
    left = [n for n in result if n.endswith(suffix)]
    for name in left:
        if quant.mxfp4_module(name[: -len(suffix)]) in modules:
            fail(f"{name}: still MXFP4 in a module whose other tensors were converted to bf16")
    try:
        before = json.loads((model_dir / "config.json").read_text())
        after = json.loads((output / "config.json").read_text())
    except (OSError, ValueError) as error:
        fail(f"{output / 'config.json'}: unreadable ({error})")
        return
    if after != quant.mxfp4_output_config(before, converted, bool(left)):
        fail(
            f"{output / 'config.json'}: quantization_config does not match the converted MXFP4 "
            "tensors (expected modules_to_not_convert to list them, or no quantization_config "
            "when none is left)"
        )


def _check_manifest(output: Path, small: bool, fail) -> dict:
    path = output / "manifest.json"
    if not path.is_file():
        fail("manifest.json: missing")
        return {"present": False}
    try:
        hashes = json.loads(path.read_text())["sha256"]
    except (ValueError, KeyError):
        fail("manifest.json: malformed (expected a 'sha256' object)")
        return {"present": True}
    files = sorted(
        p.name
        for p in output.iterdir()
        if p.is_file() and p.name != "manifest.json" and not p.name.startswith(".")
    )  # dotfiles are tool bookkeeping (e.g. Snakemake's .snakemake_timestamp)
    unlisted = sorted(set(files) - set(hashes))
    gone = sorted(set(hashes) - set(files))
    for name in unlisted:
        fail(f"{name}: not listed in manifest.json")
    for name in gone:
        fail(f"{name}: listed in manifest.json but missing")
    checked = 0
    if small:
        for name in sorted(set(files) & set(hashes)):
            if hashes[name] is None:  # exported with --no-hash
                continue
            checked += 1
            if file_sha256(output / name) != hashes[name]:
                fail(f"{name}: SHA-256 differs from manifest.json")
    return {"present": True, "files": len(hashes), "hashes_checked": checked}


def _generate_check(output: Path, fail) -> dict:
    """Load the output with transformers and greedily generate a few tokens."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(output, dtype="auto")
        model.eval()
        vocab = model.config.vocab_size
        prompt = torch.arange(1, 9).remainder(vocab).unsqueeze(0)
        with torch.no_grad():
            logits = model(prompt).logits
            tokens = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    except Exception as error:  # any failure to load or run is the finding
        fail(f"{output}: AutoModelForCausalLM failed to load or generate ({error})")
        return {"ok": False, "error": str(error)}
    finite = bool(torch.isfinite(logits).all())
    if not finite:
        fail(f"{output}: the loaded model produces non-finite logits")
    return {"ok": finite, "new_tokens": tokens[0, prompt.shape[1] :].tolist()}


def summary(report: dict) -> str:
    """The human-readable verification summary (verify.txt)."""
    lines = [
        f"Verification of {report['output']} against {report['model']}: "
        + ("PASSED" if report["ok"] else f"FAILED ({report['failure_count']} problem(s))"),
        f"- {report['tensors']} source tensors; missing {report['missing']}, extra "
        f"{report['extra']}, dtype/shape changed {report['dtype_or_shape_changed']}",
        f"- untouched tensors bit-identical: {report['untouched']} compared, "
        f"{report['untouched_linked']} in hard-linked shards, "
        f"{report.get('untouched_by_digest', 0)} by the digest of "
        f"{report.get('shards_checked_by_digest', 0)} shard(s) hashed as they were written",
        f"- edited tensors equal to the plan's edit recomputed: {report['edited']} of "
        f"{report['plan_tensors']} planned; checked in memory against the edit's invariants "
        f"before writing, then by digest: {report.get('edited_by_digest', 0)}",
        *(
            [
                f"- MXFP4 experts ({report['mxfp4']['output']}): {report['mxfp4']['rewritten']} "
                f"rewritten, {report.get('mxfp4_dequantized', 0)} of them dequantized unedited; "
                + (
                    f"after requantization max component along r "
                    f"{report['mxfp4']['requantized_max_residual']:.2e}, max norm drift "
                    f"{report['mxfp4']['requantized_max_norm_drift']:.2e}"
                    if report["mxfp4"]["output"] == "requantize"
                    else "invariants held to bf16 tolerance"
                )
            ]
            if report.get("mxfp4")
            else []
        ),
        f"- invariants checked on {report['invariants_checked']} tensors: max "
        f"component along r {report['max_residual_along_direction']:.2e}, max norm drift "
        f"{report['max_norm_drift']:.2e}",
    ]
    manifest = report["manifest"]
    if manifest.get("present"):
        lines.append(
            f"- manifest.json: {manifest.get('files', 0)} files, "
            f"{manifest.get('hashes_checked', 0)} hashes re-checked"
        )
    generation = report["generation"]
    if generation is None:
        lines.append("- generation check: skipped (model too large or disabled)")
    else:
        lines.append(f"- generation check: {'ok' if generation['ok'] else 'FAILED'}")
    lines += [f"  ! {message}" for message in report["failures"]]
    return "\n".join(lines) + "\n"


def write_report(report: dict, json_path: str | Path, text_path: str | Path | None = None) -> None:
    write_json(report, json_path)
    if text_path is not None:
        write_text_atomic(text_path, summary(report))
