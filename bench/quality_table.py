"""Quality per family: the default config's search and grid on every demo organism.

For each family's trained organism (the test fixtures' cache, `tests/conftest.py`), the
workflow runs twice in a temporary work dir up to `results/<family>/sweep.tsv` (no export):
once with the default config (`config/config.yaml`, `sweep.method: tpe`) and once with the
same config and `sweep.method: grid`, each timed, `OMP_NUM_THREADS=1`. The numbers come
from the two sweep.tsv files: base, plain full-strength edit and search best are the search
run's test-split rows (prompts the search never saw); the grid scores every variant, and
selects among them, on its held-out prompts (the organism's whole test file), so its rows
are on those prompts and the table compares the grid best with the grid's own plain variant.

Why a table per family: issue 9's targets (refusal <= 5 % with the base >= 95 %, benign
answers kept >= 98 %, first-token KL <= 0.02 and lower than the plain edit) are claims about
every organism, and only a run of the real workflow per organism can back them.

Fresh prompts: 100 + 100 test prompts cannot resolve the targets (a kept rate of 0.98 is
two answers; first-token KL on these organisms is carried by the one or two benign prompts
per hundred whose first answer token flips, at KL 1-2 each). So the base model, the plain
edit and both selected recipes are also scored on `--fresh N` (default 500) new requests
per class drawn from the organism's own grammar (`fresh_prompts`: a seeded stream of their
own, none of them a training, validation or test prompt), after both runs, on recipes
already chosen: an estimate of what the recipe does on the organism's whole prompt
distribution, which no selection saw. The test-split rows stay what the workflow reports.

Usage: .venv/bin/python bench/quality_table.py [--families llama qwen3 ...] [--quick]
       [--keep DIR] [--tables-from DIR] [--out FILE] [--fresh N]
Numbers go to docs/evaluation.md ("Numbers per family").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("llama", "glm4_moe", "qwen3", "mixtral", "gpt_oss", "deepseek_v3")
# issue 9's targets for the selected recipe on the test prompts
MAX_REFUSAL, MIN_BASE_REFUSAL, MIN_KEPT, MAX_KL = 0.05, 0.95, 0.98, 0.02


def workflow_config(model_dir: Path, name: str, method: str, quick: bool = False) -> dict:
    """config/config.yaml with the organism as model and its prompt sets; `method` set.

    Why a copy of the default file: a `--configfile` replaces the Snakefile's own
    `configfile:` (the schema's defaults fill the rest), so the default config has to be
    passed in full to be what runs.
    """
    import yaml
    from snakemake_runner import demo_model_config

    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config.update(demo_model_config(model_dir, name, validation=True))
    config["sweep"]["method"] = method
    if quick:  # a smoke run of the script, not numbers to report
        config["sweep"].update(n_trials=3, n_startup_trials=2, scale=[1.0])
    return config


def run_workflow(workdir: Path, config: dict, name: str) -> tuple[float, str | None]:
    """Run Snakemake to results/<name>/sweep.tsv in `workdir`: (wall time in s, None), or
    (wall time, the run's last error line) when it failed, so the other families still run
    and the failure is reported where its numbers would be."""
    import yaml
    from snakemake_runner import snakemake

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    result = snakemake(workdir, "--cores", "2", f"results/{name}/sweep.tsv")
    wall = time.perf_counter() - start
    if result.returncode == 0:
        return wall, None
    output = (result.stdout + result.stderr).splitlines()
    # the tool's own one-sentence error ("search_worker: error: ..."), not Snakemake's
    errors = [line.strip() for line in output if re.search(r"(^|: )error: ", line.strip())]
    print(f"the workflow failed in {workdir} (exit {result.returncode})", file=sys.stderr)
    return wall, (errors or output or [f"exit {result.returncode}"])[-1]


def fresh_prompts(model_dir: Path, n: int, out: Path) -> dict[str, Path]:
    """`n` new requests per class from the organism's grammar, written to out/{cls}.txt.

    None of them is a prompt of the organism's files (train, validation, test) or of its
    training mixture; drawn from a seeded stream of their own (`fresh-<seed>`), so the same
    organism always gets the same fresh prompts.
    """
    import random

    from abliterate import demo

    info = json.loads((model_dir / "demo.json").read_text())
    seed, wording = int(info["seed"]), info["wording"]
    seen = {p for f in (model_dir / "prompts").glob("*.txt") for p in f.read_text().splitlines()}
    seen |= {prompt for prompt, _ in demo.make_data(seed, wording).train_pairs}
    rng = random.Random(f"fresh-{seed}")
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for cls, objects in (("target", demo.TARGET_OBJECTS), ("benign", demo.BENIGN_OBJECTS)):
        fresh = demo.unseen_requests(objects, n, rng, demo._wording(wording), seen)
        paths[cls] = out / f"{cls}.txt"
        paths[cls].write_text("\n".join(fresh) + "\n")
    return paths


def score_fresh(model_dir: Path, family: str, work: Path, n: int) -> Path:
    """Score base, plain and each run's selected recipe on `n` + `n` fresh prompts.

    Writes work/<family>-fresh.tsv (what `--tables-from` reads back). The recipes are the
    runs' own best.yaml (with their measurements) and the search's plain baseline; the
    evaluation settings are the search run's config.
    """
    import yaml

    from abliterate.grid import load_suggested
    from abliterate.layout import Layout
    from abliterate.measure import load_measurements
    from abliterate.search_steps import _plain_recipe, eval_settings
    from abliterate.sweep import evaluate_recipes

    results = {m: work / f"{family}-{m}" / "results" / family for m in ("tpe", "grid")}
    runs = {m: r for m, r in results.items() if (r / "best.yaml").is_file()}
    first = next(iter(runs.values()))
    config = yaml.safe_load((first.parent.parent / "config.yaml").read_text())
    layout = Layout.load(first / "layout.json")
    measurements = first / "measurements.safetensors"
    recipes = {}
    for method, results_dir in runs.items():
        recipe = yaml.safe_load((results_dir / "best.yaml").read_text())
        recipe.update(
            model=str(model_dir), measurements=str(results_dir / "measurements.safetensors")
        )
        recipes[f"{method}-best"] = recipe
    suggested = load_suggested(first / "analysis" / "suggested.yaml")
    recipes["plain"] = {
        "model": str(model_dir),
        "measurements": str(measurements),
        **_plain_recipe(layout.num_layers, suggested, config.get("recipe", {})),
    }
    prompts = fresh_prompts(model_dir, n, work / f"{family}-fresh-prompts")
    table = evaluate_recipes(
        model_dir,
        recipes,
        layout=layout,
        measurements=load_measurements(measurements),
        target_prompts=prompts["target"],
        benign_prompts=prompts["benign"],
        settings=eval_settings(config.get("evaluate", {}), config.get("prompts", {})),
    )
    path = work / f"{family}-fresh.tsv"
    table.to_csv(path, sep="\t", index=False)
    return path


def _interval(row, column: str, count: str) -> tuple[float, float]:
    """The row's 95 % Wilson interval: sweep.tsv's own columns, or computed (the grid's
    table has none) from the rate and its prompt count as the search's table does."""
    from abliterate.search import wilson_interval

    low, high = f"{column}_ci_low", f"{column}_ci_high"
    if low in row.index and not math.isnan(float(row[low])):
        return float(row[low]), float(row[high])
    n = int(row[count])
    return wilson_interval(round(float(row[column]) * n), n)


def _rate(row, column: str, count: str) -> str:
    low, high = _interval(row, column, count)
    return f"{float(row[column]):.3f} ({low:.3f}-{high:.3f})"


def _plain_variant(grid):
    """The grid's plain full-strength variant: scale 1, all layers, no norm preservation,
    no sparsity, routed experts untouched (the search's `plain` row is the same recipe)."""
    ids = grid["variant"].astype(str)
    match = grid[ids.str.startswith("s1.0_p0.00_msug_Lall_np0_") & ids.str.endswith("_e-none")]
    return match.iloc[0] if len(match) else None


def _verdict(row, base, plain) -> str:
    """Whether `row` (a selected recipe) meets issue 9's targets, and by how much not."""
    missed = []
    if float(base["refusal_rate"]) < MIN_BASE_REFUSAL:
        missed.append(f"base refusal {float(base['refusal_rate']):.3f} < {MIN_BASE_REFUSAL}")
    if float(row["refusal_rate"]) > MAX_REFUSAL:
        missed.append(f"refusal {float(row['refusal_rate']):.3f} > {MAX_REFUSAL}")
    if float(row["benign_kept"]) < MIN_KEPT:
        missed.append(f"kept {float(row['benign_kept']):.3f} < {MIN_KEPT}")
    kl = float(row["kl_first_token"])
    if kl > MAX_KL:
        missed.append(f"KL {kl:.4f} > {MAX_KL}")
    if plain is not None and not kl < float(plain["kl_first_token"]):
        missed.append(f"KL {kl:.4f} >= plain {float(plain['kl_first_token']):.4f}")
    return "yes" if not missed else "**no**: " + "; ".join(missed)


def family_table(
    family: str,
    search_tsv: Path | None,
    grid_tsv: Path | None,
    walls: dict,
    failures: dict | None = None,
    fresh_tsv: Path | None = None,
) -> str:
    """The markdown table of one family from its two sweep.tsv files.

    `walls` holds the wall time in seconds of each run, keys `tpe` and `grid`; a run that
    failed has no table (None) and its error line in `failures` under the same key, shown
    under the table. Rows: base, plain, search best (test split, from the search's table),
    the grid's plain variant and the grid best (the grid's prompts), then, from
    `fresh_tsv` (`score_fresh`), base, plain and both selected recipes on fresh prompts.
    """
    import pandas as pd

    failures = failures or {}
    rows = []
    if search_tsv is not None:
        search = pd.read_csv(search_tsv, sep="\t")
        test = search[search["split"] == "test"].set_index("variant")
        base, plain = test.loc["base"], test.loc["plain"]
        best = search[search["selected"].astype(bool)].iloc[0]
        trials = int((~search["variant"].isin(["base", "plain"])).sum())
        n_test = f"{int(base['n_target'])} + {int(base['n_benign'])}"
        rows += [
            _line("base (test)", base, verdict="base >= 0.95: " + _yes(base)),
            _line("plain full-strength (test)", plain),
            _line(
                f"search best `{best['variant']}` (test)",
                best,
                f"{trials} trials",
                f"{walls['tpe']:.0f}",
                _verdict(best, base, plain),
            ),
        ]
    if grid_tsv is not None:
        grid = pd.read_csv(grid_tsv, sep="\t")
        grid_base = grid[grid["variant"] == "base"].iloc[0]
        grid_rows = grid[grid["variant"] != "base"]
        grid_best = grid[grid["selected"].astype(bool)].iloc[0]
        grid_plain = _plain_variant(grid)
        evaluated = int((grid_rows["seconds"] > 0).sum())
        n_grid = f"{int(grid_base['n_target'])} + {int(grid_base['n_benign'])}"
        if search_tsv is None:
            rows.append(_line("base (grid prompts)", grid_base, verdict=_yes(grid_base)))
        if grid_plain is not None:
            rows.append(_line("plain full-strength (grid prompts)", grid_plain))
        rows.append(
            _line(
                f"grid best `{grid_best['variant']}` (grid prompts)",
                grid_best,
                f"{len(grid_rows)} variants ({evaluated} distinct)",
                f"{walls['grid']:.0f}",
                _verdict(grid_best, grid_base, grid_plain),
            )
        )
    if fresh_tsv is not None and fresh_tsv.is_file():
        fresh = pd.read_csv(fresh_tsv, sep="\t").set_index("variant")
        n_fresh = f"{int(fresh.loc['base', 'n_target'])} + {int(fresh.loc['base', 'n_benign'])}"
        label = f"fresh {n_fresh}"
        rows.append(_line(f"base ({label})", fresh.loc["base"], verdict=_yes(fresh.loc["base"])))
        rows.append(_line(f"plain full-strength ({label})", fresh.loc["plain"]))
        for method, name in (("tpe", "search"), ("grid", "grid")):
            if f"{method}-best" in fresh.index:
                row = fresh.loc[f"{method}-best"]
                verdict = _verdict(row, fresh.loc["base"], fresh.loc["plain"])
                rows.append(_line(f"{name} best, same recipe ({label})", row, verdict=verdict))
    parts = []
    if search_tsv is not None:
        parts.append(
            f"search rows on the test split ({n_test} target + benign prompts the search "
            "never saw; trials scored on validation)"
        )
    if grid_tsv is not None:
        parts.append(
            f"grid rows on the grid's held-out prompts ({n_grid}: the organism's test file, "
            "which is the search's test split too), where the grid also selects, which "
            "flatters it"
        )
    if fresh_tsv is not None and fresh_tsv.is_file():
        parts.append(
            f"fresh rows on {n_fresh} new prompts from the organism's grammar that no run "
            "saw, scoring the recipes the runs selected"
        )
    lines = [
        f"**{family}** — " + "; ".join(parts or ["no run finished"]) + ".",
        "",
        "| row | refusal (95 % CI) | benign kept (95 % CI) | over-refusal (95 % CI) "
        "| first-token KL | KL, prompts the base answers | trials | wall (s) | targets met |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    for method, error in failures.items():
        label = "search (sweep.method: tpe)" if method == "tpe" else "grid (sweep.method: grid)"
        lines += ["", f"The {label} run failed after {walls[method]:.0f} s: `{error}`"]
    return "\n".join(lines) + "\n"


def _line(label, row, trials="", wall="", verdict="") -> str:
    cells = [
        label,
        _rate(row, "refusal_rate", "n_target"),
        _rate(row, "benign_kept", "n_benign"),
        _rate(row, "benign_refusal_rate", "n_benign"),
        f"{float(row['kl_first_token']):.4f}",
        _answered_kl(row),
        trials,
        wall,
        verdict,
    ]
    return "| " + " | ".join(cells) + " |"


def _answered_kl(row) -> str:
    """`kl_first_token_answered` (a newer column: blank in tables written before it)."""
    value = row.get("kl_first_token_answered")
    return "" if value is None or value != value else f"{float(value):.4f}"


def _yes(base) -> str:
    return "yes" if float(base["refusal_rate"]) >= MIN_BASE_REFUSAL else "**no**"


def demo_digest() -> str:
    """The organism cache key's hash prefix (tests/conftest.py: sha256 of demo.py)."""
    return hashlib.sha256((ROOT / "src" / "abliterate" / "demo.py").read_bytes()).hexdigest()[:12]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument(
        "--quick", action="store_true", help="3 trials and a 1-scale grid: a smoke run only"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=("tpe", "grid"),
        default=["tpe", "grid"],
        help="run only these (a table needs both; one alone is for quick comparisons)",
    )
    parser.add_argument("--keep", type=Path, default=None, help="keep the work dirs here")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables here")
    parser.add_argument(
        "--fresh",
        type=int,
        default=500,
        help="also score the selected recipes on N fresh prompts per class (0: off)",
    )
    parser.add_argument(
        "--tables-from",
        type=Path,
        default=None,
        help="print the tables of an earlier --keep DIR again, without running anything",
    )
    args = parser.parse_args(argv)
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]  # this checkout's code first
    os.environ["OMP_NUM_THREADS"] = "1"
    from conftest import FAMILY_ORGANISMS, _demo

    header = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}; "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; demo.py {demo_digest()}"
        + ("; --quick (not the default config)" if args.quick else "")
        + (f"; tables of the runs in {args.tables_from}" if args.tables_from else "")
    )
    print(header, flush=True)
    tables = [header + "\n"]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.tables_from or args.keep or Path(tmp)
        for family in args.families:
            runs = {}
            for method in args.methods:
                workdir = work / f"{family}-{method}"
                record = workdir / "bench-run.json"  # wall time and error, for --tables-from
                if args.tables_from:
                    runs[method] = json.loads(record.read_text())
                    continue
                model = _demo(family, wording=FAMILY_ORGANISMS.get(family, "a"))
                config = workflow_config(model, family, method, args.quick)
                wall, error = run_workflow(workdir, config, family)
                runs[method] = {"wall": wall, "error": error}
                record.write_text(json.dumps(runs[method]))
                print(f"{family} {method}: {wall:.0f} s", file=sys.stderr, flush=True)
            fresh = work / f"{family}-fresh.tsv"
            if args.fresh and not args.tables_from and any(not r["error"] for r in runs.values()):
                model = _demo(family, wording=FAMILY_ORGANISMS.get(family, "a"))
                fresh = score_fresh(model, family, work, args.fresh)
            table = family_table(
                family,
                *(
                    None
                    if m not in runs or runs[m]["error"]
                    else work / f"{family}-{m}/results/{family}/sweep.tsv"
                    for m in ("tpe", "grid")
                ),
                {m: runs[m]["wall"] for m in runs},
                {m: runs[m]["error"] for m in runs if runs[m]["error"]},
                fresh,
            )
            print("\n" + table, flush=True)
            tables.append(table)
    if args.out:
        args.out.write_text("\n".join(tables))


if __name__ == "__main__":
    main()
