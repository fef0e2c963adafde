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
        self.worst = {"residual": 0.0, "norm_drift": 0.0}


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
        plain = [
            e for e, is_bias in chunk_edits if not is_bias and getattr(e, "rows", None) is None
        ]
        scale_one = len(chunk_edits) == 1 and plain and plain[0].scale == 1.0
        errors = (
            invariant_errors(original, written, plain[0], plain[0].hidden_axis, device)
            if scale_one
            else None
        )
        if not _bit_equal(edit_tensor(original, chunk_edits, device, out=original), written):
            fail(f"{key}: differs from the plan's edit of the source tensor")
            return
        if errors is not None:
            _check_invariants(key, errors, plain[0], a.dtype, tally, fail)


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


def _check_tensors(model_dir, output, source, result, by_key, fail, device, written) -> _Tally:
    """Every tensor present in both: untouched ones bit-identical, edited ones the plan's.

    For a shard in `written` (hashed by its exporter on the way) untouched tensors are
    covered by the shard's digest, and edited ones with an in-memory record by that record;
    everything else is read back and compared (edits recomputed from the source).
    """
    tally, files = _Tally(), _Files()
    fp8 = quant.fp8_scales(model_dir, source, by_key)  # edited FP8 weights rewrite their scales
    fp8_scale_keys = {scale.name for scale, _ in fp8.values()}
    try:
        for key in sorted(set(source) & set(result)):
            a, b = source[key], result[key]
            if a.dtype != b.dtype or a.shape != b.shape or key in fp8_scale_keys:
                continue  # reported by _check_structure; a scale is checked with its weight
            src_path, dst_path = model_dir / a.shard, output / b.shard
            record = written.get(b.shard)
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
    for key in sorted(set(by_key) - set(result))[:MAX_FAILURES]:
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
    structure = _check_structure(source, result, fail)
    by_key = plan.edits()
    written = written or {}
    tally = _check_tensors(model_dir, output, source, result, by_key, fail, device, written)
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
        "manifest": manifest,
        "generation": generation,
        "failures": failures[:MAX_FAILURES],
        "failure_count": len(failures),
    }


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
