"""Shared fixtures: tiny random checkpoints and the (cached) trained demo organisms."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sys
from pathlib import Path

# The suite runs on the CPU kernel paths the demo organisms train with
# (abliterate.demo.REPRODUCIBLE_KERNELS; torch reads them when it loads, so they are set
# before anything imports it): the organisms, and every number measured on them, are then
# the same on this machine as on CI's, whatever its CPU.
os.environ.update({"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE,STRICT"})

import pytest  # noqa: E402

TESTS = Path(__file__).parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))

from tiny_models import SOURCE_MODELS, build_tiny  # noqa: E402


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


def _build(arch: str, seed: int, dtype: str | None, wording: str) -> Path:
    """Build the organism into the cache unless it is there; the caller holds its lock."""
    from abliterate.demo import build_demo_model

    path = _demo_cache_dir(arch, seed, dtype, wording)
    if not (path / "config.json").is_file():
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build_demo_model(tmp, arch=arch, seed=seed, dtype=dtype, wording=wording)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    return path


def _lock(path: Path, block: bool):
    """The organism's lock file, locked (None when `block` is false and another worker
    holds it)."""
    lock = open(path.with_name(path.name + ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except BlockingIOError:
        lock.close()
        return None
    return lock


# (arch, wording) of each organism the collected tests use, in the order they first need
# it (pytest_collection_finish fills it).
NEEDED: list[tuple[str, str]] = []


def _build_another() -> bool:
    """Build one organism the session needs that no worker has built or is building; False
    when there is none. Why: a worker that needs an organism another worker is still
    training would otherwise wait idle (on CI, with every organism to build, the first two
    groups both need the dense one)."""
    for arch, wording in NEEDED:
        path = _demo_cache_dir(arch, 0, None, wording)
        if (path / "config.json").is_file():
            continue
        lock = _lock(path, block=False)
        if lock is not None:
            with lock:
                _build(arch, 0, None, wording)
            return True
    return False


def _demo(arch: str, seed: int = 0, *, dtype: str | None = None, wording: str = "a") -> Path:
    """The cached organism, built once: a lock makes parallel test workers wait for the one
    building it instead of building it twice (and build others meanwhile)."""
    path = _demo_cache_dir(arch, seed, dtype, wording)
    path.parent.mkdir(parents=True, exist_ok=True)
    while (lock := _lock(path, block=False)) is None:
        if not _build_another():  # nothing else to build: wait for the worker building it
            lock = _lock(path, block=True)
            break
    with lock:
        _build(arch, seed, dtype, wording)
    SOURCE_MODELS.append(path)
    return path


# (arch, wording) of the organism behind each fixture that returns one model directory
# (pytest_collection_finish reads it too, to know which organisms a session needs).
ORGANISM_FIXTURES = {"demo_dense": ("llama", "a"), "demo_moe": ("glm4_moe", "a")}


@pytest.fixture(scope="session")
def demo_dense() -> Path:
    """The trained dense (llama) demo organism; read-only, shared by the session."""
    arch, wording = ORGANISM_FIXTURES["demo_dense"]
    return _demo(arch, wording=wording)


@pytest.fixture(scope="session")
def demo_moe() -> Path:
    """The trained GLM-4.5-Air-style MoE demo organism; read-only, shared by the session."""
    arch, wording = ORGANISM_FIXTURES["demo_moe"]
    return _demo(arch, wording=wording)


@pytest.fixture(scope="session")
def demo_dense_abliterated(demo_dense, tmp_path_factory) -> tuple[Path, Path]:
    """(abliterated model, its plan.json): the dense demo after its suggested recipe.

    One abliteration shared by the chat and compare tests (made as tests/test_export.py
    makes it).
    """
    from test_export import abliterate_demo

    from abliterate.recipe import build_plan

    workdir = tmp_path_factory.mktemp("demo-dense-abliterated")
    output, recipe = abliterate_demo(demo_dense, workdir)
    plan = build_plan(recipe, model=demo_dense, measurements=workdir / "measurements.safetensors")
    return output, plan.save(workdir / "plan.json")


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


def _digest_tree(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


_SOURCE_DIGESTS: dict[Path, str] = {}
_CHANGED: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Hash every source model a test can see before it runs and compare after.

    Why: the tool must never write to a source model, whatever a test makes it do (export,
    resume, verify, workflow). A test that damages its own input on purpose (a corrupt
    header, say) is marked `modifies_source`.
    """
    for path in list(SOURCE_MODELS):
        if path not in _SOURCE_DIGESTS and path.is_dir():
            _SOURCE_DIGESTS[path] = _digest_tree(path)
    outcome = yield
    if item.get_closest_marker("modifies_source"):
        for path in list(_SOURCE_DIGESTS):
            _SOURCE_DIGESTS[path] = _digest_tree(path) if path.is_dir() else ""
        return
    changed = []
    for path, digest in list(_SOURCE_DIGESTS.items()):
        if path.is_dir() and _digest_tree(path) != digest:
            changed.append(str(path))
            _CHANGED.append(f"{path} (during {item.nodeid})")
            _SOURCE_DIGESTS[path] = _digest_tree(path)
    if changed and outcome.excinfo is None:  # the test that wrote to a source model fails
        outcome.force_exception(AssertionError(f"source model changed: {', '.join(changed)}"))
    for path in list(SOURCE_MODELS):  # models built inside the test, as they were saved
        if path not in _SOURCE_DIGESTS and path.is_dir():
            _SOURCE_DIGESTS[path] = _digest_tree(path)


# Test modules that share an expensive session fixture run in the same worker under
# `pytest -n N --dist loadgroup` (make test), so the fixture runs once; every other module
# is a group of its own (its module fixtures run once too).
SHARED_RUNS = {
    "test_workflow": "dense-run",  # dense_run, the default workflow on the dense organism
    "test_reliability": "dense-run",
    "test_compare": "dense-run",  # demo_dense_abliterated too
    "test_chat": "dense-run",
    "test_readme": "own-model",  # own_model_run, the README's own-model block
    "test_slurm": "own-model",
}


# The longest groups start first, so that no worker is left with a long one at the end
# (make test passes --no-loadscope-reorder: xdist would order the groups by test count).
FIRST = ("own-model", "dense-run", "test_search", "test_demo")


def _group(item) -> str:
    return SHARED_RUNS.get(item.path.stem, item.path.stem)


# tryfirst: pytest-xdist's worker reads the xdist_group marks in its own
# pytest_collection_modifyitems (it suffixes each node id with "@group", which is what the
# scheduler groups by), and that hook ran before this one; without tryfirst the marks came
# too late and every group's tests were spread over the workers, each rerunning the
# group's shared fixture (the dense workflow ran twice per suite).
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))
    rank = {group: i for i, group in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(_group(item), len(FIRST)))  # stable within a group


def pytest_collection_finish(session):
    """The organisms the selected tests use, in the order they run (`NEEDED`)."""
    for item in session.items:
        names = item.fixturenames
        uses = [organism for name, organism in ORGANISM_FIXTURES.items() if name in names]
        if "demo_family" in names:
            arch = item.callspec.params["demo_family"]
            uses.append((arch, FAMILY_ORGANISMS[arch]))
        NEEDED.extend(use for use in uses if use not in NEEDED)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """Stop at once when `--dist loadgroup` would not group: pytest 9.2 stopped reading the
    node id pytest-xdist 3.8 rewrites (pytest-xdist issue 1386; pyproject pins pytest < 9.2),
    and nothing else would notice every group's shared run being repeated in each worker."""
    if node.config.getvalue("dist") == "loadgroup" and ids and not any("@" in i for i in ids):
        pytest.exit(
            f"--dist loadgroup: no test collected by {node.gateway.id} carries its xdist "
            "group in its node id, so the workers would not share their groups' fixtures; "
            'pytest 9.2 does this with pytest-xdist 3.8 (.venv/bin/pip install -e ".[test]" '
            "installs pytest < 9.2).",
            returncode=4,
        )


def pytest_sessionfinish(session, exitstatus):
    """The suite's own count of source models checked, and a failure if one changed."""
    workers = getattr(session.config.option, "numprocesses", None)
    if workers and not hasattr(session.config, "workerinput"):  # the pytest-xdist controller
        print(
            "\nsource models hashed before and after every test in each worker (a change fails the test)"
        )
        return
    for path, digest in _SOURCE_DIGESTS.items():
        if digest and path.is_dir() and _digest_tree(path) != digest:
            _CHANGED.append(f"{path} (after the last test)")
    print(
        f"\nsource models hashed before and after: {len(_SOURCE_DIGESTS)}, changed: {len(_CHANGED)}"
    )
    if _CHANGED:
        print("changed source models:\n  " + "\n  ".join(_CHANGED))
        session.exitstatus = 1


@pytest.fixture(scope="session")
def own_model_run(tmp_path_factory, demo_dense):
    """The README's own-model block, run once in a fresh checkout: (checkout, result)."""
    from checkout import first_bash_block, make_checkout, run_block

    checkout = make_checkout(tmp_path_factory.mktemp("own-model"), demo_dense)
    return checkout, run_block(checkout, first_bash_block("Your own model"))
