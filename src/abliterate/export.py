"""The sharded exporter: plan -> per-shard edit jobs -> assembled, manifested checkpoint.

Why per shard: a 200 GB MoE checkpoint is ~50 independent files, so each file holding a
target is one job (one Snakemake job, or one worker of `abliterate ablate -j N`), and files
without targets are hard-linked. Why streaming: a job copies untouched byte ranges
file-to-file and reads, edits and rewrites one target (or one expert slice of a fused
target) at a time, so its memory does not grow with the shard. Why temp names: an output
file only appears under its real name when it is complete, so an interrupted run never
leaves something that looks finished, and a rerun picks up where it stopped.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import json
import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch

from . import quant
from .card import CardOptions, model_card, portable_recipe, source_name
from .edit import edit_errors, hidden_vector_stats, unit
from .errors import AbliterateError
from .files import exclusive_lock, place_copy, resolve_source, write_json, write_text_atomic
from .logs import logger
from .recipe import Plan, edit_tensor, file_sha256, tensor_chunks
from .shards import (
    DTYPES,
    INDEX_NAME,
    ShardHeader,
    TensorInfo,
    copy_range_at,
    encode_header,
    read_checkpoint,
    read_header,
    read_tensor,
    read_weight_map,
    tensor_bytes,
    write_at,
)

# Files copied next to the weights (config, generation config, tokenizer, chat template).
METADATA_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)
MARKER = ".abliterate-plan"  # inside a staging directory: the plan it is being built for
HASHED_COPY_CHUNK = 8 * 1024 * 1024  # untouched bytes are hashed in cache-sized pieces
READ_AHEAD = 256 * 1024 * 1024  # source bytes asked for ahead of the writer (cold caches)
READ_AHEAD_STEP = 16 * 1024 * 1024


# --------------------------------------------------------------------------------------
# Safety
# --------------------------------------------------------------------------------------


def check_output_location(source: str | Path, output: str | Path) -> None:
    """Refuse an output equal to, inside, or containing the source model directory."""
    source_path = Path(source).resolve()
    output_path = Path(output).resolve()
    if output_path == source_path or source_path in output_path.parents:
        raise AbliterateError(
            f"{output}: the output directory is inside the source model {source}; choose a "
            "directory outside it (the source is never modified)."
        )
    if output_path in source_path.parents:
        raise AbliterateError(
            f"{output}: the output directory contains the source model {source}; choose a "
            "directory that does not hold it."
        )


# --------------------------------------------------------------------------------------
# Which shards hold what
# --------------------------------------------------------------------------------------


def check_mxfp4_output(mxfp4: str) -> str:
    """The MXFP4 output format (`export.mxfp4`, `--mxfp4`), or one sentence naming the choices."""
    if mxfp4 not in quant.MXFP4_OUTPUTS:
        raise AbliterateError(
            f"export.mxfp4 is {mxfp4!r}; expected one of {', '.join(quant.MXFP4_OUTPUTS)}."
        )
    return mxfp4


def mxfp4_rewrites(tensors: dict, keys, mxfp4: str) -> dict[str, tuple[TensorInfo, TensorInfo]]:
    """{logical key: (blocks, scales)} of the MXFP4 pairs an export rewrites.

    `tensors`: stored names -> `shards.TensorInfo` (the checkpoint). The plan's MXFP4 keys
    among `keys`, and with bf16 output every other MXFP4 tensor of their modules as well
    (dequantized, unedited): transformers converts a module as a whole, so a module listed
    in `modules_to_not_convert` must hold only plain parameters (gate_up_proj beside an
    edited down_proj, say).
    """
    rewrites = quant.mxfp4_pairs(tensors, keys)
    if mxfp4 == "bf16" and rewrites:
        modules = {quant.mxfp4_module(key) for key in rewrites}
        suffix = quant.MXFP4_BLOCKS_SUFFIX
        siblings = [
            name[: -len(suffix)]
            for name in tensors
            if name.endswith(suffix) and quant.mxfp4_module(name[: -len(suffix)]) in modules
        ]
        rewrites.update(quant.mxfp4_pairs(tensors, siblings))
    return rewrites


def plan_shards(
    plan: Plan,
    model_dir: str | Path | None = None,
    allow_external_links: bool = False,
    mxfp4: str = quant.DEFAULT_MXFP4_OUTPUT,
) -> dict:
    """{'edit': {shard: [keys]}, 'link': [shards]}: the jobs the plan needs.

    Every key the plan names must exist in the checkpoint with the plan's dtype and shape
    (a plan made for another checkpoint is refused here, before any job runs), and every
    shard must be a file of the model (a link leaving it is refused unless allowed). An
    MXFP4 key (`...mlp.experts.down_proj`) lives in the shard of its `_blocks` tensor;
    with `mxfp4="bf16"` the shards of its module's other MXFP4 tensors are edit jobs too
    (`mxfp4_rewrites`), and `'mxfp4'` lists the rewritten keys and the output format.
    """
    check_mxfp4_output(mxfp4)
    model_dir = Path(model_dir or plan.model_dir)
    weight_map = read_weight_map(model_dir)
    quant.require_full_precision(model_dir, weight_map)
    for shard in sorted(set(weight_map.values())):
        resolve_source(model_dir, shard, allow_external=allow_external_links)
    headers = {s: read_header(model_dir / s) for s in sorted(set(weight_map.values()))}
    stored = {name: headers[shard].tensors.get(name) for name, shard in weight_map.items()}
    stored = {name: info for name, info in stored.items() if info is not None}
    rewrites = mxfp4_rewrites(stored, plan.keys(), mxfp4)
    logical = {key: quant.mxfp4_logical_info(key, pair[0]) for key, pair in rewrites.items()}
    edit: dict[str, list[str]] = {}
    for shard, items in plan.by_shard().items():
        for key, entry in items:
            info = headers.get(shard, None)
            info = info.tensors.get(key) if info else None
            if key in logical and logical[key].shard == shard:
                info = logical[key]
            elif info is None or weight_map.get(key) != shard:
                raise AbliterateError(
                    f"plan names {key!r} in shard {shard!r}, but {model_dir} has it "
                    f"{'in ' + repr(weight_map[key]) if key in weight_map else 'nowhere'}; "
                    "was the plan made for another checkpoint?"
                )
            if key == entry.key and (
                list(info.shape) != list(entry.shape) or info.dtype != entry.dtype
            ):
                raise AbliterateError(
                    f"plan expects {key!r} as {entry.dtype} {list(entry.shape)}, but {model_dir} "
                    f"has {info.dtype} {list(info.shape)}; was the plan made for another checkpoint?"
                )
            keys = edit.setdefault(shard, [])
            if key not in keys:
                keys.append(key)
    for key, info in logical.items():  # bf16 output: the edited modules' other MXFP4 tensors
        keys = edit.setdefault(info.shard, [])
        if key not in keys:
            keys.append(key)
    link = [s for s in headers if s not in edit]
    jobs = {"model_dir": str(model_dir), "edit": edit, "link": link}
    if rewrites:
        jobs["mxfp4"] = {"output": mxfp4, "rewritten": sorted(rewrites)}
    return jobs


# --------------------------------------------------------------------------------------
# One shard job
# --------------------------------------------------------------------------------------


class PhaseTimes:
    """Seconds a shard job spends per phase, summed over its threads (`--profile`).

    Why: a shard job overlaps reading, editing and writing targets on `workers` threads
    with the kernel copying the untouched ranges on the main thread, so wall time alone
    does not say what to speed up. Thread-seconds per phase do (docs/ablation.md).
    """

    PHASES = ("read", "edit", "write", "copy", "fsync", "hash")

    def __init__(self):
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.seconds[name] += time.perf_counter() - start


def _phase(times: PhaseTimes | None, name: str):
    return times.phase(name) if times is not None else contextlib.nullcontext()


def edit_fp8_pair(src, dst_fd: int, info, scale_info, block_size, edits, device) -> None:
    """Dequantize an FP8 target, edit it in float32, write it and its fresh block scales."""
    weight, scale = read_tensor(src, info), read_tensor(src, scale_info)
    weight, scale = quant.edit_fp8(
        weight, scale, lambda w: edit_tensor(w, edits, device), block_size
    )
    write_at(dst_fd, tensor_bytes(weight), info.begin)
    write_at(dst_fd, tensor_bytes(scale), scale_info.begin)


class MXFP4Slice(NamedTuple):
    """One piece of an MXFP4 pair (`mxfp4_slices`): `index` is its first expert; `packed`
    and `exponents` its stored blocks and scales; `source` and `edited` float32 values in
    transformers' layout ([in, out] for one expert, [E, in, out] for the whole tensor)."""

    index: int
    packed: torch.Tensor
    exponents: torch.Tensor
    source: torch.Tensor
    edited: torch.Tensor
    edits: list

    def requantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (blocks, scales) the `requantize` output stores: the source's own bytes for
        a piece no edit touches (an expert outside `expert_subset`), else requantized."""
        if not self.edits:
            return self.packed, self.exponents
        edited = self.edited if self.edited.ndim == self.packed.ndim - 1 else self.edited[None]
        return quant.mxfp4_from_parameter(edited)


def mxfp4_slices(handle, blocks: TensorInfo, scales: TensorInfo, edits, device=None):
    """Yield the `MXFP4Slice`s of an MXFP4 pair: one expert at a time where the edits
    allow (as `tensor_chunks` streams a plain fused tensor), else the whole tensor once.

    The exporter and the verifier both go through this, so the verifier recomputes the
    exporter's exact bits; memory stays at one expert in float32, not the whole tensor.
    """
    experts = blocks.shape[0]
    shape = quant.mxfp4_parameter_shape(blocks.shape)
    virtual = TensorInfo(blocks.name, blocks.shard, "F32", shape, 0, 4 * math.prod(shape))
    block_step, scale_step = blocks.nbytes // experts, scales.nbytes // experts
    for index, (_, chunk_shape, chunk_edits) in enumerate(tensor_chunks(virtual, edits)):
        whole = tuple(chunk_shape) == tuple(shape)
        count = experts if whole else 1
        packed = read_tensor(
            handle, blocks, begin=blocks.begin + index * block_step,
            shape=(count, *blocks.shape[1:]),
        )  # fmt: skip
        exponents = read_tensor(
            handle, scales, begin=scales.begin + index * scale_step,
            shape=(count, *scales.shape[1:]),
        )  # fmt: skip
        source = quant.mxfp4_parameter(packed, exponents).contiguous()
        if not whole:
            source = source[0]
        edited = edit_tensor(source.clone(), chunk_edits, device)
        yield MXFP4Slice(index, packed, exponents, source, edited, chunk_edits)


def edit_mxfp4_requantized(src, dst_fd: int, blocks, scales, edits, device) -> None:
    """Dequantize an MXFP4 target, edit it, requantize it in place: blocks and scales keep
    their shapes and offsets (the `requantize` output)."""
    experts = blocks.shape[0]
    block_step, scale_step = blocks.nbytes // experts, scales.nbytes // experts
    for piece in mxfp4_slices(src, blocks, scales, edits, device):
        packed, exponents = piece.requantized()
        write_at(dst_fd, tensor_bytes(packed), blocks.begin + piece.index * block_step)
        write_at(dst_fd, tensor_bytes(exponents), scales.begin + piece.index * scale_step)


_single_thread_users = 0
_single_thread_lock = threading.Lock()
_saved_threads = 1


@contextlib.contextmanager
def _one_torch_thread_per_worker():
    """Torch intra-op threads set to 1 while shard workers run (restored by the last one).

    Why: each worker already keeps a core busy; two workers that each fork two intra-op
    threads for every 1 MiB block run at less than half the speed of two single-threaded
    ones (measured: 0.9 vs 2.0 GB/s on 2 cores). The edit's bits do not depend on the
    thread count (tests/test_edit.py), so the export still equals the evaluation.
    """
    global _single_thread_users, _saved_threads
    with _single_thread_lock:
        if _single_thread_users == 0:
            _saved_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        _single_thread_users += 1
    try:
        yield
    finally:
        with _single_thread_lock:
            _single_thread_users -= 1
            if _single_thread_users == 0:
                torch.set_num_threads(_saved_threads)


def ablate_shard(
    model_dir: str | Path,
    shard: str,
    plan: Plan,
    output: str | Path,
    *,
    device: str | None = None,
    digest: bool = False,
    workers: int = 2,
    times: PhaseTimes | None = None,
    record: dict | None = None,
    mxfp4: str = quant.DEFAULT_MXFP4_OUTPUT,
) -> str | None:
    """Write `shard` of `model_dir`, with the plan's edits applied, to `output`.

    The output has the source's exact header and byte layout (edits keep dtype and
    shape), and it is written front to back like `cp` writes: untouched ranges are copied
    file-to-file by the kernel, and each target (one fused expert slice at a time) is
    read and edited in float32 on `device`, ahead of the writer, by `workers` threads
    into a few reused buffers, then written in file order. So reading, editing and
    writing overlap, the file system sees one sequential writer, and memory stays at
    `workers + 1` targets whatever the shard size. With `digest` the bytes are hashed on
    the way (the untouched ranges then go through a buffer instead of the kernel copy),
    so no second pass reads the file back; returns the SHA-256. The file is written as
    `<output>.tmp`, fsynced and renamed when complete. `times` collects thread-seconds.

    MXFP4 targets (gpt-oss experts, stored as `_blocks` + `_scales`) are written as
    `mxfp4`: "requantize" rewrites the pair in place (the layout stays the source's), "bf16"
    replaces it by the bf16 parameter, so the shard gets a new header (`_write_converted`).

    `record` (a dict) receives what this job knew as it wrote the shard: `"tensors"`,
    `{key: (residual, drift)}`, the edit's invariants measured on each edited tensor in
    memory before it was written (`edit.edit_errors`), for every key whose pieces are all
    single plain edits; and `"sha256"`, when the digest was computed on the way, i.e. from
    the source's own untouched bytes and the written buffers (not for FP8 shards, hashed
    from the file). With both, verification need not read the source nor recompute those
    edits (`verify(..., written=...)`).
    """
    check_mxfp4_output(mxfp4)
    source = Path(model_dir) / shard
    output = Path(output)
    check_output_location(model_dir, output.parent)
    header: ShardHeader = read_header(source)
    edits = plan.edits(shard)
    rewrites = {}
    if any(name.endswith(quant.MXFP4_BLOCKS_SUFFIX) for name in header.tensors):
        # the whole checkpoint decides which modules' tensors convert (bf16 output)
        every = mxfp4_rewrites(read_checkpoint(model_dir), plan.keys(), mxfp4)
        rewrites = {k: pair for k, pair in every.items() if pair[0].shard == shard}
    missing = [k for k in edits if k not in header.tensors and k not in rewrites]
    if missing:
        raise AbliterateError(f"{source}: has no tensor {missing[0]!r}, which the plan edits.")
    if rewrites and mxfp4 == "bf16":
        return _write_converted(source, header, output, edits, rewrites, device, digest, times)
    targets = sorted(
        (header.tensors[k] for k in edits if k not in rewrites), key=lambda info: info.begin
    )
    fp8 = quant.fp8_scales(model_dir, header.tensors, edits)  # FP8 targets rewrite their scale too
    size = source.stat().st_size
    # the file in order: ("copy", begin, end), ("edit", info, begin, shape, edits) pieces,
    # ("fp8", info) pairs (weight + block scales, written by their worker at two offsets) and
    # ("mxfp4", blocks, key) pairs (requantized blocks + scales, likewise)
    pieces: list[tuple] = []
    for info in targets:
        if info.name in fp8:
            pieces.append(("fp8", info))
            continue
        for begin, shape, chunk_edits in tensor_chunks(info, edits[info.name]):
            pieces.append(("edit", info, begin, shape, chunk_edits))
    pieces += [("mxfp4", blocks, key) for key, (blocks, _) in rewrites.items()]
    written = sorted(
        [(p[2], p[2] + _nbytes(p[1], p[3])) for p in pieces if p[0] == "edit"]
        + [(p[1].begin, p[1].end) for p in pieces if p[0] in ("fp8", "mxfp4")]
        + [(scale.begin, scale.end) for scale, _ in fp8.values()]
        + [(scales.begin, scales.end) for _, scales in rewrites.values()]
    )
    segments, position = [], 0
    for begin, end in written:
        if begin > position:
            segments.append(("copy", position, begin))
        position = max(position, end)
    if position < size:
        segments.append(("copy", position, size))
    order = sorted(
        segments + pieces,
        key=_piece_start,
    )
    largest = max((_nbytes(p[1], p[3]) for p in pieces if p[0] == "edit"), default=0)
    tmp = output.with_name(output.name + ".tmp")
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        # two read handles, so the writer's sequential copy and the workers' reads ahead of
        # it each keep their own kernel read-ahead (one shared handle defeats it when cold)
        with open(source, "rb") as src, open(source, "rb") as ahead_src, open(tmp, "wb") as dst:
            for handle in (src, ahead_src):
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            os.ftruncate(dst.fileno(), size)
            depth = max(1, workers) + 1  # targets in flight: one being written, the rest ahead
            free: queue.Queue[bytearray] = queue.Queue()
            for _ in range(depth):
                free.put(bytearray(largest))
            out_of_order = fp8 or rewrites
            hasher = _Hasher(src, free, times) if digest and not out_of_order else None
            read_ahead = _ReadAhead(ahead_src.fileno(), size)
            found: dict[str, list] = collections.defaultdict(list)

            def edit_piece(piece):
                info = piece[1]
                if piece[0] == "mxfp4":
                    logger.info("Modifying %s (MXFP4, requantized)", piece[2])
                    blocks, scales = rewrites[piece[2]]
                    edit_mxfp4_requantized(
                        ahead_src, dst.fileno(), blocks, scales, edits.get(piece[2], []), device
                    )
                    return None
                if piece[0] == "fp8":
                    logger.info("Modifying %s", info.name)
                    edit_fp8_pair(
                        ahead_src, dst.fileno(), info, *fp8[info.name], edits[info.name], device
                    )
                    return None
                _, info, begin, shape, chunk_edits = piece
                if begin == info.begin:
                    logger.info("Modifying %s", info.name)
                buffer = free.get()
                with _phase(times, "read"):
                    weight = read_tensor(ahead_src, info, begin=begin, shape=shape, buffer=buffer)
                entry = _checkable(chunk_edits) if record is not None else None
                with _phase(times, "edit"):
                    if entry is not None:
                        r = unit(entry.direction)
                        before = hidden_vector_stats(weight, r, entry.hidden_axis, device)
                    edit_tensor(weight, chunk_edits, device, out=weight)
                    errors = None
                    if entry is not None:
                        after = hidden_vector_stats(weight, r, entry.hidden_axis, device)
                        errors = edit_errors(before, after, entry.scale, entry.norm_preserve)
                    elif not chunk_edits:  # an expert slice outside the subset: source bytes
                        errors = (0.0, 0.0)
                return buffer, weight, errors

            with (
                _one_torch_thread_per_worker(),
                concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool,
            ):
                ahead = iter([p for p in order if p[0] != "copy"])
                futures: collections.deque = collections.deque()

                def submit_next() -> None:
                    piece = next(ahead, None)
                    if piece is not None:
                        futures.append(pool.submit(edit_piece, piece))

                for _ in range(depth):
                    submit_next()
                try:
                    for piece in order:
                        read_ahead.advance(_piece_start(piece))
                        if piece[0] == "copy":
                            with _phase(times, "copy"):
                                copy_range_at(src.fileno(), dst.fileno(), piece[1], piece[2])
                            if hasher is not None:
                                hasher.source_range(piece[1], piece[2])
                            continue
                        result = futures.popleft().result()
                        submit_next()
                        if result is None:  # an FP8 or MXFP4 pair, written by its worker
                            continue
                        buffer, weight, errors = result
                        if record is not None:
                            found[piece[1].name].append(errors)
                        data = tensor_bytes(weight)
                        with _phase(times, "write"):
                            write_at(dst.fileno(), data, piece[2])
                        if hasher is not None:
                            hasher.written(data, buffer)  # it returns the buffer when hashed
                        else:
                            free.put(buffer)
                except BaseException:
                    for future in futures:
                        future.cancel()
                    for _ in range(depth):  # wake waiting workers with buffers too small: they fail
                        free.put(bytearray())
                    if hasher is not None:
                        hasher.abandon()
                    raise
                finally:
                    read_ahead.stop()
            sha256 = hasher.finish() if hasher is not None else None
            with _phase(times, "fsync"):
                os.fsync(dst.fileno())
        if tmp.stat().st_size != size:
            raise AbliterateError(f"{tmp}: wrote {tmp.stat().st_size} bytes, expected {size}.")
        if digest and sha256 is None:  # quantized pairs are written out of order: hash the file
            with _phase(times, "hash"):
                sha256 = file_sha256(tmp)
        tmp.replace(output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if record is not None:
        record["tensors"] = {
            key: (max(e[0] for e in errors), max(e[1] for e in errors))
            for key, errors in found.items()
            if all(e is not None for e in errors)  # else verification recomputes the key
        }
        if hasher is not None:
            record["sha256"] = sha256
    return sha256


def converted_entries(header: ShardHeader, rewrites: dict) -> list[tuple[str, str, tuple]]:
    """[(name, dtype, shape)] of a shard whose MXFP4 pairs become bf16 parameters, in the
    source's order: each `_blocks` tensor's place taken by its parameter, `_scales` gone."""
    blocks = {pair[0].name: key for key, pair in rewrites.items()}
    scales = {pair[1].name for pair in rewrites.values()}
    entries = []
    for info in sorted(header.tensors.values(), key=lambda t: t.begin):
        if info.name in blocks:
            key = blocks[info.name]
            entries.append((key, "BF16", quant.mxfp4_parameter_shape(info.shape)))
        elif info.name not in scales:
            entries.append((info.name, info.dtype, tuple(info.shape)))
    return entries


def _write_converted(source, header, output, edits, rewrites, device, digest, times) -> str | None:
    """Write a shard whose MXFP4 pairs become bf16 parameters (the `bf16` output).

    Why a writer of its own: the tensors change size, so the file gets a new header and
    every tensor a new offset; untouched tensors are still copied byte for byte by the
    kernel, plain targets streamed through `tensor_chunks`, MXFP4 pairs one expert at a
    time (`mxfp4_slices`), all front to back on one thread. Same temp-name convention.
    """
    entries = converted_entries(header, rewrites)
    head = encode_header(entries, header.metadata)
    tmp = output.with_name(output.name + ".tmp")
    output.parent.mkdir(parents=True, exist_ok=True)
    position = len(head)
    try:
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            write_at(dst.fileno(), head, 0)
            for name, dtype, shape in entries:
                nbytes = math.prod(shape) * DTYPES[dtype][1]
                if name in rewrites:
                    blocks, scales = rewrites[name]
                    logger.info(
                        "%s %s (MXFP4 -> bf16)",
                        "Modifying" if name in edits else "Converting",
                        name,
                    )
                    step = nbytes // shape[0]
                    for piece in mxfp4_slices(src, blocks, scales, edits.get(name, []), device):
                        with _phase(times, "write"):
                            data = tensor_bytes(piece.edited.to(torch.bfloat16))
                            write_at(dst.fileno(), data, position + piece.index * step)
                elif name in edits:
                    info = header.tensors[name]
                    logger.info("Modifying %s", name)
                    for begin, chunk_shape, chunk_edits in tensor_chunks(info, edits[name]):
                        with _phase(times, "read"):
                            weight = read_tensor(src, info, begin=begin, shape=chunk_shape)
                        with _phase(times, "edit"):
                            edit_tensor(weight, chunk_edits, device, out=weight)
                        with _phase(times, "write"):
                            write_at(
                                dst.fileno(), tensor_bytes(weight), position + begin - info.begin
                            )
                else:
                    info = header.tensors[name]
                    with _phase(times, "copy"):
                        copy_range_at(src.fileno(), dst.fileno(), info.begin, info.end, position)
                position += nbytes
            with _phase(times, "fsync"):
                os.fsync(dst.fileno())
        if tmp.stat().st_size != position:
            raise AbliterateError(f"{tmp}: wrote {tmp.stat().st_size} bytes, expected {position}.")
        sha256 = None
        if digest:
            with _phase(times, "hash"):
                sha256 = file_sha256(tmp)
        tmp.replace(output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return sha256


def _piece_start(piece) -> int:
    """The byte offset in the shard where a piece of `ablate_shard`'s file order begins."""
    if piece[0] == "copy":
        return piece[1]
    return piece[2] if piece[0] == "edit" else piece[1].begin


def _checkable(chunk_edits):
    """The one plan entry of a piece whose invariants are known at any scale (a plain
    projection, or the norm-preserving one along the hidden axis), else None."""
    if len(chunk_edits) != 1:
        return None
    entry, _ = chunk_edits[0]
    if getattr(entry, "rows", None) is not None or getattr(entry, "experts", None) is not None:
        return None
    if entry.norm_preserve and entry.preserve != "hidden" and not chunk_edits[0][1]:
        return None
    if chunk_edits[0][1]:  # a writer's bias: plainly projected (edit.ablate_bias)
        return replace(entry, hidden_axis=-1, norm_preserve=False)
    return entry


class _ReadAhead:
    """Asks the kernel for the source's next `READ_AHEAD` bytes ahead of the writer.

    Why: on a cold cache the writer's kernel copy reads with a read-ahead window of a few
    hundred KiB and the workers read targets in bursts, so the disk idles whenever the CPU
    edits; `POSIX_FADV_WILLNEED` from a thread of its own keeps its queue full, as a
    streaming `cp` of the whole file does. A warm cache makes each call a no-op.
    """

    def __init__(self, fd: int, size: int):
        self._fd, self._size = fd, size
        self._position = 0
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="shard-read-ahead", daemon=True)
        self._thread.start()

    def advance(self, position: int) -> None:
        with self._wake:
            self._position = position
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        asked = 0
        while True:
            with self._wake:
                while not self._stopped and asked >= min(self._size, self._position + READ_AHEAD):
                    self._wake.wait()
                if self._stopped:
                    return
                asked = max(asked, self._position)
            length = min(READ_AHEAD_STEP, self._size - asked)
            try:
                os.posix_fadvise(self._fd, asked, length, os.POSIX_FADV_WILLNEED)
            except OSError:
                return  # advice only: the reads themselves still happen
            asked += length


class _Hasher:
    """The shard's SHA-256, computed in file order on a thread of its own while it is written.

    Why a thread: hashing runs at ~1.7 GB/s per core, about the disk's speed, so on the
    writer's thread it would halve the export's throughput; hashlib releases the GIL, so
    here it overlaps the copy, the edits and the writes. Untouched ranges are hashed from
    the source (the bytes the kernel copied, read again from the page cache); edited
    pieces from the buffer that was written, which goes back to the workers afterwards.
    """

    def __init__(self, src, free: queue.Queue, times: PhaseTimes | None):
        self._src, self._free, self._times = src, free, times
        self._digest = hashlib.sha256()
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._buffer = bytearray(HASHED_COPY_CHUNK)
        self._thread = threading.Thread(target=self._run, name="shard-hash", daemon=True)
        self._thread.start()

    def source_range(self, begin: int, end: int) -> None:
        self._queue.put(("range", begin, end))

    def written(self, data, buffer: bytearray) -> None:
        self._queue.put(("data", data, buffer))

    def finish(self) -> str:
        """The hex digest once everything queued is hashed (or the error it met)."""
        self.abandon()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest()

    def abandon(self) -> None:
        """Stop after what is queued (returning its buffers), without raising."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        view = memoryview(self._buffer)
        while (item := self._queue.get()) is not None:
            try:
                if self._error is not None:
                    continue
                with _phase(self._times, "hash"):
                    if item[0] == "data":
                        self._digest.update(item[1])
                    else:
                        position, end = item[1], item[2]
                        while position < end:
                            n = os.preadv(
                                self._src.fileno(),
                                [view[: min(len(view), end - position)]],
                                position,
                            )
                            if n <= 0:
                                raise AbliterateError(
                                    f"{self._src.name}: file ended at byte {position}, expected {end}."
                                )
                            self._digest.update(view[:n])
                            position += n
            except BaseException as error:  # reported by finish(); keep draining the queue
                self._error = error
            finally:
                if item[0] == "data":
                    self._free.put(item[2])


def _nbytes(info, shape) -> int:
    """Bytes of a `shape`-sized piece of the tensor `info` (a fused expert slice, say)."""
    return math.prod(shape) * DTYPES[info.dtype][1]


def link_or_copy(source: str | Path, destination: str | Path) -> str:
    """Hard-link an edited shard of our own (the workflow's `export/shards/`, a temporary
    output that Snakemake deletes once assembled) into the output, else copy it.

    Never used for the source model's files: those go through `files.place_copy` with the
    export's link mode, so the output shares no writable inode with the source by default.
    """
    return place_copy(source, destination, "hardlink")


# --------------------------------------------------------------------------------------
# Assembling the output directory
# --------------------------------------------------------------------------------------


def _sha256_files(
    paths: list[Path], known: dict[str, str], jobs: int, hash_shards: bool = True
) -> dict[str, str | None]:
    """SHA-256 of each file (from `known` when a shard job computed it on the way)."""
    skip = {p.name for p in paths if not hash_shards and p.suffix == ".safetensors"}
    todo = [p for p in paths if p.name not in known and p.name not in skip]
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        digests = dict(zip((p.name for p in todo), pool.map(file_sha256, todo), strict=True))
    return {p.name: None if p.name in skip else known.get(p.name) or digests[p.name] for p in paths}


def assemble(
    model_dir: str | Path,
    output: str | Path,
    plan: Plan,
    edited_dir: str | Path,
    *,
    metrics: dict | None = None,
    digests: dict[str, str] | None = None,
    jobs: int = 1,
    hash_shards: bool = True,
    link_mode: str = "auto",
    allow_external_links: bool = False,
    locked: bool = False,
    card: CardOptions | None = None,
    publish: bool = True,
    mxfp4: str = quant.DEFAULT_MXFP4_OUTPUT,
) -> Path:
    """Build the output checkpoint directory from edited shards + the untouched source.

    Everything goes into `<output>.partial` and is renamed to `output` at the end (with
    `publish=False` the complete staging directory is returned instead, for a check before
    `publish`). Edited shards come from `edited_dir` (linked, or already in place when it
    is the staging directory); untouched shards are hard-linked from the source (copied
    across filesystems). Writes the index, the config/tokenizer/chat-template files,
    remote-code `.py` files if the source has any, `README.md` (model card) and
    `manifest.json` (names and relative paths only: it is published with the weights).
    Where edited shards replaced MXFP4 pairs by bf16 parameters (`mxfp4="bf16"`), the
    index is rewritten from their headers and config.json's `quantization_config` updated
    (`quant.mxfp4_output_config`), so transformers loads what the shards now hold.
    """
    model_dir, output, edited_dir = Path(model_dir), Path(output), Path(edited_dir)
    check_output_location(model_dir, output)
    with contextlib.nullcontext() if locked else exclusive_lock(output):
        jobs_info = plan_shards(plan, model_dir, allow_external_links, mxfp4)
        staging_path = output.with_name(output.name + ".partial")
        in_place = edited_dir.absolute() == staging_path.absolute()
        keep = set(jobs_info["edit"]) | {MARKER} if in_place else set()
        staging = _fresh_staging(output, keep)
        actions: dict[str, str] = {}
        for shard in jobs_info["edit"]:
            edited = edited_dir / shard
            if not edited.is_file():
                raise AbliterateError(f"{edited}: edited shard missing; run its ablate_shard job.")
            if not in_place:
                link_or_copy(edited, staging / shard)
            actions[shard] = "edited"
        for shard in jobs_info["link"]:
            source = resolve_source(model_dir, shard, allow_external=allow_external_links)
            actions[shard] = place_copy(source, staging / shard, link_mode)
        if link_mode == "hardlink" and "hardlinked" in actions.values():
            logger.warning(
                "Unedited shards of %s are hard links to the base model's files "
                "(export.link: hardlink): writing to them in place changes the base model.",
                output,
            )
        converted = _converted_names(model_dir, staging, jobs_info["edit"])
        if (model_dir / INDEX_NAME).is_file():
            index_path = resolve_source(model_dir, INDEX_NAME, allow_external=allow_external_links)
            index = json.loads(index_path.read_text())
            index.setdefault("metadata", {})["abliterated"] = True
            if converted["added"]:
                _rewrite_index(index, converted, staging)
            write_json(index, staging / INDEX_NAME)
        copied = []
        for path in sorted(model_dir.iterdir()):
            if path.name in METADATA_FILES or path.suffix == ".py":
                if not path.is_file():
                    continue
                source = resolve_source(model_dir, path.name, allow_external=allow_external_links)
                place_copy(source, staging / path.name, "copy")
                copied.append(path.name)
        if converted["added"]:
            config = json.loads((staging / "config.json").read_text())
            left = any(
                name.endswith(quant.MXFP4_BLOCKS_SUFFIX) for name in read_weight_map(staging)
            )
            config = quant.mxfp4_output_config(config, converted["added"], left)
            write_json(config, staging / "config.json")
        card_text = model_card(plan, model_dir, metrics, link_mode=link_mode, options=card)
        write_text_atomic(staging / "README.md", card_text)
        if publish:
            (staging / MARKER).unlink(missing_ok=True)
        files = sorted(
            p
            for p in staging.iterdir()
            if p.is_file() and p.name != "manifest.json" and not p.name.startswith(".")
        )
        manifest = {
            "base_model": source_name(model_dir),
            "link_mode": link_mode,
            "recipe": portable_recipe(plan.recipe, model_dir),
            "measurements": Path(plan.measurements).name if plan.measurements else None,
            "measurements_sha256": plan.measurements_sha256,
            "plan_sha256": plan.sha256(),
            "edited_tensors": len(plan.entries),
            "shards": actions,
            **({"mxfp4_output": mxfp4} if jobs_info.get("mxfp4") else {}),
            "copied_files": copied,
            "metrics": metrics,
            "verification": None,
            "sha256": _sha256_files(files, digests or {}, jobs, hash_shards),
        }
        write_json(manifest, staging / "manifest.json")
        if not publish:
            return staging
        _move_into_place(staging, output)
        logger.info(
            "Wrote %s: %d edited shard(s), %d linked/copied, %d metadata files",
            output,
            len(jobs_info["edit"]),
            len(jobs_info["link"]),
            len(copied),
        )
        return output


def _converted_names(model_dir: Path, staging: Path, shards) -> dict:
    """{'added': {name: shard}, 'removed': [names]}: tensor names the edited shards in
    `staging` have that their sources do not (bf16 parameters of MXFP4 pairs), and back."""
    added: dict[str, str] = {}
    removed: list[str] = []
    for shard in shards:
        before = read_header(model_dir / shard).tensors
        after = read_header(staging / shard).tensors
        added.update((name, shard) for name in after if name not in before)
        removed += [name for name in before if name not in after]
    return {"added": added, "removed": removed}


def _rewrite_index(index: dict, converted: dict, staging: Path) -> None:
    """The index of an export whose shards renamed tensors: the weight map from the edited
    shards' headers, and `total_size` (the tensors' bytes) recomputed."""
    weight_map = {
        name: shard
        for name, shard in index["weight_map"].items()
        if name not in converted["removed"]
    }
    weight_map.update(converted["added"])
    index["weight_map"] = dict(sorted(weight_map.items()))
    if "total_size" in index.get("metadata", {}):
        total = 0
        for shard in sorted(set(weight_map.values())):
            total += sum(info.nbytes for info in read_header(staging / shard).tensors.values())
        index["metadata"]["total_size"] = total


def _move_into_place(directory: Path, output: Path) -> None:
    """Rename a finished directory to `output`, replacing whatever is there."""
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        output.unlink()
    elif output.exists():
        shutil.rmtree(output)
    directory.replace(output)


def publish(
    directory: str | Path,
    output: str | Path,
    plan: Plan,
    model_dir: str | Path,
    *,
    metrics: dict | None = None,
    link_mode: str = "auto",
    card: CardOptions | None = None,
    verification: dict | None = None,
) -> Path:
    """Write the verification result into the card and manifest of a complete export in
    `directory`, then rename it to `output` (the last step, so `output` only ever holds a
    finished export with its final card).

    Why after verification: the card should say whether the export verified, and the
    verification reads the export, so it runs on the complete directory first; only
    README.md and manifest.json change afterwards (the manifest's README hash with it).
    """
    directory, output = Path(directory), Path(output)
    manifest_path = directory / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        hashes = manifest["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise AbliterateError(
            f"{manifest_path}: missing or malformed; expected the manifest of an assembled "
            "export (run assemble first)."
        ) from None
    text = model_card(
        plan, model_dir, metrics, link_mode=link_mode, options=card, verification=verification
    )
    write_text_atomic(directory / "README.md", text)
    hashes["README.md"] = file_sha256(directory / "README.md")
    if verification is not None:
        manifest["verification"] = {
            "ok": bool(verification.get("ok")),
            "failure_count": verification.get("failure_count", 0),
        }
    write_json(manifest, manifest_path)
    (directory / MARKER).unlink(missing_ok=True)
    if directory.absolute() != output.absolute():
        _move_into_place(directory, output)
    return output


class VerificationFailed(AbliterateError):
    """The export was complete but failed its check; it was not published."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def _fresh_staging(output: Path, keep: set[str]) -> Path:
    """`<output>.partial`, emptied of everything but `keep` (finished shards, the marker).

    A staging path that is a link (to the source, say) is removed, never followed, and
    files left by an earlier run (a stray `modeling_*.py`, a truncated extra shard) are
    deleted, so nothing but what this export writes can reach the output.
    """
    staging = output.with_name(output.name + ".partial")
    if staging.is_symlink() or (staging.exists() and not staging.is_dir()):
        logger.info("Removing %s (not a directory of this export)", staging)
        staging.unlink()
    staging.mkdir(parents=True, exist_ok=True)
    for path in staging.iterdir():
        if path.name in keep and path.is_file() and not path.is_symlink():
            continue
        logger.info("Removing stale %s", path)
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return staging


# --------------------------------------------------------------------------------------
# The standalone driver (`abliterate ablate`)
# --------------------------------------------------------------------------------------


def export_model(
    plan: Plan,
    output: str | Path,
    *,
    model_dir: str | Path | None = None,
    jobs: int = 1,
    device: str | None = None,
    force: bool = False,
    metrics: dict | None = None,
    hash_shards: bool = True,
    link_mode: str = "auto",
    allow_external_links: bool = False,
    card: CardOptions | None = None,
    check: Callable[[Path], dict] | None = None,
    written: dict | None = None,
    mxfp4: str = quant.DEFAULT_MXFP4_OUTPUT,
) -> Path:
    """Run every shard job (`jobs` in parallel) and assemble `output`, resumably.

    `check(directory)` (e.g. `verify`) runs on the complete export before it is
    published; its report goes into the card and the manifest, and an export that fails
    it is not published: `VerificationFailed` carries the report, and the staging
    directory stays for inspection (without its plan marker, so a rerun rebuilds it).

    Finished shards are kept in `<output>.partial` under their real names, so rerunning
    after an interruption only redoes the shards that were not complete (the staging
    directory is reused only if it was started for the very same plan).
    `hash_shards=False` leaves the shards' SHA-256 out of the manifest (null), saving a
    hashing pass over the whole model (`--no-hash`). `mxfp4` is the output format of
    MXFP4 targets ("bf16" or "requantize", docs/quantized.md).

    `written` (a dict) receives, for each shard edited by this run and hashed on the way,
    what its job knew as it wrote it (`ablate_shard`'s `record`); `check` may use it to
    verify by digest.
    """
    check_mxfp4_output(mxfp4)
    model_dir = Path(model_dir or plan.model_dir)
    output = Path(output)
    check_output_location(model_dir, output)
    if output.exists() and not output.is_dir():
        raise AbliterateError(
            f"{output}: exists and is not a directory; expected an output directory."
        )
    if output.exists() and not force:
        if _holds_export_of(output, plan, mxfp4):
            logger.info("%s already holds the export of this plan; keeping it", output)
            return output
        raise AbliterateError(
            f"{output}: output directory already exists; remove it or pass --force."
        )
    with exclusive_lock(output):
        jobs_info = plan_shards(plan, model_dir, allow_external_links, mxfp4)
        staging = output.with_name(output.name + ".partial")
        marker = staging / MARKER
        plan_id = plan.sha256()
        if jobs_info.get("mxfp4"):  # shards written in the other format are not reusable
            plan_id += f" mxfp4={mxfp4}"
        same_plan = (
            staging.is_dir()
            and not staging.is_symlink()
            and marker.is_file()
            and marker.read_text() == plan_id
        )
        if staging.exists() or staging.is_symlink():
            if not same_plan:
                logger.info("Discarding %s (started for another plan)", staging)
            # only finished shards of this very plan survive; links and strays are removed
            _fresh_staging(output, set(jobs_info["edit"]) | {MARKER} if same_plan else set())
        staging.mkdir(parents=True, exist_ok=True)
        write_text_atomic(marker, plan_id)
        todo = [s for s in jobs_info["edit"] if not (staging / s).is_file()]
        done = len(jobs_info["edit"]) - len(todo)
        if done:
            logger.info("Resuming: %d of %d edited shards already complete", done, len(todo) + done)
        digests: dict[str, str] = {}
        records: dict[str, dict] = {shard: {} for shard in todo}

        def shard_job(shard: str) -> str | None:
            return ablate_shard(
                model_dir,
                shard,
                plan,
                staging / shard,
                device=device,
                digest=hash_shards,
                record=records[shard] if written is not None else None,
                mxfp4=mxfp4,
            )

        if jobs <= 1 or len(todo) <= 1:
            for shard in todo:
                digests[shard] = shard_job(shard)
        else:
            # Threads, not processes: the edit (torch) and the copies (kernel) release the GIL,
            # and a thread needs no second interpreter importing torch.
            with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
                futures = {pool.submit(shard_job, s): s for s in todo}
                for future in concurrent.futures.as_completed(futures):
                    digests[futures[future]] = future.result()
        if written is not None:
            written.update({s: r for s, r in records.items() if "sha256" in r})
        assembled = assemble(
            model_dir,
            output,
            plan,
            staging,
            metrics=metrics,
            digests=digests,
            jobs=jobs,
            hash_shards=hash_shards,
            link_mode=link_mode,
            allow_external_links=allow_external_links,
            locked=True,  # this export holds the lock already
            card=card,
            publish=False,
            mxfp4=mxfp4,
        )
        report = check(assembled) if check is not None else None
        if report is not None and not report.get("ok"):
            marker.unlink(missing_ok=True)
            failures = report.get("failures") or ["(no detail)"]
            raise VerificationFailed(
                f"{output}: the export failed verification ({failures[0]}); it was not "
                f"published, the unpublished files are in {staging}.",
                report,
            )
        return publish(
            assembled,
            output,
            plan,
            model_dir,
            metrics=metrics,
            link_mode=link_mode,
            card=card,
            verification=report,
        )


def _holds_export_of(output: Path, plan: Plan, mxfp4: str = quant.DEFAULT_MXFP4_OUTPUT) -> bool:
    """Whether `output` is a finished export of this very plan (a rerun after a kill that
    came once the output was in place, e.g. during verification, converges instead of
    failing). An output only ever appears by renaming a complete staging directory."""
    try:
        manifest = json.loads((output / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(manifest, dict)
        and manifest.get("plan_sha256") == plan.sha256()
        and manifest.get("mxfp4_output", mxfp4) == mxfp4
    )


def read_digests(paths) -> dict[str, str]:
    """{shard: sha256} from the `<shard>.sha256` files the shard jobs wrote."""
    digests = {}
    for path in paths or []:
        path = Path(path)
        digests[path.name[: -len(".sha256")]] = path.read_text().strip()
    return digests


def sweep_metrics(sweep_table: str | Path | None) -> dict | None:
    """The selected variant's metrics from sweep.tsv (for the model card), if any.

    Rates come with their 95 % Wilson intervals (the grid's table has none, so they are
    computed here from the prompt counts) and the base model's values; `split` is the
    prompt split they were measured on (the grid evaluates on the test split).
    """
    if not sweep_table or not Path(sweep_table).is_file():
        return None
    import pandas as pd

    from .search import add_intervals

    table = pd.read_csv(sweep_table, sep="\t")
    if "selected" not in table:
        return None
    if "refusal_rate_ci_low" not in table and {"n_target", "n_benign"} <= set(table):
        table = add_intervals(table)
    chosen = table[table["selected"].astype(bool)]
    if chosen.empty:
        return None
    row = chosen.iloc[0]
    columns = ["variant", "split", "refusal_rate", "kl_first_token", "kl_multi_token"]
    columns += ["benign_kept", "benign_refusal_rate"]
    # the search's table (sweep.method tpe) also has 95 % intervals and the base model's row
    columns = [c for name in columns for c in (name, f"{name}_ci_low", f"{name}_ci_high")]
    metrics = {c: _plain(row[c]) for c in columns + ["n_target", "n_benign"] if c in row}
    metrics.setdefault("split", "test")
    base = table[table["variant"] == "base"]
    if not base.empty:
        for name in ("refusal_rate", "benign_refusal_rate", "kl_first_token", "benign_kept"):
            if name in base:
                metrics[f"base_{name}"] = _plain(base.iloc[0][name])
    return metrics


def _plain(value):
    return value.item() if hasattr(value, "item") else value
