"""Shared fixtures: tiny random checkpoints and the (cached) trained demo organisms."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))

from tiny_models import build_tiny  # noqa: E402


@pytest.fixture
def tiny_llama(tmp_path):
    return build_tiny(tmp_path / "tiny-llama", "llama")


@pytest.fixture
def tiny_glm4_moe(tmp_path):
    return build_tiny(tmp_path / "tiny-glm4-moe", "glm4_moe")


def _demo_cache_dir(arch: str, seed: int) -> Path:
    """Trained organisms are cached by the hash of the code that trains them."""
    source = (ROOT / "src" / "abliterate" / "demo.py").read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:12]
    return ROOT / ".pytest_cache" / "abliterate-demo" / f"{arch}-seed{seed}-{digest}"


def _demo(arch: str, seed: int = 0) -> Path:
    from abliterate.demo import build_demo_model

    path = _demo_cache_dir(arch, seed)
    if not (path / "config.json").is_file():
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build_demo_model(tmp, arch=arch, seed=seed)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    return path


@pytest.fixture(scope="session")
def demo_dense() -> Path:
    """The trained dense (llama) demo organism; read-only, shared by the session."""
    return _demo("llama")


@pytest.fixture(scope="session")
def demo_moe() -> Path:
    """The trained GLM-4.5-Air-style MoE demo organism; read-only, shared by the session."""
    return _demo("glm4_moe")


@pytest.fixture(scope="session")
def own_model_run(tmp_path_factory, demo_dense):
    """The README's own-model block, run once in a fresh checkout: (checkout, result)."""
    from checkout import first_bash_block, make_checkout, run_block

    checkout = make_checkout(tmp_path_factory.mktemp("own-model"), demo_dense)
    return checkout, run_block(checkout, first_bash_block("Your own model"))
