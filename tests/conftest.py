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


def _demo_cache_dir(arch: str, seed: int, dtype: str | None, wording: str) -> Path:
    """Trained organisms are cached by the hash of the code that trains them."""
    source = (ROOT / "src" / "abliterate" / "demo.py").read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:12]
    name = f"{arch}-seed{seed}-{dtype or 'default'}-{wording}-{digest}"
    return ROOT / ".pytest_cache" / "abliterate-demo" / name


def _demo(arch: str, seed: int = 0, *, dtype: str | None = None, wording: str = "a") -> Path:
    from abliterate.demo import build_demo_model

    path = _demo_cache_dir(arch, seed, dtype, wording)
    if not (path / "config.json").is_file():
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build_demo_model(tmp, arch=arch, seed=seed, dtype=dtype, wording=wording)
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


# One organism per further family in the layout registry, saved in bfloat16 (their default)
# like real checkpoints; the two wordings alternate so each is seen on dense and MoE models.
FAMILY_ORGANISMS = {
    "qwen3": "b",  # dense, tied embeddings
    "mixtral": "a",  # block_sparse_moe.experts.{E}.w1/w2/w3
    "gpt_oss": "b",  # fused experts with biases, attention sinks
    "deepseek_v3": "a",  # MLA attention, routed + shared experts
}


@pytest.fixture(scope="session", params=sorted(FAMILY_ORGANISMS))
def demo_family(request) -> tuple[str, Path]:
    """(arch, model_dir) of each further family's trained organism; built once, read-only."""
    arch = request.param
    return arch, _demo(arch, wording=FAMILY_ORGANISMS[arch])
