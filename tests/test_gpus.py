"""GPU slots without GPUs: ids declared through ABLITERATE_GPUS, real processes, real locks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from abliterate import gpus
from abliterate.errors import AbliterateError
from abliterate.gpus import claim_gpus, use_job_devices, visible_gpus

# A job that reports the GPU it was given, then runs until told to stop (or killed).
JOB = (
    "import os, sys, time, pathlib; out = pathlib.Path(sys.argv[1]);"
    "out.write_text(os.environ['CUDA_VISIBLE_DEVICES']);"
    "stop = out.with_suffix('.stop');"
    "[time.sleep(0.05) for _ in range(1200) if not stop.exists()]"
)


def start_job(tmp_path: Path, name: str, env: dict) -> subprocess.Popen:
    command = [sys.executable, "-m", "abliterate.gpus", "--gpus", "1", "--"]
    command += [sys.executable, "-c", JOB, str(tmp_path / f"{name}.gpu")]
    return subprocess.Popen(command, cwd=tmp_path, env=env)


def wait_for(path: Path, seconds: float = 30.0) -> str | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.05)
    return None


@pytest.fixture
def fake_gpus():
    env = {**os.environ, "ABLITERATE_GPUS": "0,1,2"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "src"), *sys.path])
    return env


def test_concurrent_jobs_hold_distinct_gpus_and_a_killed_job_frees_its_own(tmp_path, fake_gpus):
    jobs = {name: start_job(tmp_path, name, fake_gpus) for name in ("a", "b", "c")}
    try:
        given = {name: wait_for(tmp_path / f"{name}.gpu") for name in jobs}
        assert sorted(given.values()) == ["0", "1", "2"], given
        # all three slots are taken: a fourth job waits instead of doubling up on one
        jobs["d"] = start_job(tmp_path, "d", fake_gpus)
        assert wait_for(tmp_path / "d.gpu", seconds=1.5) is None
        assert jobs["d"].poll() is None
        # SIGKILL gives the job no chance to clean up; the kernel drops its lock
        jobs["b"].send_signal(signal.SIGKILL)
        jobs["b"].wait()
        assert wait_for(tmp_path / "d.gpu") == given["b"]
        # a job that ends normally frees its slot too
        (tmp_path / "a.stop").touch()
        assert jobs["a"].wait(timeout=30) == 0
        with claim_gpus(1, environ=fake_gpus, lock_dir=tmp_path / ".snakemake/gpu-slots") as claim:
            assert claim.ids == [given["a"]]
    finally:
        for name, job in jobs.items():
            (tmp_path / f"{name}.stop").touch()
            job.wait(timeout=30)


def test_multi_gpu_claims_are_all_or_nothing(tmp_path):
    env = {"ABLITERATE_GPUS": "4,5,6"}
    with claim_gpus(2, environ=env, lock_dir=tmp_path) as pair:
        assert pair.ids == ["4", "5"]
        with pytest.raises(TimeoutError):  # one id is free, two are wanted: take neither
            claim_gpus(2, environ=env, lock_dir=tmp_path, timeout=0.5, poll_seconds=0.1)
        with claim_gpus(1, environ=env, lock_dir=tmp_path) as single:
            assert single.ids == ["6"]
    with claim_gpus(3, environ=env, lock_dir=tmp_path) as everything:
        assert everything.ids == ["4", "5", "6"]


def test_more_gpus_than_visible_is_one_clear_error(tmp_path):
    with pytest.raises(AbliterateError, match="asks for 2 GPU.*1 are visible.*ABLITERATE_GPUS"):
        claim_gpus(2, environ={"ABLITERATE_GPUS": "0"}, lock_dir=tmp_path)


def test_visible_gpus_prefers_declared_then_cuda_visible_devices():
    assert visible_gpus({"ABLITERATE_GPUS": "2, 3", "CUDA_VISIBLE_DEVICES": "0"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1,0"}) == ["1", "0"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


def test_job_devices_claim_only_what_the_job_declares_and_trust_slurm(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"ABLITERATE_GPUS": "0,1"}
    assert use_job_devices(0, environ=env) == []
    assert "CUDA_VISIBLE_DEVICES" not in env  # no GPU declared: nothing claimed or changed
    assert not (tmp_path / ".snakemake").exists()
    assert use_job_devices(1, environ=env) == ["0"]
    assert env["CUDA_VISIBLE_DEVICES"] == "0"
    assert (tmp_path / ".snakemake" / "gpu-slots").is_dir()
    gpus._HELD.pop().release()  # held for the process's life otherwise
    # inside a SLURM allocation the scheduler's CUDA_VISIBLE_DEVICES is the job's own
    slurm = {"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "3"}
    assert use_job_devices(1, environ=slurm) == ["3"]
    assert slurm["CUDA_VISIBLE_DEVICES"] == "3"


def test_job_devices_set_torch_threads(tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    before = torch.get_num_threads()
    try:
        use_job_devices(0, threads=1, environ={})
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
