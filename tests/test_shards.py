"""Safetensors headers and indexes: read right, and refuse damaged files with one sentence."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from fixtures.header_only import write_header_only_checkpoint, write_header_only_shard
from safetensors import safe_open
from safetensors.torch import save_file

from abliterate.errors import AbliterateError
from abliterate.shards import read_checkpoint, read_header, read_tensor, read_weight_map


@pytest.fixture
def two_shards(tmp_path):
    """A hand-made two-shard checkpoint with known tensors."""
    torch.manual_seed(0)
    a = {"w.a": torch.randn(3, 4), "w.b": torch.arange(6, dtype=torch.int64)}
    b = {"w.c": torch.randn(2, 2).to(torch.bfloat16)}
    save_file(a, tmp_path / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(b, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {"w.a": "model-00001-of-00002.safetensors"}
    weight_map["w.b"] = weight_map["w.a"]
    weight_map["w.c"] = "model-00002-of-00002.safetensors"
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return tmp_path, {**a, **b}


def test_header_offsets_point_at_the_tensor_bytes(two_shards):
    model_dir, tensors = two_shards
    header = read_header(model_dir / "model-00001-of-00002.safetensors")
    assert header.metadata == {"format": "pt"}
    assert set(header.tensors) == {"w.a", "w.b"}
    info = header.tensors["w.a"]
    assert (info.dtype, info.shape, info.nbytes) == ("F32", (3, 4), 48)
    raw = (model_dir / info.shard).read_bytes()[info.begin : info.end]
    assert torch.equal(
        torch.frombuffer(bytearray(raw), dtype=torch.float32).view(3, 4), tensors["w.a"]
    )
    assert header.data_start <= min(t.begin for t in header.tensors.values())


def test_read_checkpoint_from_index(two_shards):
    model_dir, tensors = two_shards
    infos = read_checkpoint(model_dir)
    assert set(infos) == set(tensors)
    assert infos["w.c"].shard == "model-00002-of-00002.safetensors"
    assert (infos["w.c"].dtype, infos["w.c"].shape) == ("BF16", (2, 2))
    assert infos["w.b"].dtype == "I64"


def test_single_file_checkpoint_needs_no_index(tmp_path):
    save_file({"x": torch.zeros(2)}, tmp_path / "model.safetensors")
    assert read_weight_map(tmp_path) == {"x": "model.safetensors"}


def test_header_only_shards_are_valid_safetensors(tmp_path):
    """The sparse fixture writer produces files the reference reader accepts."""
    path = tmp_path / "sparse.safetensors"
    size = write_header_only_shard(
        path, [("a", "BF16", (1024, 1024)), ("b", "F32", (7,)), ("c", "U8", (3, 5))]
    )
    assert size == 1024 * 1024 * 2 + 28 + 15
    assert path.stat().st_blocks * 512 < size  # a hole, not allocated
    with safe_open(path, "pt") as handle:
        assert handle.get_slice("a").get_shape() == [1024, 1024]
        assert torch.count_nonzero(handle.get_tensor("b")) == 0
    assert read_header(path).tensors["c"].shape == (3, 5)


def test_header_only_checkpoint_index(tmp_path):
    model = write_header_only_checkpoint(
        tmp_path / "m", {"model_type": "llama"}, [[("a", "F32", (2,))], [("b", "F16", (4, 4))]]
    )
    infos = read_checkpoint(model)
    assert infos["b"].shard == "model-00002-of-00002.safetensors"
    index = json.loads((model / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 8 + 32


# ------------------------------------------------------------------ bad input


def _write_raw(path, header: dict | bytes, data: bytes = b""):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    "header, data, message",
    [
        ({"t": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0", "dtype 'F4'"),
        ({"t": {"dtype": "F32", "shape": [2]}}, b"", "lacks dtype, shape or data_offsets"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8, "expected 8"),
        ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "truncated"),
        ({"t": "F32"}, b"", "lacks dtype"),
        (b"[1, 2]", b"", "expected a JSON object"),
        (b"\xff\xfe{}", b"", "expected a JSON object"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "'b' at data_offsets \\[4, 12\\] overlaps tensor 'a'",
        ),
        (
            {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
            b"\0" * 8,
            "4 bytes before tensor 'a' belong to no tensor",
        ),
        (
            {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
            b"\0" * 8,
            "the tensors end at byte",
        ),
    ],
    ids=[
        "dtype",
        "no-offsets",
        "wrong-size",
        "past-end",
        "not-a-dict",
        "json-list",
        "not-utf8",
        "overlap",
        "hole",
        "tail",
    ],
)
def test_corrupt_headers_name_the_file(tmp_path, header, data, message):
    path = _write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(AbliterateError, match=message) as error:
        read_header(path)
    assert str(path) in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(AbliterateError, match="safetensors file not found"):
        read_header(tmp_path / "nope.safetensors")


def test_index_maps_a_tensor_its_shard_lacks(two_shards):
    model_dir, _ = two_shards
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["w.ghost"] = "model-00002-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(AbliterateError, match="'w.ghost'.*no such tensor"):
        read_checkpoint(model_dir)


@pytest.mark.parametrize("index", ['{"weight_map": []}', "not json", '{"weight_map": {"a": 3}}'])
def test_malformed_index(two_shards, index):
    model_dir, _ = two_shards
    (model_dir / "model.safetensors.index.json").write_text(index)
    with pytest.raises(AbliterateError, match="malformed index"):
        read_weight_map(model_dir)


def test_several_files_without_index(two_shards):
    model_dir, _ = two_shards
    (model_dir / "model.safetensors.index.json").unlink()
    with pytest.raises(AbliterateError, match="2 safetensors files but no"):
        read_weight_map(model_dir)


def test_directory_without_weights(tmp_path):
    with pytest.raises(AbliterateError, match=r"no \*\.safetensors files"):
        read_weight_map(tmp_path)


def test_a_tensor_read_into_a_buffer_shares_it_and_a_short_buffer_is_refused(tmp_path):
    """The exporter reuses one read buffer per worker; the tensor must be a view of it."""
    path = tmp_path / "one.safetensors"
    save_file({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, str(path))
    info = read_header(path).tensors["w"]
    buffer = bytearray(64)
    with open(path, "rb") as handle:
        tensor = read_tensor(handle, info, buffer=buffer)
        assert torch.equal(tensor, torch.arange(12, dtype=torch.float32).reshape(3, 4))
        tensor[0, 0] = 7.0
        assert torch.frombuffer(buffer, dtype=torch.float32, count=1).item() == 7.0
        with pytest.raises(ValueError, match="smaller than 'w'"):
            read_tensor(handle, info, buffer=bytearray(47))
