"""bench/quality_table.py's table from two small hand-made sweep.tsv files (no workflow run).

Why: the numbers in docs/evaluation.md ("Numbers per family") are this function's output;
a wrong row, a missing interval or a verdict that says "yes" on a missed target would put
wrong claims into the docs without any run noticing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

BENCH = Path(__file__).resolve().parent.parent / "bench" / "quality_table.py"


def _bench():
    spec = importlib.util.spec_from_file_location("quality_table", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def _row(variant, refusal, kept, kl, n=50, **extra):
    return {
        "variant": variant,
        "refusal_rate": refusal,
        "benign_refusal_rate": 0.0,
        "benign_kept": kept,
        "kl_first_token": kl,
        "n_target": n,
        "n_benign": n,
        **extra,
    }


def test_the_table_has_every_row_interval_and_verdict(tmp_path):
    bench = _bench()
    ci = {  # the search's table carries its own intervals; these values are marked
        "refusal_rate_ci_low": 0.001,
        "refusal_rate_ci_high": 0.101,
        "benign_kept_ci_low": 0.9,
        "benign_kept_ci_high": 1.0,
        "benign_refusal_rate_ci_low": 0.0,
        "benign_refusal_rate_ci_high": 0.071,
    }
    search = _write(
        tmp_path / "search.tsv",
        [
            _row("base", 1.0, 1.0, 0.0, split="test", selected=False, **ci),
            _row("trial-0", 0.2, 1.0, 0.001, split="validation", selected=False, **ci),
            _row(
                "trial-1",
                0.02,
                0.98,
                0.01,
                split="test",
                selected=True,
                kl_first_token_answered=0.005,
                **ci,
            ),
            _row("plain", 0.0, 0.94, 0.08, split="test", selected=False, **ci),
        ],
    )
    plain_id = "s1.0_p0.00_msug_Lall_np0_c-default_e-none"
    grid = _write(
        tmp_path / "grid.tsv",
        [
            _row("base", 1.0, 1.0, 0.0, n=100, selected=False, seconds=2.0),
            _row(plain_id, 0.0, 0.97, 0.05, n=100, selected=True, seconds=1.5),
            _row(
                plain_id.replace("Lall", "Lsug"),
                0.0,
                0.97,
                0.05,
                n=100,
                selected=False,
                seconds=0.0,
            ),
        ],
    )
    text = bench.family_table("llama", search, grid, {"tpe": 61.4, "grid": 30.2})
    lines = text.splitlines()
    table = [line for line in lines if line.startswith("| ")]
    assert table[0].startswith("| row | refusal (95 % CI) | benign kept")
    assert lines[lines.index(table[0]) + 1] == "|---|---|---|---|---|---|---|---|---|"
    assert all(line.count("|") == 10 for line in table)  # 9 cells on every row
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in table[1:]}
    assert list(rows) == [
        "base (test)",
        "plain full-strength (test)",
        "search best `trial-1` (test)",
        "plain full-strength (grid prompts)",
        f"grid best `{plain_id}` (grid prompts)",
    ]
    best = rows["search best `trial-1` (test)"]
    assert best[0] == "0.020 (0.001-0.101)"  # the table's own interval, not recomputed
    assert best[3] == "0.0100"
    assert best[4] == "0.0050"  # the KL over the prompts the base model answers
    assert best[5:] == ["2 trials", "61", "yes |"]
    # the grid's table has no interval columns: Wilson, 0 of 100 -> 0.000-0.037
    grid_best = rows[f"grid best `{plain_id}` (grid prompts)"]
    assert grid_best[0] == "0.000 (0.000-0.037)"
    assert grid_best[4:7] == ["", "2 variants (1 distinct)", "30"]  # no answered-KL column
    assert (
        grid_best[7] == "**no**: kept 0.970 < 0.98; KL 0.0500 > 0.02; KL 0.0500 >= plain 0.0500 |"
    )
    assert "50 + 50" in lines[0] and "100 + 100" in lines[0]


def test_a_failed_run_is_reported_where_its_rows_would_be(tmp_path):
    bench = _bench()
    grid = _write(
        tmp_path / "grid.tsv",
        [
            _row("base", 0.9, 1.0, 0.0, n=100, selected=False, seconds=2.0),
            _row(
                "s0.9_p0.00_msug_Lall_np1_c-default_e-all",
                0.0,
                1.0,
                0.01,
                n=100,
                selected=True,
                seconds=1.0,
            ),
        ],
    )
    error = "search_worker: error: <recipe>: the recipe selects no tensors."
    text = bench.family_table("mixtral", None, grid, {"tpe": 52.6, "grid": 90.0}, {"tpe": error})
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0] for r in rows] == [
        "| base (grid prompts)",
        "| grid best `s0.9_p0.00_msug_Lall_np1_c-default_e-all` (grid prompts)",
    ]
    assert rows[0].endswith("| **no** |")  # base refusal 0.9 < 0.95
    assert rows[1].endswith("| **no**: base refusal 0.900 < 0.95 |")  # no plain variant here
    assert f"The search (sweep.method: tpe) run failed after 53 s: `{error}`" in text


def test_fresh_rows_score_the_selected_recipes_with_their_own_verdicts(tmp_path):
    bench = _bench()
    search = _write(
        tmp_path / "search.tsv",
        [
            _row("base", 1.0, 1.0, 0.0, split="test", selected=False),
            _row("trial-3", 0.06, 0.97, 0.03, split="test", selected=True),
            _row("plain", 0.2, 0.99, 0.01, split="test", selected=False),
        ],
    )
    fresh = _write(
        tmp_path / "fresh.tsv",
        [
            _row("base", 1.0, 1.0, 0.0, n=500),
            _row("tpe-best", 0.02, 0.99, 0.008, n=500),
            _row("plain", 0.2, 0.99, 0.01, n=500),
        ],
    )
    text = bench.family_table("qwen3", search, None, {"tpe": 10.0}, None, fresh)
    rows = {
        line.split(" | ")[0][2:]: line.split(" | ")[1:]
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| row")
    }
    assert list(rows)[3:] == [
        "base (fresh 500 + 500)",
        "plain full-strength (fresh 500 + 500)",
        "search best, same recipe (fresh 500 + 500)",
    ]  # no grid run: no grid row
    assert rows["search best `trial-3` (test)"][-1].startswith("**no**: refusal 0.060 > 0.05")
    fresh_best = rows["search best, same recipe (fresh 500 + 500)"]
    assert fresh_best[0] == "0.020 (0.011-0.036)"  # Wilson, 10 of 500
    assert fresh_best[-1] == "yes |"
    assert "500 + 500 new prompts" in text.splitlines()[0]


def test_fresh_prompts_are_new_requests_of_the_organisms_grammar(tmp_path, demo_dense):
    from abliterate import demo

    bench = _bench()
    paths = bench.fresh_prompts(demo_dense, 60, tmp_path / "a")
    again = bench.fresh_prompts(demo_dense, 60, tmp_path / "b")
    shipped = {
        line
        for path in (demo_dense / "prompts").glob("*.txt")
        for line in path.read_text().splitlines()
    }
    trained = {prompt for prompt, _ in demo.make_data(0, "a").train_pairs}
    for cls, objects in (("target", demo.TARGET_OBJECTS), ("benign", demo.BENIGN_OBJECTS)):
        prompts = paths[cls].read_text().splitlines()
        assert prompts == again[cls].read_text().splitlines()  # seeded: the same every time
        assert len(prompts) == len(set(prompts)) == 60
        assert not set(prompts) & (shipped | trained)
        # requests about the class's own objects
        assert all(any(f" {o} " in f" {p} " for o in objects) for p in prompts)
