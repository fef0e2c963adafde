"""`abliterate compare`: weight changes along the plan's direction and side-by-side answers."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from test_workflow import dense_run  # noqa: F401 - the session's one workflow run

from abliterate.cli import main
from abliterate.compare import along_norm, plan_directions, weight_changes
from abliterate.demo import opens_with_refusal
from abliterate.errors import AbliterateError


def read_tsv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_along_norm_contracts_the_hidden_axis():
    weight = torch.arange(12.0).reshape(3, 4)  # hidden 3 on axis 0, 4 on axis 1
    r = torch.tensor([0.0, 1.0, 0.0])
    assert along_norm(weight, r, 0) == pytest.approx(float(weight[1].norm()))
    r4 = torch.tensor([0.0, 0.0, 0.0, 1.0])
    assert along_norm(weight, r4, 1) == pytest.approx(float(weight[:, 3].norm()))


def test_identical_checkpoints_show_no_change(tiny_llama):
    changes = weight_changes(tiny_llama, tiny_llama, torch.nn.functional.normalize(
        torch.ones(tiny_llama_hidden(tiny_llama)), dim=0))  # fmt: skip
    assert changes and all(c.rel_change == 0 for c in changes)
    assert all(c.along_a == pytest.approx(c.along_b) for c in changes)


def tiny_llama_hidden(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["hidden_size"]


@pytest.mark.slow
def test_compare_end_to_end_on_the_demo(demo_dense, demo_dense_abliterated, tmp_path, capsys):
    """The export moves only the plan's writers, takes them to ~0 along the direction, and
    turns the refusal into an answer."""
    output, plan = demo_dense_abliterated
    prompts = tmp_path / "prompts.txt"
    target = (demo_dense / "prompts" / "target_test.txt").read_text().splitlines()[:3]
    prompts.write_text("\n".join(target) + "\n")
    tsv, png, answers = tmp_path / "compare.tsv", tmp_path / "compare.png", tmp_path / "a.tsv"
    code = main(
        ["compare", str(demo_dense), str(output), "--plan", str(plan), "--tsv", str(tsv),
         "--plot", str(png), "--prompts", str(prompts), "--answers", str(answers),
         "--max-new-tokens", "12", "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    screen = capsys.readouterr().out
    assert "rel_change" in screen and "along_A" in screen
    rows = read_tsv(tsv)
    edited = {(int(r["layer"]), r["component"]) for r in rows if float(r["rel_change"]) > 0}
    assert edited == {(layer, c) for layer in range(4) for c in ("attn_out", "mlp_down")}
    for row in rows:
        if row["layer"] and float(row["rel_change"]) > 0:
            assert float(row["along_A"]) > 0.1
            assert float(row["along_B"]) < 1e-4 * float(row["along_A"]) + 1e-5
    embed = next(r for r in rows if r["component"] == "embed")
    assert float(embed["rel_change"]) == 0
    assert png.stat().st_size > 10_000
    side = read_tsv(answers)
    assert [r["prompt"] for r in side] == target
    assert all(opens_with_refusal(r["answer_A"]) for r in side)
    assert not any(opens_with_refusal(r["answer_B"]) for r in side)
    assert side[0]["answer_A"] in screen and side[0]["answer_B"] in screen


def test_measurement_direction_gives_every_layer_the_same_direction(
    demo_dense, demo_dense_abliterated, capsys
):
    output, plan = demo_dense_abliterated
    measurements = plan.parent / "measurements.safetensors"
    by_plan = weight_changes(demo_dense, output, plan_directions(plan, demo_dense))
    assert main(
        ["compare", str(demo_dense), str(output), "--measurements", str(measurements),
         "--measurement", "3"]
    ) == 0  # fmt: skip
    # the demo's recipe uses measurement 3 for every layer: same numbers as the plan's
    screen = capsys.readouterr().out
    for change in by_plan:
        if change.layer is not None:
            assert f"{change.along_a:.4g}" in screen


def test_bad_inputs_get_one_sentence_naming_the_file(
    demo_dense, demo_dense_abliterated, tiny_llama, tmp_path, capsys
):
    output, plan = demo_dense_abliterated
    missing = tmp_path / "nowhere"
    with pytest.raises(AbliterateError, match="nowhere"):
        weight_changes(demo_dense, missing)
    # a plan for another model
    with pytest.raises(AbliterateError, match=r"plan\.json.*another model"):
        plan_directions(plan, tiny_llama)
    # same tensor names, different shapes
    other = tmp_path / "other"
    shutil.copytree(output, other)
    from safetensors.torch import load_file, save_file

    key = "model.layers.0.self_attn.o_proj.weight"
    shard = other / json.loads((other / "model.safetensors.index.json").read_text())[
        "weight_map"][key]  # fmt: skip
    tensors = load_file(shard)
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(AbliterateError, match=rf"{re.escape(str(other))}.*{re.escape(key)}.*shape"):
        weight_changes(demo_dense, other)
    assert main(["compare", str(demo_dense), str(output), "--measurement", "3"]) == 1
    assert "go together" in capsys.readouterr().err
    missing_prompts = tmp_path / "prompts.txt"
    assert main(["compare", str(demo_dense), str(output), "--prompts", str(missing_prompts)]) == 1
    assert f"{missing_prompts}: file not found" in capsys.readouterr().err


@pytest.mark.slow
def test_workflow_compares_the_export_with_its_source(request):
    results = request.getfixturevalue("dense_run") / "results" / "demo"
    rows = read_tsv(results / "compare.tsv")
    edited_rows = [r for r in rows if float(r["rel_change"]) > 0]
    assert edited_rows and all(r["along_A"] for r in edited_rows)
    # The selected recipe's scale s leaves (1 - s) of each writer along the direction; a
    # norm-preserving edit then scales each hidden-axis column w back to its norm, by
    # f = |w| / |w - s (r.w) r| >= 1, so along_B <= (1 - s) f_max along_A.
    from safetensors import safe_open

    entries = json.loads((results / "export" / "plan.json").read_text())["entries"]
    with safe_open(results / "export" / "plan.safetensors", framework="pt") as handle:
        directions = {e["direction_id"]: handle.get_tensor(e["direction_id"]) for e in entries}
    from abliterate.shards import read_checkpoint

    source = request.getfixturevalue("demo_dense")
    tensors = read_checkpoint(source)
    by_row: dict[tuple[str, str], float] = {}
    for entry in entries:
        layer, component = str(entry["layer"]), entry["component"]
        with safe_open(source / tensors[entry["key"]].shard, framework="pt") as handle:
            weight = handle.get_tensor(entry["key"]).float()
        r = directions[entry["direction_id"]].float()
        r = r / r.norm()
        columns = weight.movedim(entry["hidden_axis"], 0).reshape(
            weight.shape[entry["hidden_axis"]], -1
        )
        along = r @ columns
        f = 1.0
        if entry["norm_preserve"]:
            edited = columns - entry["scale"] * torch.outer(r, along)
            f = (columns.norm(dim=0) / edited.norm(dim=0).clamp_min(1e-12)).max().item()
        by_row[(layer, component)] = max(
            by_row.get((layer, component), 0.0), (1 - entry["scale"]) * f
        )
    for row in edited_rows:
        bound = by_row[(row["layer"], row["component"])]
        assert float(row["along_B"]) <= bound * float(row["along_A"]) * (1 + 1e-4) + 1e-6
        assert float(row["along_B"]) < float(row["along_A"])
    assert (results / "compare.png").stat().st_size > 10_000
    answers = read_tsv(results / "compare_answers.tsv")
    assert len(answers) == 6  # evaluate.samples (3) target + 3 benign prompts
    assert all(opens_with_refusal(r["answer_A"]) for r in answers[:3])
    assert not any(opens_with_refusal(r["answer_B"]) for r in answers)
