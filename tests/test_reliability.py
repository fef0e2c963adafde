"""Never lose or corrupt data: links in the source, one writer per output, stale staging."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_export import fake_measurements
from test_workflow import dense_run  # noqa: F401 - the session's one workflow run

from abliterate.errors import AbliterateError
from abliterate.export import export_model, plan_shards
from abliterate.files import exclusive_lock
from abliterate.layout import inspect_checkpoint
from abliterate.recipe import resolve
from abliterate.verify import verify


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under `root` (links followed) -> SHA-256, to prove nothing changed."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    from tiny_models import build_tiny

    root = tmp_path_factory.mktemp("glm-reliability")
    model = build_tiny(root / "model", "glm4_moe", dtype=torch.bfloat16, max_shard_size="20KB")
    return model, inspect_checkpoint(model), fake_measurements(3, 32)


def plan_for(model: Path, layout, meas):
    plan = resolve({"ablate": [{"layer": 1, "measurement": 2}]}, layout, meas)
    plan.model_dir = str(model)
    return plan


def hf_cache_copy(model: Path, root: Path) -> Path:
    """`model` laid out like the Hugging Face cache: snapshot files are relative links
    into the repository's blobs/ (named by content hash)."""
    repo = root / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in sorted(model.iterdir()):
        if path.is_file():
            blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
            shutil.copyfile(path, blob)
            (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_hugging_face_cache_snapshot_exports_real_files_and_verifies(glm, tmp_path):
    model, _, meas = glm
    snapshot = hf_cache_copy(model, tmp_path)
    before = tree_digest(tmp_path / "models--org--tiny")
    layout = inspect_checkpoint(snapshot)
    plan = plan_for(snapshot, layout, meas)
    jobs = plan_shards(plan, snapshot)
    assert jobs["link"], "the fixture needs unedited shards"
    output = export_model(plan, tmp_path / "out")
    for path in output.iterdir():
        assert not path.is_symlink(), f"{path.name} is a link in the output"
    for shard in jobs["link"]:
        assert (output / shard).read_bytes() == (snapshot / shard).read_bytes()
    manifest = json.loads((output / "manifest.json").read_text())
    assert set(manifest["sha256"]) == {p.name for p in output.iterdir()} - {"manifest.json"}
    assert "config.json" in manifest["copied_files"]
    report = verify(snapshot, output, plan)
    assert report["ok"], report["failures"]
    assert tree_digest(tmp_path / "models--org--tiny") == before  # the cache is untouched


def test_a_link_leaving_the_model_is_refused_unless_allowed(glm, tmp_path):
    model, layout, meas = glm
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shard = sorted(plan_shards(plan_for(copy, layout, meas), copy)["link"])[0]
    (copy / shard).rename(outside / shard)
    (copy / shard).symlink_to(outside / shard)
    plan = plan_for(copy, layout, meas)
    with pytest.raises(AbliterateError, match=f"{shard}: a link to .*outside the model"):
        export_model(plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    output = export_model(plan, tmp_path / "out2", allow_external_links=True)
    assert not (output / shard).is_symlink()
    assert (output / shard).read_bytes() == (outside / shard).read_bytes()


def test_writing_an_output_shard_in_place_never_changes_the_source(glm, tmp_path):
    model, layout, meas = glm
    plan = plan_for(model, layout, meas)
    before = tree_digest(model)
    output = export_model(plan, tmp_path / "out")
    for path in output.glob("*.safetensors"):
        with open(path, "r+b") as handle:
            handle.seek(path.stat().st_size - 4)
            handle.write(b"\xff\xff\xff\xff")
        os.truncate(path, 16)
    assert tree_digest(model) == before


def test_hardlink_mode_is_explicit_and_warned_in_the_card(glm, tmp_path):
    model, layout, meas = glm
    plan = plan_for(model, layout, meas)
    output = export_model(plan, tmp_path / "out", link_mode="hardlink")
    manifest = json.loads((output / "manifest.json").read_text())
    linked = [s for s, how in manifest["shards"].items() if how == "hardlinked"]
    assert linked and all(os.path.samefile(output / s, model / s) for s in linked)
    assert "changes the base model" in (output / "README.md").read_text()
    with pytest.raises(AbliterateError, match="export.link is 'symlink'; expected one of"):
        export_model(plan, tmp_path / "out3", link_mode="symlink")


HOLDER = """
import sys, time
from abliterate.files import exclusive_lock
with exclusive_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_ones_lock_is_taken(glm, tmp_path):
    model, layout, meas = glm
    plan = plan_for(model, layout, meas)
    output = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(output)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            AbliterateError, match=rf"another abliterate run \(pid {holder.pid} on "
        ):
            export_model(plan, output)
        assert not output.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    deadline = time.monotonic() + 10
    while True:  # the kernel drops a dead holder's flock at once; the file itself stays
        try:
            with exclusive_lock(output):
                break
        except AbliterateError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    output = export_model(plan, output)
    assert verify(model, output, plan)["ok"]


def test_stale_files_in_staging_never_reach_the_output(glm, tmp_path):
    model, layout, meas = glm
    plan = plan_for(model, layout, meas)
    staging = tmp_path / "out.partial"
    staging.mkdir()
    (staging / "modeling_evil.py").write_text("raise SystemExit\n")
    (staging / "tokenizer.model").write_bytes(b"stale")
    (staging / "model-99999-of-99999.safetensors").write_bytes(b"\0" * 10)
    output = export_model(plan, tmp_path / "out")
    names = {p.name for p in output.iterdir()}
    assert not {"modeling_evil.py", "tokenizer.model", "model-99999-of-99999.safetensors"} & names
    manifest = json.loads((output / "manifest.json").read_text())
    assert "modeling_evil.py" not in manifest["sha256"]
    assert verify(model, output, plan)["ok"]


def test_a_staging_link_to_the_source_is_removed_not_followed(glm, tmp_path):
    model, layout, meas = glm
    plan = plan_for(model, layout, meas)
    before = tree_digest(model)
    (tmp_path / "out.partial").symlink_to(model, target_is_directory=True)
    output = export_model(plan, tmp_path / "out")
    assert tree_digest(model) == before
    assert not output.is_symlink() and verify(model, output, plan)["ok"]


def test_force_onto_a_file_is_one_sentence(glm, tmp_path):
    model, layout, meas = glm
    (tmp_path / "out").write_text("not a model")
    with pytest.raises(AbliterateError, match="exists and is not a directory"):
        export_model(plan_for(model, layout, meas), tmp_path / "out", force=True)
    assert not (tmp_path / "out.partial").exists()


@pytest.mark.slow
def test_a_workflow_error_is_one_sentence_in_the_log_and_on_the_console(tmp_path, demo_dense):
    from snakemake_runner import demo_model_config, snakemake

    config = demo_model_config(demo_dense, "bad")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"how do i \xff\xfe\n")
    config["prompts"]["target"]["train"] = str(binary)
    config["measure"] = {"device": "cpu"}
    result = snakemake(tmp_path, "--cores", "1", "results/bad/measurements.safetensors",
                       config=config)  # fmt: skip
    assert result.returncode != 0
    log = (tmp_path / "results/bad/logs/measure.log").read_text()
    sentence = f"error: prompt file {binary} is not UTF-8 text (byte 9 is 0xff)"
    assert sentence in log and "Traceback" not in log
    assert sentence in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "results/bad/measurements.safetensors").exists()


def test_a_broken_config_json_is_one_sentence_when_the_workflow_starts(tmp_path):
    from snakemake_runner import snakemake

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{not json")
    prompts = {"train": str(tmp_path / "p.txt"), "test": str(tmp_path / "p.txt")}
    config = {
        "model": {"name": "x", "path": str(model)},
        "prompts": {"target": prompts, "benign": prompts},
    }
    result = snakemake(tmp_path, "-n", config=config)
    assert result.returncode == 1
    assert f"error: {model}/config.json: malformed JSON" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_non_finite_config_number_names_the_key(tmp_path):
    from snakemake_runner import snakemake

    (tmp_path / "config.yaml").write_text(
        "recipe:\n  ablate:\n    - {layer: 1, measurement: 2, scale: .nan}\n"
    )
    result = snakemake(tmp_path, "-n")
    assert result.returncode == 1
    assert (
        "error: config key recipe.ablate[0].scale is nan; expected a finite number."
        in result.stderr
    )


def test_stale_snakemake_locks_are_cleared_only_when_no_run_is_alive(tmp_path):
    from abliterate.files import claim_workdir

    locks = tmp_path / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    (locks / "0.output.lock").write_text("results/x\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder_code = (
        "import sys, time\nfrom abliterate.files import claim_workdir\n"
        "claim = claim_workdir(sys.argv[1])\nprint(claim is not None, flush=True)\ntime.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", holder_code, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout.readline().strip() == "True"  # it found the lock stale
        assert not (locks / "0.output.lock").exists()
        (locks / "0.output.lock").write_text("results/x\n")  # the live run's own lock
        assert claim_workdir(tmp_path) is None  # another run is alive: nothing is touched
        assert (locks / "0.output.lock").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # the run dies without cleaning up
        holder.wait()
    claim = claim_workdir(tmp_path)
    assert claim is not None and not (locks / "0.output.lock").exists()
    claim.close()


# ---- SIGKILL at every stage of `abliterate ablate`, then the same command again

KILLER = """
import os, signal, sys
import abliterate.export as export
import abliterate.files as files
import abliterate.verify as verify_module
from abliterate.cli import main

point, calls = sys.argv[1], {"n": 0}

def die_after(module, name, when):
    real = getattr(module, name)
    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        calls["n"] += 1
        if when(calls["n"], args):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: a real kill
        return result
    setattr(module, name, wrapper)

if point == "shard":  # the first edited shard is complete, the others are not
    die_after(export, "ablate_shard", lambda n, a: n == 1)
elif point == "assemble":  # the first unedited shard is in the staging directory
    die_after(export, "place_copy", lambda n, a: n == 1)
elif point == "manifest":  # everything written, the staging directory not yet renamed
    die_after(export, "write_json", lambda n, a: str(a[1]).endswith("manifest.json"))
elif point == "verify":  # everything assembled, verification (before publishing) has begun
    die_after(verify_module, "tolerance", lambda n, a: n == 1)
sys.exit(main(sys.argv[2:]))
"""


def shard_bytes(output: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(output.glob("*.safetensors"))}


@pytest.mark.parametrize("point", ["shard", "assemble", "manifest", "verify"])
def test_the_cli_converges_after_sigkill_at_every_stage(glm, tmp_path, point):
    from abliterate.measure import save_measurements

    model, _, meas = glm
    save_measurements(meas, tmp_path / "m.safetensors")
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        "model: " + str(model) + "\nmeasurements: " + str(tmp_path / "m.safetensors")
        + "\noutput: " + str(tmp_path / "out")
        + "\nablate:\n  - {layer: 1, measurement: 2}\n  - {layer: 2, measurement: 3, scale: 0.8}\n"
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    command = ["ablate", str(recipe)]
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, point, *command], env=env, capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # nothing half-done looks done: the output appears only once verified, card and all
    assert not (tmp_path / "out").exists()
    rerun = subprocess.run(
        [sys.executable, "-m", "abliterate.cli", *command], env=env, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "PASSED" in rerun.stdout
    from abliterate.cli import main

    assert main([*command, "--output", str(tmp_path / "ref")]) == 0  # never interrupted
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "ref")
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("out", "ref")]
    for manifest in manifests:  # the card names the output directory, which differs
        manifest["sha256"].pop("README.md")
    assert manifests[0]["sha256"] == manifests[1]["sha256"]
    assert not (tmp_path / "out.partial").exists()


# ---- SIGKILL of the whole workflow at every stage, then the same command again

KILL_POINTS = (  # the log a stage's job opens once it has started
    "measure.log",
    "evaluate_variants-0.log",
    "ablate_shard/*.log",
    "assemble_model.log",
    "verify_model.log",
)


def _run_until(workdir: Path, command: list[str], env: dict, log_glob: str) -> bool:
    """Start the workflow, SIGKILL its whole process group as soon as `log_glob` exists
    under results/demo/logs; True if the kill landed, False if the run ended first."""
    logs = workdir / "results" / "demo" / "logs"
    process = subprocess.Popen(
        command, cwd=workdir, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 900
    while process.poll() is None and time.monotonic() < deadline:
        if list(logs.glob(log_glob)):
            os.killpg(process.pid, signal.SIGKILL)  # Snakemake and every job it started
            process.wait()
            return True
        time.sleep(0.01)
    process.wait()
    return False


@pytest.mark.slow
def test_the_workflow_converges_after_sigkill_at_every_stage(request, demo_dense, tmp_path):
    """Kill the workflow in measurement, the sweep, a shard job, assembly and
    verification in turn, rerunning the same command each time (stale Snakemake locks are
    cleared, incomplete jobs redone): the final export equals an uninterrupted run's."""
    from snakemake_runner import BIN, ROOT

    reference_run = request.getfixturevalue("dense_run")  # uninterrupted, same config
    (tmp_path / "config.yaml").write_text((reference_run / "config.yaml").read_text())
    command = [str(BIN / "snakemake"), "--cores", "2", "--snakefile", str(ROOT / "Snakefile")]
    command += ["--configfile", str(tmp_path / "config.yaml")]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    landed = [point for point in KILL_POINTS if _run_until(tmp_path, command, env, point)]
    assert len(landed) >= 4, landed  # the fast stages may finish before the poll sees them
    final = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    ours, reference = (d / "results" / "demo" for d in (tmp_path, reference_run))
    assert json.loads((ours / "verify.json").read_text())["ok"] is True
    assert shard_bytes(ours / "abliterated") == shard_bytes(reference / "abliterated")
    assert (ours / "best.yaml").read_text() == (reference / "best.yaml").read_text()
    assert not list((ours.parent.parent / "results").rglob("*.partial"))
