"""GGUF: the demo exports convert with llama.cpp's own convert_hf_to_gguf.py, and the check
finds every edited tensor in the GGUF as it was exported.

The converter comes from the llama-cpp-python source distribution (`make gguf-converter`,
part of `make install-test`); without it these tests skip and say so. The dense organism
converts with the converter as it is. The MoE organism's byte-level BPE is new to the
converter, which recognizes such vocabularies only by a hash of published ones, so there
only that lookup is replaced (`pre_tokenizer="glm4"`); everything else is llama.cpp's code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from abliterate import gguf
from abliterate.errors import AbliterateError
from abliterate.recipe import build_plan

try:  # llama.cpp's converter (make gguf-converter, part of make install-test)
    gguf.find_converter()
    NO_CONVERTER = ""
except AbliterateError as missing:
    NO_CONVERTER = str(missing)
needs_converter = pytest.mark.skipif(bool(NO_CONVERTER), reason=NO_CONVERTER or "converter found")


def read_gguf(path: Path):
    import gguf as gguf_py

    return gguf_py.GGUFReader(path)


def export_demo(demo: Path, workdir: Path, experts: bool) -> tuple[Path, list[str]]:
    """The organism abliterated as tests/test_export.py does it (every routed expert too
    when asked): the verified export and the keys its plan edits."""
    from test_export import abliterate_demo

    output, recipe = abliterate_demo(demo, workdir, experts=experts)
    plan = build_plan(recipe, model=demo, measurements=workdir / "measurements.safetensors")
    return output, plan.keys()


@pytest.fixture(scope="module")
def dense_export(demo_dense, tmp_path_factory) -> tuple[Path, list[str]]:
    """One dense export for the module's dense tests (read-only)."""
    return export_demo(demo_dense, tmp_path_factory.mktemp("gguf-dense"), experts=False)


@needs_converter
def test_dense_demo_export_converts_with_the_unmodified_converter(
    demo_dense, dense_export, tmp_path
):
    output, keys = dense_export
    path = gguf.convert(output, tmp_path / "demo.gguf", outtype="f32")
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []
    report = gguf.check(path, output, demo_dense, keys)
    assert report["ok"], report["failures"]
    assert report["vocabulary"] == "llama"  # the Llama-2 kind: BPE with byte fallback
    assert report["block_count"] == report["num_hidden_layers"] == 4
    assert report["tensors"] == report["expected_tensors"] == len(read_gguf(path).tensors)
    # every edited tensor was found, and at f32 it is the export's to the bit
    assert sorted(c["key"] for c in report["checked"]) == sorted(keys)
    assert all(c["error"] == 0 and c["error_vs_source"] > 1e-3 for c in report["checked"])
    reader = read_gguf(path)
    template = reader.fields["tokenizer.chat_template"]
    assert "<|assistant|>" in bytes(template.parts[template.data[0]]).decode()


@needs_converter
def test_moe_demo_export_converts_with_experts_stacked_per_layer(demo_moe, tmp_path):
    config = json.loads((demo_moe / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0  # no MTP block is declared without weights
    output, keys = export_demo(demo_moe, tmp_path, experts=True)
    # The converter refuses the vocabulary it has no fingerprint of, and leaves no file.
    with pytest.raises(AbliterateError, match="BPE pre-tokenizer was not recognized"):
        gguf.convert(output, tmp_path / "refused.gguf", outtype="q8_0")
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".gguf", ".partial")]

    path = gguf.convert(output, tmp_path / "moe.gguf", outtype="q8_0", pre_tokenizer="glm4")
    report = gguf.check(path, output, demo_moe, keys)
    assert report["ok"], report["failures"]
    assert (report["architecture"], report["vocabulary"]) == ("glm4moe", "gpt2")
    assert report["block_count"] == config["num_hidden_layers"]
    assert report["tensors"] == report["expected_tensors"]
    experts = [c for c in report["checked"] if "_exps" in c["gguf"]]
    assert len(experts) == 3 * config["n_routed_experts"]  # every expert of layers 1-3
    assert {c["gguf"] for c in experts} >= {"blk.1.ffn_down_exps.weight[0]"}
    # q8_0 rounding stays far below the edit itself
    assert all(c["error"] < 0.02 < c["error_vs_source"] for c in report["checked"])
    reader = read_gguf(path)
    names = [
        bytes(reader.fields["tokenizer.ggml.tokens"].parts[i]).decode()
        for i in reader.fields["tokenizer.ggml.tokens"].data
    ]
    assert {"[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|observation|>"} <= set(names)


@needs_converter
def test_check_fails_on_a_gguf_of_the_unedited_model(demo_dense, dense_export, tmp_path):
    output, keys = dense_export
    base = gguf.convert(demo_dense, tmp_path / "base.gguf", outtype="f32")
    report = gguf.check(base, output, demo_dense, keys)
    assert not report["ok"]
    assert len(report["failures"]) == len(keys)
    assert "differs from the export" in report["failures"][0]


def test_missing_converter_is_one_sentence(tmp_path, monkeypatch):
    with pytest.raises(AbliterateError, match=r"export.gguf_converter: .*does not exist"):
        gguf.find_converter(tmp_path / "nowhere.py")
    monkeypatch.setenv(gguf.CONVERTER_ENV, str(tmp_path / "nowhere.py"))
    monkeypatch.setattr(gguf.sys, "prefix", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(AbliterateError, match="make gguf-converter"):
        gguf.find_converter()
    with pytest.raises(AbliterateError, match="export.gguf_outtype"):
        gguf.convert(tmp_path, tmp_path / "x.gguf", outtype="q4_k")
