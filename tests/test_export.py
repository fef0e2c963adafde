"""The sharded export: bit-exact streaming, safety, resumption, verification, the demos."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from snakemake_runner import demo_model_config, snakemake

from abliterate import export as export_module
from abliterate.edit import ablate_bias, ablate_tensor
from abliterate.errors import AbliterateError
from abliterate.export import ablate_shard, check_output_location, export_model, plan_shards
from abliterate.layout import inspect_checkpoint
from abliterate.measure import Measurements, save_measurements
from abliterate.recipe import Plan, PlanEntry, build_plan, load_recipe, resolve
from abliterate.verify import verify

BIN = Path(sys.executable).parent


def fake_measurements(num_layers: int, hidden: int, seed: int = 0) -> Measurements:
    g = torch.Generator().manual_seed(seed)
    means = [torch.randn(num_layers + 1, hidden, generator=g, dtype=torch.float64) for _ in "tb"]
    empty = torch.zeros(num_layers + 1, 0)
    return Measurements(means[0], means[1], empty, empty, meta={"num_layers": num_layers})


def load_all(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def digests(model_dir: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(model_dir.iterdir())
        if p.is_file()
    }


def in_memory(plan: Plan, source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the in-memory evaluator computes: the plan's edits applied in plan order."""
    edited = dict(source)
    for entry in plan.entries:
        edited[entry.key] = ablate_tensor(
            edited[entry.key],
            entry.direction,
            entry.scale,
            hidden_axis=entry.hidden_axis,
            norm_preserve=entry.norm_preserve,
            preserve=entry.preserve,
        )
        if entry.bias:
            edited[entry.bias] = ablate_bias(edited[entry.bias], entry.direction, entry.scale)
    return edited


@pytest.fixture(scope="module")
def glm_bf16(tmp_path_factory):
    from tiny_models import build_tiny

    root = tmp_path_factory.mktemp("glm-bf16")
    model = build_tiny(root / "model", "glm4_moe", dtype=torch.bfloat16, max_shard_size="20KB")
    return model, inspect_checkpoint(model), fake_measurements(3, 32)


def glm_plan(glm, **options) -> Plan:
    model, layout, meas = glm
    recipe = {
        "ablate": [
            {"layer": 0, "measurement": 1, "scale": 1.0},
            {"layer": 1, "measurement": 2, "scale": 0.7, "sparsity": 0.25},
            {"layer": 1, "measurement": 3, "scale": 1.0},  # the same layer twice: edits compose
            {"layer": 2, "measurement": 2, "scale": -0.5},
        ],
        "ablate_individual_experts": True,
        **options,
    }
    plan = resolve(recipe, layout, meas)
    plan.model_dir = str(model)
    return plan


def test_sharded_export_equals_the_in_memory_edit_bit_for_bit(glm_bf16, tmp_path):
    model = glm_bf16[0]
    plan = glm_plan(glm_bf16)
    before = digests(model)
    output = export_model(plan, tmp_path / "out", jobs=2)
    source, exported = load_all(model), load_all(output)
    expected = in_memory(plan, source)
    assert exported.keys() == source.keys()
    for key, tensor in exported.items():
        assert tensor.dtype == source[key].dtype and tensor.shape == source[key].shape
        assert torch.equal(tensor.view(torch.uint8), expected[key].view(torch.uint8)), key
    edited = set(plan.keys())
    assert len(edited) == 2 + 2 * (3 + 8)  # attn + mlp_down at 0; attn/shared/router/8 experts
    assert all(not torch.equal(exported[k], source[k]) for k in edited)
    assert digests(model) == before  # the source is never modified
    report = verify(model, output, plan)
    assert report["ok"], report["failures"]
    assert report["edited"] == len(edited) and report["untouched"] + report["untouched_linked"] == (
        len(source) - len(edited)
    )


def test_a_shard_job_says_where_its_time_went_and_writes_the_same_bytes(glm_bf16, tmp_path):
    """`times` (bench/ablate_bench.py's profile) only observes: same file, same digest."""
    from abliterate.export import PhaseTimes

    model = glm_bf16[0]
    plan = glm_plan(glm_bf16)
    shard = max(plan.by_shard(), key=lambda s: len(plan.by_shard()[s]))
    times = PhaseTimes()
    profiled = ablate_shard(model, shard, plan, tmp_path / "a" / shard, digest=True, times=times)
    plain = ablate_shard(model, shard, plan, tmp_path / "b" / shard, digest=True, workers=1)
    assert profiled == plain == hashlib.sha256((tmp_path / "b" / shard).read_bytes()).hexdigest()
    assert set(times.seconds) == {"read", "edit", "write", "copy", "fsync", "hash"}
    assert all(seconds > 0 for seconds in times.seconds.values()), times.seconds


def test_output_directory_is_complete_and_manifested(glm_bf16, tmp_path):
    model = glm_bf16[0]
    plan = glm_plan(glm_bf16, expert_subset=[1])
    jobs = plan_shards(plan, model)
    output = export_model(plan, tmp_path / "out")
    names = {p.name for p in output.iterdir()}
    shards = set(
        json.loads((model / "model.safetensors.index.json").read_text())["weight_map"].values()
    )
    assert shards <= names and {"config.json", "generation_config.json"} <= names
    assert {"README.md", "manifest.json", "model.safetensors.index.json"} <= names
    assert not (tmp_path / "out.partial").exists()
    manifest = json.loads((output / "manifest.json").read_text())
    assert set(manifest["sha256"]) == names - {"manifest.json"}
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((output / name).read_bytes()).hexdigest() == digest
    assert manifest["recipe"]["expert_subset"] == [1]
    for shard in jobs["link"]:  # shards without targets: the source's bytes, not its inode
        assert (output / shard).read_bytes() == (model / shard).read_bytes()
        assert not os.path.samefile(output / shard, model / shard)
        assert manifest["shards"][shard] in ("copied", "reflinked")
    for shard in jobs["edit"]:
        assert not os.path.samefile(output / shard, model / shard)
    assert manifest["link_mode"] == "auto" and manifest["base_model"] == "model"
    card = (output / "README.md").read_text()
    assert "base_model: model" in card and "layer: 1" in card


def strings(node):
    """Every string in a JSON document (keys and values)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
    elif isinstance(node, str):
        yield node


BASE_CARD = """---
license: other
license_name: tiny-community-license
license_link: https://example.org/LICENSE
language: [en]
base_model: someone/grandparent
---

# The base model
"""


@pytest.fixture(scope="module")
def awkward_model(tmp_path_factory):
    """A tiny llama in a directory named `my model: v2`, with a base card (license)."""
    from tiny_models import build_tiny

    model = tmp_path_factory.mktemp("awkward") / "my model: v2"
    model.mkdir()
    (model / "README.md").write_text(BASE_CARD)  # before build_tiny: a source stays read-only
    return build_tiny(model, "llama")


def awkward_recipe(model: Path, tmp_path: Path) -> Path:
    save_measurements(fake_measurements(3, 32), tmp_path / "m.safetensors")
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({
        "model": str(model), "measurements": str(tmp_path / "m.safetensors"),
        "output": str(tmp_path / "out"), "ablate": [{"layer": 1, "measurement": 2}],
    }))  # fmt: skip
    return recipe


def test_the_card_of_an_awkward_directory_parses_on_the_hub(awkward_model, tmp_path):
    """`abliterate ablate --base-model ... --tag ...`: the card's front matter is valid
    YAML the Hub's own parser reads, the license is the base card's, the result of the
    verification is in it, and nothing in the folder names a path of this machine."""
    from huggingface_hub import ModelCard

    from abliterate.cli import main

    recipe = awkward_recipe(awkward_model, tmp_path)
    command = ["ablate", str(recipe), "--base-model", "example-org/tiny-llama", "--tag", "x-test"]
    assert main(command) == 0
    output = tmp_path / "out"
    card = ModelCard.load(output / "README.md")
    assert card.data.base_model == "example-org/tiny-llama"
    assert card.data.license == "other" and card.data.license_name == "tiny-community-license"
    assert card.data.license_link == "https://example.org/LICENSE"
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["abliterated", "x-test"] and card.data.language == ["en"]
    assert "# my model: v2, abliterated" in card.text
    assert "## Verification" in card.text and "**Passed**" in card.text
    assert "layer: 1" in card.text  # the recipe
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["verification"] == {"ok": True, "failure_count": 0}
    assert manifest["base_model"] == "my model: v2" and manifest["measurements"] == "m.safetensors"
    assert manifest["recipe"]["model"] == "my model: v2" and "output" not in manifest["recipe"]
    for text in strings(manifest):
        assert not text.startswith("/") and str(tmp_path) not in text, text
    assert str(tmp_path) not in card.content
    assert (
        hashlib.sha256((output / "README.md").read_bytes()).hexdigest()
        == (manifest["sha256"]["README.md"])
    )  # the card was rewritten with the result, and its hash with it
    assert not [p.name for p in output.iterdir() if p.name.startswith(".")]
    assert json.loads((tmp_path / "out.verify.json").read_text())["output"] == str(output)


def test_card_without_an_id_or_a_license_option(awkward_model, tmp_path, caplog):
    """No --base-model and a directory name that is no Hub id: base_model is left out
    (with a warning naming the key), never the invalid name; the API's export has no
    verification and says so; config tags and license win over the base card's."""
    from huggingface_hub import ModelCard

    from abliterate.card import CardOptions

    plan = build_plan(load_recipe(awkward_recipe(awkward_model, tmp_path)))
    output = export_model(plan, tmp_path / "out", card=CardOptions(license="mit", tags=["a"]))
    card = ModelCard.load(output / "README.md")
    assert card.data.base_model is None and "export.card.base_model" in caplog.text
    assert card.data.license == "mit" and card.data.license_name is None
    assert card.data.tags == ["abliterated", "a"]
    assert "Not verified when exported" in card.text
    assert json.loads((output / "manifest.json").read_text())["verification"] is None


@pytest.mark.parametrize(
    "text",
    [
        "---\nlicense: [unclosed\n---\n",  # malformed YAML
        "---\nlicense: mit\n",  # never closed
        "---\n- a list\n---\n",  # not a mapping
        "---\n!!python/object/apply:os.system ['touch {pwned}']\n---\n",  # no code runs
        "\udcff",  # not UTF-8 (written as bytes below)
    ],
)
def test_a_bad_base_card_is_ignored_never_run(tmp_path, text):
    from abliterate.card import CardOptions, front_matter, read_front_matter

    pwned = tmp_path / "pwned"
    text = text.replace("{pwned}", str(pwned))
    (tmp_path / "README.md").write_bytes(text.encode("utf-8", "surrogateescape"))
    assert read_front_matter(tmp_path) == {}
    assert not pwned.exists()
    header = front_matter(tmp_path, CardOptions(), {})
    assert "license" not in header and header["library_name"] == "transformers"


def test_the_base_model_id_from_a_hub_cache_path(tmp_path):
    from abliterate.card import CardOptions, base_model_id

    snapshot = tmp_path / "models--Org--Name-7B" / "snapshots" / "abc123"
    assert base_model_id(snapshot, CardOptions()) == "Org/Name-7B"
    assert base_model_id(snapshot, CardOptions(base_model="me/mine")) == "me/mine"
    assert base_model_id(tmp_path / "Llama-3.1-8B", CardOptions()) == "Llama-3.1-8B"


def test_fused_expert_tensor_and_a_bias_in_another_shard(tmp_path):
    """gpt-oss orientation: down_proj [E, intermediate, hidden], hidden == intermediate."""
    g = torch.Generator().manual_seed(3)
    model = tmp_path / "fused"
    model.mkdir()
    down = torch.randn(4, 16, 16, generator=g).to(torch.bfloat16)
    bias = torch.randn(4, 16, generator=g).to(torch.bfloat16)
    other = torch.randn(5, 16, generator=g).to(torch.float16)
    save_file(
        {"a.down_proj": down, "a.other": other}, str(model / "model-00001-of-00002.safetensors")
    )
    save_file({"a.down_proj_bias": bias}, str(model / "model-00002-of-00002.safetensors"))
    weight_map = {
        "a.down_proj": "model-00001-of-00002.safetensors",
        "a.other": "model-00001-of-00002.safetensors",
        "a.down_proj_bias": "model-00002-of-00002.safetensors",
    }
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    r = torch.randn(16, generator=g)
    r = r / r.norm()
    entry = PlanEntry(
        key="a.down_proj", component="expert_down", side="write", layer=0, expert=None,
        hidden_axis=2, shape=(4, 16, 16), dtype="BF16", shard="model-00001-of-00002.safetensors",
        scale=1.0, norm_preserve=True, preserve="hidden", bias="a.down_proj_bias",
        bias_shard="model-00002-of-00002.safetensors", direction_id="entry0", direction=r,
    )  # fmt: skip
    plan = Plan([entry], str(model), {"ablate": []})
    assert plan_shards(plan, model)["edit"] == {
        "model-00001-of-00002.safetensors": ["a.down_proj"],
        "model-00002-of-00002.safetensors": ["a.down_proj_bias"],
    }
    output = export_model(plan, tmp_path / "out")
    exported = load_all(output)
    assert torch.equal(exported["a.down_proj"], ablate_tensor(down, r, 1.0, hidden_axis=2))
    assert torch.equal(exported["a.down_proj_bias"], ablate_bias(bias, r))
    assert torch.equal(exported["a.other"], other)
    assert (exported["a.down_proj"].float() @ r).abs().max() < 0.05
    report = verify(model, output, plan, generate=False)
    assert report["ok"], report["failures"]
    assert report["invariants_checked"] == 4  # one per expert slice

    # an expert subset edits only those experts' slices (weight and bias); the others keep
    # their bytes, and the verifier recomputes the same slice-wise edit
    subset = Plan([replace(entry, experts=(1, 3))], str(model), {"ablate": []})
    output = export_model(subset, tmp_path / "out-subset")
    exported = load_all(output)
    for e in range(4):
        if e in (1, 3):
            assert torch.equal(exported["a.down_proj"][e], ablate_tensor(down[e], r, hidden_axis=1))
            assert torch.equal(exported["a.down_proj_bias"][e], ablate_bias(bias[e], r))
        else:
            assert torch.equal(exported["a.down_proj"][e], down[e])
            assert torch.equal(exported["a.down_proj_bias"][e], bias[e])
    report = verify(model, output, subset, generate=False)
    assert report["ok"], report["failures"]
    assert report["invariants_checked"] == 2  # the two edited slices


def test_single_file_checkpoint(tmp_path):
    from tiny_models import build_tiny

    model = build_tiny(tmp_path / "single", "llama", max_shard_size=None)
    assert (model / "model.safetensors").is_file()
    plan = resolve(
        {"ablate": [{"layer": 1, "measurement": 2}]},
        inspect_checkpoint(model),
        fake_measurements(3, 32),
    )
    output = export_model(plan, tmp_path / "out")
    assert (output / "model.safetensors").is_file()
    assert not (output / "model.safetensors.index.json").exists()
    report = verify(model, output, plan)
    assert report["ok"] and report["generation"]["ok"], report["failures"]


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_output_in_or_around_the_source_is_refused(glm_bf16, where):
    model = glm_bf16[0]
    output = {"same": model, "inside": model / "abliterated", "parent": model.parent}[where]
    with pytest.raises(AbliterateError, match="output directory"):
        check_output_location(model, output)
    with pytest.raises(AbliterateError, match="output directory"):
        export_model(glm_plan(glm_bf16), output, force=True)
    assert not (model / "abliterated").exists()


def test_existing_output_needs_force(glm_bf16, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(AbliterateError, match="already exists; remove it or pass --force"):
        export_model(glm_plan(glm_bf16), tmp_path / "out")


def test_interrupted_export_resumes_and_verifies(glm_bf16, tmp_path, monkeypatch):
    model = glm_bf16[0]
    plan = glm_plan(glm_bf16)
    edited = list(plan_shards(plan, model)["edit"])
    assert len(edited) >= 2
    calls: list[str] = []

    def crash_on_second(model_dir, shard, plan, output, **kwargs):
        calls.append(shard)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the machine went away mid-run
        return ablate_shard(model_dir, shard, plan, output, **kwargs)

    monkeypatch.setattr(export_module, "ablate_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        export_model(plan, tmp_path / "out")
    staging = tmp_path / "out.partial"
    assert not (tmp_path / "out").exists()  # nothing looks complete
    assert not list(staging.glob("*.tmp"))
    complete = sorted(p.name for p in staging.glob("*.safetensors"))
    assert complete == [calls[0]]
    (staging / calls[0]).unlink()  # a shard removed mid-run, too
    calls.clear()
    monkeypatch.setattr(export_module, "ablate_shard", ablate_shard)
    output = export_model(plan, tmp_path / "out")
    report = verify(model, output, plan)
    assert report["ok"], report["failures"]


def test_verify_catches_a_changed_untouched_tensor_and_a_wrong_edit(glm_bf16, tmp_path):
    model = glm_bf16[0]
    plan = glm_plan(glm_bf16)
    output = export_model(plan, tmp_path / "out")
    shard = sorted(plan_shards(plan, model)["edit"])[0]
    tensors = load_file(str(output / shard))
    untouched = next(k for k in tensors if k not in plan.keys())
    target = next(k for k in tensors if k in plan.keys())
    tensors[untouched] = tensors[untouched] + 1
    tensors[target] = tensors[target] * 1.5
    (output / shard).unlink()  # a hard link must not be written through
    save_file(tensors, str(output / shard), metadata={"format": "pt"})
    report = verify(model, output, plan, generate=False)
    assert not report["ok"]
    messages = "\n".join(report["failures"])
    assert f"{untouched}: not in the plan but its bytes differ" in messages
    assert f"{target}: differs from the plan's edit" in messages
    assert f"{shard}: SHA-256 differs from manifest.json" in messages


def test_verification_by_digest_covers_every_tensor_and_agrees_with_the_full_check(
    glm_bf16, tmp_path
):
    """`abliterate ablate`'s default check: edits judged in memory before writing, shards
    by the digest the exporter took on the way; it accounts for every tensor."""
    model = glm_bf16[0]
    plan = glm_plan(glm_bf16)
    written: dict = {}
    output = export_model(plan, tmp_path / "out", jobs=2, written=written)
    assert set(written) == set(plan_shards(plan, model)["edit"])
    report = verify(model, output, plan, generate=False, written=written)
    assert report["ok"], report["failures"]
    assert report["shards_checked_by_digest"] == len(written)
    assert report["edited_by_digest"] > 0 and report["untouched_by_digest"] > 0
    # keys edited twice (layer 1's composed entries) are recomputed from the source
    assert report["edited"] + report["edited_by_digest"] == len(plan.keys())
    assert report["edited"] == sum(len(e) > 1 for e in plan.edits().values())
    full = verify(model, output, plan, generate=False)
    assert full["ok"] and full["edited"] == len(plan.keys())
    untouched = ("untouched", "untouched_linked", "untouched_by_digest")
    assert sum(report[k] for k in untouched) == sum(full[k] for k in untouched)


def test_verification_by_digest_catches_a_changed_byte_and_a_wrong_edit(
    glm_bf16, tmp_path, monkeypatch
):
    model = glm_bf16[0]
    plan = glm_plan(glm_bf16)
    written: dict = {}
    output = export_model(plan, tmp_path / "out", written=written)
    shard = sorted(written)[0]
    header = export_module.read_header(output / shard)
    untouched = next(i for k, i in header.tensors.items() if k not in plan.keys())
    with open(output / shard, "r+b") as handle:  # an edited shard: a file of its own
        handle.seek(untouched.begin)
        byte = handle.read(1)
        handle.seek(untouched.begin)
        handle.write(bytes([byte[0] ^ 1]))
    report = verify(model, output, plan, generate=False, written=written)
    assert (
        f"{shard}: its SHA-256 on disk differs from the bytes the exporter wrote"
        in (report["failures"])
    )

    real_edit = export_module.edit_tensor

    def half_the_edit(weight, edits, device=None, out=None):  # an exporter with a bug
        return real_edit(
            weight, [(replace(e, scale=e.scale / 2), b) for e, b in edits], device, out
        )

    monkeypatch.setattr(export_module, "edit_tensor", half_the_edit)
    written = {}
    output = export_model(plan, tmp_path / "wrong", written=written)
    report = verify(model, output, plan, generate=False, written=written)
    assert not report["ok"]
    assert any("off the edit's" in message for message in report["failures"]), report["failures"]


def test_a_plan_for_another_checkpoint_is_refused(glm_bf16, tmp_path):
    from tiny_models import build_tiny

    plan = glm_plan(glm_bf16)
    other = build_tiny(tmp_path / "llama", "llama")
    with pytest.raises(AbliterateError, match="was the plan made for another checkpoint"):
        export_model(plan, tmp_path / "out", model_dir=other)


@pytest.mark.slow
def test_ablate_command_prints_the_seed_lines(glm_bf16, tmp_path):
    model, _, meas = glm_bf16
    save_measurements(meas, tmp_path / "m.safetensors")
    recipe = tmp_path / "glm4.yml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": str(model),
                "measurements": str(tmp_path / "m.safetensors"),
                "output": str(tmp_path / "glm4-out"),
                "ablate_individual_experts": False,
                "expert_subset": None,
                "ablate": [{"layer": 2, "measurement": 3, "scale": 1.0, "sparsity": 0.0}],
            }
        )
    )
    command = [str(BIN / "abliterate"), "ablate", str(recipe), "--expert-subset", "0,1,2,3"]
    result = subprocess.run([*command, "-j", "2"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr
    for line in (
        "Detected layer prefix: model",
        "MoE architecture: True",
        "Detected 8 experts per layer",
        "Modifying model.layers.2.self_attn.o_proj.weight",
        "Modifying model.layers.2.mlp.shared_experts.down_proj.weight",
        "Modifying model.layers.2.mlp.gate.weight",
        "Modifying model.layers.2.mlp.experts.3.down_proj.weight",
    ):
        assert line in log, line
    assert "experts.4.down_proj" not in log
    assert "PASSED" in result.stdout
    assert json.loads((tmp_path / "glm4-out.verify.json").read_text())["ok"] is True


# ---- the demo organisms, abliterated with their suggested recipe


def abliterate_demo(demo: Path, workdir: Path, experts: bool | None = None) -> tuple[Path, dict]:
    """Measure, take the suggested recipe (with `ablate_individual_experts` set to `experts`
    when given), export and verify; returns the export and the recipe."""
    from abliterate.analyze import layer_metrics, suggest_recipe
    from abliterate.measure import MeasureOptions, measure_to_file
    from abliterate.model import LoadOptions

    prompts = demo / "prompts"
    meas = measure_to_file(
        demo,
        str(prompts / "target_train.txt"),
        str(prompts / "benign_train.txt"),
        workdir / "measurements.safetensors",
        MeasureOptions(progress=False, load=LoadOptions(device="cpu")),
    )
    recipe, _ = suggest_recipe(layer_metrics(meas), meas.num_layers)
    if experts is not None:
        recipe["ablate_individual_experts"] = experts
    plan = build_plan(recipe, model=demo, measurements=workdir / "measurements.safetensors")
    output = export_model(plan, workdir / "abliterated", jobs=2)
    report = verify(demo, output, plan)
    assert report["ok"], report["failures"]
    return output, recipe


def answers(model_dir: Path, prompts: list[str]) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from abliterate.demo import greedy_responses

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return greedy_responses(model, tokenizer, prompts, max_new_tokens=12)


@pytest.mark.slow
@pytest.mark.parametrize("organism", ["demo_dense", "demo_moe"])
def test_abliterated_demo_answers_targets_and_keeps_benign_answers(organism, request, tmp_path):
    from abliterate.demo import opens_with_refusal as is_refusal

    demo = request.getfixturevalue(organism)
    output, recipe = abliterate_demo(demo, tmp_path)
    assert not (output / "prompts").exists()  # the demo's prompt sets are not model files
    target = (demo / "prompts" / "target_test.txt").read_text().splitlines()
    benign = (demo / "prompts" / "benign_test.txt").read_text().splitlines()
    assert sum(map(is_refusal, answers(demo, target))) / len(target) >= 0.9  # it did refuse
    after = answers(output, target + benign)
    refused = sum(map(is_refusal, after[: len(target)])) / len(target)
    before_benign = answers(demo, benign)
    kept = sum(a == b for a, b in zip(after[len(target) :], before_benign, strict=True))
    assert refused <= 0.10, (recipe, after[:5])
    assert kept / len(benign) >= 0.90, recipe


# ---- the export part of the workflow DAG


@pytest.mark.slow
def test_workflow_exports_the_configs_recipe_and_verifies(demo_dense, tmp_path):
    config = {
        **demo_model_config(demo_dense, "wf"),
        "measure": {"device": "cpu"},
        "recipe": {
            "ablate": [{"layer": 2, "measurement": 3}, {"layer": 3, "measurement": 3}],
            "gate_scale": 0.5,
        },
        "export": {"device": "cpu", "mem_mb": 1024},
    }
    result = snakemake(tmp_path, "--cores", "2", "results/wf/model_card.md", config=config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    results = tmp_path / "results" / "wf"
    report = json.loads((results / "verify.json").read_text())
    assert report["ok"] is True and report["generation"]["ok"] is True
    assert "sweep.tsv" not in os.listdir(results)  # the config's recipe, no sweep needed
    exported = yaml.safe_load((results / "export" / "recipe.yaml").read_text())
    assert [e["layer"] for e in exported["ablate"]] == [2, 3]
    shards = json.loads((results / "export" / "shards.json").read_text())
    logs = os.listdir(results / "logs" / "ablate_shard")
    assert sorted(logs) == sorted(f"{s}.log" for s in shards["edit"])  # one job per shard
    assert "PASSED" in (results / "verify.txt").read_text()
    exported = results / "abliterated"
    assert (exported / "tokenizer.json").is_file()
    # no tool files (Snakemake's .snakemake_timestamp) in what a folder upload publishes
    assert not [p.name for p in exported.iterdir() if p.name.startswith(".")]
    assert report["output"] == "results/wf/abliterated"
    assert not (results / "export" / "assembled").exists()  # moved into place, verified
    card = (exported / "README.md").read_text()
    assert "**Passed**" in card and card == (results / "model_card.md").read_text()
    rerun = snakemake(tmp_path, "-n", "--cores", "2", "results/wf/model_card.md", config=config)
    assert "Nothing to be done" in rerun.stdout + rerun.stderr, rerun.stdout[-3000:]
