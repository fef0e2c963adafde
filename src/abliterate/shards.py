"""Safetensors checkpoints read by their headers, never by unpickling.

Why headers: inspection and planning must work on a 200 GB checkpoint in milliseconds and
without memory, so everything before the edit itself reads only the JSON header of each
shard (8-byte little-endian length + JSON) and the index file.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AbliterateError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype string -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
TORCH_TO_SAFETENSORS = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its shard file, dtype, shape and absolute byte range."""

    name: str
    shard: str  # file name relative to the model directory
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute offset in the shard file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    header_size: int  # length of the JSON header in bytes
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    @property
    def data_start(self) -> int:
        return 8 + self.header_size


def read_header(path: str | Path) -> ShardHeader:
    """Parse and validate one safetensors header without touching the tensor data."""
    path = Path(path)
    if not path.is_file():
        raise AbliterateError(f"{path}: safetensors file not found.")
    file_size = path.stat().st_size
    with open(path, "rb") as handle:
        raw_length = handle.read(8)
        if len(raw_length) < 8:
            raise AbliterateError(
                f"{path}: corrupt safetensors header (file is {file_size} bytes, "
                "expected at least an 8-byte header length)."
            )
        (header_size,) = struct.unpack("<Q", raw_length)
        if header_size > min(MAX_HEADER_BYTES, file_size - 8):
            raise AbliterateError(
                f"{path}: corrupt safetensors header (declared header length {header_size} "
                f"does not fit in a {file_size}-byte file)."
            )
        raw_header = handle.read(header_size)
    try:
        header = json.loads(raw_header)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as error:
        raise AbliterateError(
            f"{path}: corrupt safetensors header (expected a JSON object: {error})."
        ) from None
    data_start = 8 + header_size
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise AbliterateError(
                f"{path}: corrupt safetensors header (tensor {name!r} lacks dtype, shape "
                "or data_offsets)."
            ) from None
        if dtype not in DTYPES:
            raise AbliterateError(
                f"{path}: tensor {name!r} has dtype {dtype!r}, expected one of {', '.join(DTYPES)}."
            )
        numel = 1
        for n in shape:
            numel *= n
        expected = numel * DTYPES[dtype][1]
        if begin < 0 or end - begin != expected or data_start + end > file_size:
            raise AbliterateError(
                f"{path}: corrupt safetensors header (tensor {name!r} has data_offsets "
                f"[{begin}, {end}] but expected {expected} bytes inside a {file_size}-byte "
                "file; the file may be truncated)."
            )
        tensors[name] = TensorInfo(
            name, path.name, dtype, shape, data_start + begin, data_start + end
        )
    _check_byte_ranges(path, tensors, data_start, file_size)
    return ShardHeader(path, header_size, tensors, metadata)


def _check_byte_ranges(
    path: Path, tensors: dict[str, TensorInfo], data_start: int, file_size: int
) -> None:
    """Tensors must tile the data buffer exactly: ordered, no overlap, no hole, no tail.

    Why: the exporter copies byte ranges and rewrites target ranges in place, so two tensors
    sharing bytes would let an edit of one silently change the other, and bytes that belong
    to no tensor would be carried into the output unchecked (the safetensors format itself
    forbids both).
    """
    position = data_start
    previous = None
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin < position:
            raise AbliterateError(
                f"{path}: corrupt safetensors header (tensor {info.name!r} at data_offsets "
                f"[{info.begin - data_start}, {info.end - data_start}] overlaps tensor "
                f"{previous!r}; expected non-overlapping byte ranges)."
            )
        if info.begin > position:
            raise AbliterateError(
                f"{path}: corrupt safetensors header ({info.begin - position} bytes before "
                f"tensor {info.name!r} belong to no tensor; expected the tensors to cover the "
                "data buffer without holes)."
            )
        position = info.end
        previous = info.name
    if position != file_size:
        raise AbliterateError(
            f"{path}: corrupt safetensors header (the tensors end at byte {position} of a "
            f"{file_size}-byte file; expected them to cover the data buffer to the end)."
        )


def read_weight_map(model_dir: str | Path) -> dict[str, str]:
    """Map every tensor name to its shard file name, from the index or the single file."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise AbliterateError(f"{model_dir}: model directory not found.")
    index_path = model_dir / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not all(
                isinstance(shard, str) for shard in weight_map.values()
            ):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise AbliterateError(
                f"{index_path}: malformed index (expected JSON with a 'weight_map' object "
                "mapping tensor names to shard file names)."
            ) from None
        for shard in sorted(set(weight_map.values())):
            if not (model_dir / shard).is_file():
                raise AbliterateError(
                    f"{index_path}: names shard {shard!r}, which is not in {model_dir}."
                )
        return dict(weight_map)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise AbliterateError(
            f"{model_dir}: no {INDEX_NAME} and no *.safetensors files; expected a Hugging "
            "Face model directory with safetensors weights."
        )
    if len(files) > 1 and not (model_dir / SINGLE_NAME).is_file():
        raise AbliterateError(
            f"{model_dir}: {len(files)} safetensors files but no {INDEX_NAME}; expected an "
            "index for a sharded checkpoint."
        )
    single = model_dir / SINGLE_NAME if (model_dir / SINGLE_NAME).is_file() else files[0]
    return {name: single.name for name in read_header(single).tensors}


def read_checkpoint(model_dir: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint with its location, read from headers only."""
    model_dir = Path(model_dir)
    weight_map = read_weight_map(model_dir)
    headers = {shard: read_header(model_dir / shard) for shard in sorted(set(weight_map.values()))}
    tensors: dict[str, TensorInfo] = {}
    for name, shard in weight_map.items():
        info = headers[shard].tensors.get(name)
        if info is None:
            raise AbliterateError(
                f"{model_dir / INDEX_NAME}: maps {name!r} to {shard!r}, but that shard has no "
                "such tensor."
            )
        tensors[name] = info
    return tensors


# --------------------------------------------------------------------------------------
# Streaming tensor I/O (appended for the sharded exporter)
#
# Why: a shard job must never hold a whole 5 GB shard; since an edit keeps every tensor's
# dtype and shape, the output file has the source's exact header and byte layout, so a job
# copies untouched byte ranges file-to-file (like `cp`) and rewrites only target ranges.
# --------------------------------------------------------------------------------------

COPY_CHUNK = 64 * 1024 * 1024


def read_tensor(
    handle, info: TensorInfo, begin: int | None = None, shape=None, buffer: bytearray | None = None
) -> torch.Tensor:
    """Read one tensor (or, with `begin`/`shape`, a contiguous slice of it) from `handle`.

    `handle` is a binary file opened for reading; the bytes are read with `os.pread`, so
    concurrent readers of one handle do not race on the file position. With `buffer` (at
    least the tensor's size) the tensor is read into it and shares its memory: a worker
    that reuses one buffer pays the page faults of a fresh allocation once, not per tensor.
    """
    import os

    dtype, itemsize = DTYPES[info.dtype]
    shape = tuple(info.shape if shape is None else shape)
    numel = 1
    for n in shape:
        numel *= n
    start = info.begin if begin is None else begin
    nbytes = numel * itemsize
    if buffer is None:
        buffer = bytearray(nbytes)
    elif len(buffer) < nbytes:
        raise ValueError(f"read buffer of {len(buffer)} bytes is smaller than {info.name!r}")
    view = memoryview(buffer)[:nbytes]
    done = 0
    while done < nbytes:
        got = os.preadv(handle.fileno(), [view[done:]], start + done)
        if got <= 0:
            raise AbliterateError(f"{handle.name}: file ended inside tensor {info.name!r}.")
        done += got
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=numel).reshape(shape)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when contiguous."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def copy_range_at(
    src_fd: int, dst_fd: int, begin: int, end: int, dst_begin: int | None = None
) -> None:
    """Copy bytes [begin, end) of `src_fd` to the same offsets of `dst_fd` (or to
    `dst_begin` onwards: a shard whose header changed, e.g. MXFP4 experts written as bf16).

    The kernel copies (`copy_file_range`, as `cp` does) where it can; otherwise 64 MiB
    chunks go through `pread`/`pwrite`. Explicit offsets let several workers fill one
    output file at once, since an edited shard has its source's exact byte layout.
    """
    import os

    shift = 0 if dst_begin is None else dst_begin - begin
    position = begin
    if hasattr(os, "copy_file_range"):
        try:
            while position < end:
                copied = os.copy_file_range(
                    src_fd, dst_fd, min(end - position, 1 << 30), position, position + shift
                )
                if copied <= 0:
                    break
                position += copied
        except OSError:
            pass  # e.g. across filesystems on an old kernel: fall through to the chunked copy
    while position < end:
        chunk = os.pread(src_fd, min(COPY_CHUNK, end - position), position)
        if not chunk:
            raise AbliterateError(f"source file ended at byte {position}, expected {end}.")
        write_at(dst_fd, chunk, position + shift)
        position += len(chunk)


def encode_header(entries, metadata: dict | None = None) -> bytes:
    """The 8-byte length + JSON header of a safetensors file holding `entries`
    [(name, dtype, shape)] back to back in that order; the JSON is padded with spaces to a
    multiple of 8 bytes, as the safetensors library writes it, so the data stays aligned."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = DTYPES[dtype][1]
        for n in shape:
            nbytes *= n
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_at(fd: int, data, offset: int) -> None:
    """Write all of `data` (bytes or a memoryview) at `offset` of `fd`."""
    import os

    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
