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

try:
    gguf.find_converter()
    MISSING = ""
except AbliterateError as missing:
    MISSING = str(missing)
needs_converter = pytest.mark.skipif(bool(MISSING), reason=MISSING or "converter found")


def read_gguf(path: Path):
    import gguf as gguf_py

    return gguf_py.GGUFReader(path)


def export_demo(demo: Path, workdir: Path, experts: bool) -> tuple[Path, list[str]]:
    """Abliterate an organism with its suggested recipe (and every routed expert when
    asked); returns the verified export and the keys the plan edits."""
    from abliterate.analyze import layer_metrics, suggest_recipe
    from abliterate.export import export_model
    from abliterate.measure import MeasureOptions, measure_to_file
    from abliterate.model import LoadOptions
    from abliterate.verify import verify

    prompts = demo / "prompts"
    measurements = workdir / "measurements.safetensors"
    meas = measure_to_file(
        demo,
        str(prompts / "target_train.txt"),
        str(prompts / "benign_train.txt"),
        measurements,
        MeasureOptions(progress=False, load=LoadOptions(device="cpu")),
    )
    recipe, _ = suggest_recipe(layer_metrics(meas), meas.num_layers)
    recipe["ablate_individual_experts"] = experts
    plan = build_plan(recipe, model=demo, measurements=measurements)
    output = export_model(plan, workdir / "abliterated", jobs=2)
    report = verify(demo, output, plan)
    assert report["ok"], report["failures"]
    return output, plan.keys()


@needs_converter
def test_dense_demo_export_converts_with_the_unmodified_converter(demo_dense, tmp_path):
    output, keys = export_demo(demo_dense, tmp_path, experts=False)
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
def test_check_fails_on_a_gguf_of_the_unedited_model(demo_dense, tmp_path):
    output, keys = export_demo(demo_dense, tmp_path, experts=False)
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
