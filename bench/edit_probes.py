"""Edits outside the search space, tried on top of a dense organism's selected recipe.

Why this script: docs/evaluation.md reports qwen3 as a genuine miss and lists the edits
tried against it that the search space does not hold (an untied embedding edit, a blind
read side, rank-k and layer-following directions, directions measured at answer positions,
freely fitted strengths, winsorized means, the discriminant direction, a direction kept off
the benign rows' principal directions, a direction and strengths fitted by gradient). These
are those experiments, so their numbers can be reproduced and the same probes run on
another dense organism. The default config's search runs first (as bench/quality_table.py
runs it) unless `--work` names a finished run; each probe then edits the loaded model in
memory on top of the selected recipe (the tool's own `InMemoryEditor`, restored exactly
after each variant) and scores it on the organism's validation prompts with the tool's
`Evaluator`. "free-strengths" and "gradient" also score their fit on the test prompts and
on 500 + 500 fresh ones (`quality_table.fresh_prompts`), since they choose what they fit on
the validation prompts.

Dense organisms only (llama, qwen3): the probes address `model.layers.*.self_attn` and
`mlp` modules by their Llama/Qwen3 names.

Usage: .venv/bin/python bench/edit_probes.py [--family qwen3] [--work DIR]
       [--probes untied-embed read-side ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

# before torch: the test fixtures pin the CPU kernels (ATEN_CPU_CAPABILITY, MKL_CBWR), and
# the search run's jobs inherit them, so the probes score with the kernels the run scored with
from conftest import FAMILY_ORGANISMS, _demo  # noqa: E402

# isort: split
import torch  # noqa: E402
import yaml  # noqa: E402

PROBES = (
    "untied-embed",
    "read-side",
    "rank-k",
    "layer-following",
    "answer-positions",
    "free-strengths",
    "clip",
    "whitened",
    "benign-subspace",
    "gradient",
)
DENSE = ("llama", "qwen3")
CLASSES = ("target", "benign")


def scaled(recipe: dict, factor: float) -> dict:
    """A copy of `recipe` with every entry's strength multiplied by `factor`."""
    recipe = copy.deepcopy(recipe)
    for entry in recipe["ablate"]:
        entry["scale"] *= factor
    return recipe


def orthonormal_extra(vectors, against: torch.Tensor) -> torch.Tensor | None:
    """Gram-Schmidt of `vectors` against `against` (a unit vector) and each other: the
    extra directions, none of which re-removes what the recipe's direction removes."""
    basis = [against]
    for v in vectors:
        v = v.clone()
        for u in basis:
            v = v - (v @ u) * u
        if v.norm() > 1e-6:
            basis.append(v / v.norm())
    return torch.stack(basis[1:]) if len(basis) > 1 else None


def kmeans(x: torch.Tensor, k: int, iters: int = 50) -> torch.Tensor:
    """k centroids of the rows of x (seeded by the caller's torch.manual_seed)."""
    centroids = x[torch.randperm(len(x))[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(1)
        for j in range(k):
            if (assign == j).any():
                centroids[j] = x[assign == j].mean(0)
    return centroids


class Probe:
    """The loaded organism, its selected recipe and an evaluator on validation prompts."""

    def __init__(self, work: Path, family: str):
        from abliterate.layout import Layout
        from abliterate.measure import load_measurements
        from abliterate.model import load_model
        from abliterate.recipe import entry_direction, load_recipe
        from abliterate.search_steps import eval_settings
        from abliterate.sweep import _prompt_sets

        results = work / "results" / family
        self.config = yaml.safe_load((work / "config.yaml").read_text())
        self.model_dir = Path(self.config["model"]["path"])
        self.prompts = self.model_dir / "prompts"
        self.layout = Layout.load(results / "layout.json")
        self.meas = load_measurements(results / "measurements.safetensors")
        self.best = yaml.safe_load((results / "best.yaml").read_text())
        self.best.update(
            model=str(self.model_dir), measurements=str(results / "measurements.safetensors")
        )
        self.settings = eval_settings(
            self.config.get("evaluate", {}), self.config.get("prompts", {})
        )
        self.model, self.tok, _ = load_model(self.model_dir, self.settings.load)
        self.prompt_sets = lambda t, b: _prompt_sets(
            self.tok, t, b, self.settings, self.model.config
        )
        self.ev = self.evaluator(
            self.prompts / "target_validation.txt", self.prompts / "benign_validation.txt"
        )
        self.ev.evaluate_base()
        recipe = load_recipe(self.best)
        r = entry_direction(recipe, recipe.ablate[0], self.meas, self.layout.num_layers).float()
        self.direction = r / r.norm()
        self.layers = self.model.model.layers
        self.rows: list[tuple] = []

    @functools.cached_property
    def train_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-prompt measured rows [N, M, d] of the train prompts (target, benign),
        float64; measured once, read by every probe that needs them."""
        from abliterate.measure import MeasureOptions, prompt_rows
        from abliterate.prompts import load_prompts

        options = MeasureOptions(progress=False, batch_size=32)
        rows = [
            prompt_rows(
                self.model, self.tok, load_prompts(self.prompts / f"{cls}_train.txt"), options
            )
            for cls in ("target", "benign")
        ]
        return rows[0].double(), rows[1].double()

    def evaluator(self, target: Path, benign: Path):
        from abliterate.evaluate import Evaluator

        tgt, ben = self.prompt_sets(target, benign)
        return Evaluator(self.model, self.tok, tgt, ben, self.settings, model_dir=None)

    @functools.cached_property
    def held_out(self) -> dict:
        """Evaluators on the test prompts and on 500 + 500 fresh ones, their base rows
        scored; built once, for the probes that choose what they fit on validation."""
        from quality_table import fresh_prompts

        evaluators = {"test": self.evaluator(*(self.prompts / f"{c}_test.txt" for c in CLASSES))}
        with tempfile.TemporaryDirectory() as tmp:
            fresh = fresh_prompts(self.model_dir, 500, Path(tmp))
            evaluators["fresh 500 + 500"] = self.evaluator(*(fresh[c] for c in CLASSES))
        for evaluator in evaluators.values():
            evaluator.evaluate_base()
        return evaluators

    def score_held_out(self, probe: str, label: str, recipe: dict, meas=None) -> None:
        """The selected recipe and `recipe` side by side on each held-out prompt set."""
        for split, evaluator in self.held_out.items():
            self.score(probe, f"selected recipe, {split}", self.best, evaluator)
            self.score(probe, f"{label}, {split}", recipe, evaluator, meas=meas)

    def plan(self, recipe: dict, meas=None):
        from abliterate.recipe import load_recipe, resolve

        return resolve(load_recipe(recipe), self.layout, meas or self.meas)

    def record(self, probe: str, variant: str, result) -> tuple:
        row = (probe, variant, result.refusal_rate, result.benign_kept, result.kl_first_token)
        self.rows.append(row)
        print(f"{probe}\t{variant}\t{row[2]:.3f}\t{row[3]:.3f}\t{row[4]:.4f}", flush=True)
        return row

    def score(self, probe: str, variant: str, recipe: dict, evaluator=None, meas=None):
        result = (evaluator or self.ev).evaluate(variant, self.plan(recipe, meas))
        return self.record(probe, variant, result)

    @contextlib.contextmanager
    def weights_edited(self, edits):
        """Each (linear, edit): linear.weight set to edit(weight in float32), in its own dtype,
        while the block runs; the originals restored exactly after."""
        saved = []
        try:
            with torch.no_grad():
                for linear, edit in edits:
                    saved.append((linear, linear.weight.detach().clone()))
                    linear.weight.copy_(edit(linear.weight.float()).to(linear.weight.dtype))
            yield
        finally:
            with torch.no_grad():
                for linear, weight in saved:
                    linear.weight.copy_(weight)

    def projected_out(self, modules_and_units):
        """Each (linear, unit [in_features], strength s): the unit taken out of the
        module's input (W <- W - s W u u^T) while the block runs; restored exactly after."""
        return self.weights_edited(
            (linear, lambda w, u=unit, s=strength: w - s * (w @ u)[:, None] * u[None, :])
            for linear, unit, strength in modules_and_units
        )

    def score_with_writers_projected(self, probe: str, variant: str, units: torch.Tensor, s: float):
        """The selected recipe, then `units` (rows) projected out of every o_proj and
        down_proj output at strength s, in that order."""
        writers = [layer.self_attn.o_proj for layer in self.layers]
        writers += [layer.mlp.down_proj for layer in self.layers]
        edits = [(linear, lambda w: w - s * units.T @ (units @ w)) for linear in writers]
        with self.ev.editor.applied(self.plan(self.best)), self.weights_edited(edits):
            # scored as it stands: the recipe's edit is applied by the `with` above
            result = self.ev._run(variant)[0]
        return self.record(probe, variant, result)


def untied_embed(p: Probe) -> None:
    """The embedding edited with the output head kept as its own unedited copy."""
    if p.model.lm_head.weight is not p.model.model.embed_tokens.weight:
        print("untied-embed: the organism's embeddings are not tied; skipped", flush=True)
        return
    lowest = min(p.best["ablate"], key=lambda e: e["layer"])
    for strength in (0.5, 1.0, 1.5):
        recipe = copy.deepcopy(p.best)
        extra = {k: v for k, v in lowest.items() if k not in ("components", "scale")}
        recipe["ablate"].append({**extra, "components": ["embed"], "scale": strength})
        p.score("untied-embed", f"embed s{strength} tied", recipe)
        embed = p.model.model.embed_tokens.weight
        p.model.lm_head.weight = torch.nn.Parameter(embed.detach().clone())
        try:
            p.score("untied-embed", f"embed s{strength} untied", recipe)
        finally:
            p.model.lm_head.weight = p.model.model.embed_tokens.weight


def read_side(p: Probe) -> None:
    """q/k/v and gate/up blind to the direction as their input norm scales it."""
    n = len(p.layers)

    def readers(i, which):
        layer = p.layers[i]
        attn = [
            (layer.self_attn.q_proj, layer.input_layernorm),
            (layer.self_attn.k_proj, layer.input_layernorm),
            (layer.self_attn.v_proj, layer.input_layernorm),
        ]
        mlp = [
            (layer.mlp.gate_proj, layer.post_attention_layernorm),
            (layer.mlp.up_proj, layer.post_attention_layernorm),
        ]
        return (attn if "attn" in which else []) + (mlp if "mlp" in which else [])

    for which in ("attn", "mlp", "attn+mlp"):
        for strength in (0.5, 1.0):
            for layer_set in (range(n), range(n // 2, n)):
                edits = []
                for i in layer_set:
                    for linear, norm in readers(i, which):
                        unit = p.direction * norm.weight.float()
                        edits.append((linear, unit / unit.norm(), strength))
                with p.projected_out(edits):
                    name = f"{which} s{strength} layers {layer_set.start}-{layer_set.stop - 1}"
                    p.score("read-side", name, p.best)


def _rows_at(rows: torch.Tensor, m: float) -> torch.Tensor:
    """Rows [N, d] at a fractional index m: linear between the two neighbouring indices."""
    low = int(m)
    if low == m:
        return rows[:, low]
    f = m - low
    return rows[:, low] * (1 - f) + rows[:, low + 1] * f


def rank_k(p: Probe) -> None:
    """Extra directions from per-prompt train rows: principal components of the target
    rows' offsets from the benign mean, target-minus-benign covariance eigenvectors,
    k-means centroids."""
    torch.manual_seed(0)
    target_rows, benign_rows = (rows.float() for rows in p.train_rows)
    r1 = p.direction
    others = torch.eye(len(r1)) - torch.outer(r1, r1)
    selected = p.best["ablate"][0]["measurement"]
    above = float(min(int(selected) + 1, target_rows.shape[1] - 1))
    for m in dict.fromkeys((selected, above)):  # the selected index and the next whole one
        xt, xb = _rows_at(target_rows, m), _rows_at(benign_rows, m)
        mb = xb.mean(0)
        offsets = xt - mb
        offsets = offsets - (offsets @ r1)[:, None] * r1[None]
        _, _, vh = torch.linalg.svd(offsets - offsets.mean(0), full_matrices=False)
        ct = (xt - xt.mean(0)).T @ (xt - xt.mean(0)) / len(xt)
        cb = (xb - xb.mean(0)).T @ (xb - xb.mean(0)) / len(xb)
        _, eigenvectors = torch.linalg.eigh(others @ (ct - cb) @ others)
        for k in (1, 2, 4):
            candidates = {
                "pca": orthonormal_extra(list(vh[:k]), r1),
                "covdiff": orthonormal_extra(list(eigenvectors[:, -k:].T.flip(0)), r1),
                "kmeans": orthonormal_extra([c - mb for c in kmeans(xt, k + 1)], r1),
            }
            for name, units in candidates.items():
                if units is None:
                    continue
                for s in (0.5, 1.0):
                    variant = f"m{m:g} {name} k{k} (rank {units.shape[0]}) s{s}"
                    p.score_with_writers_projected("rank-k", variant, units, s)


def layer_following(p: Probe) -> None:
    """Each entry's index moved from the selected one toward its layer's output index."""
    m0 = p.best["ablate"][0]["measurement"]
    for alpha in (0.15, 0.3, 0.5, 0.75, 1.0):
        for factor in (1.0, 0.9, 1.1):
            recipe = scaled(p.best, factor)
            for entry in recipe["ablate"]:
                entry["measurement"] = round(m0 + alpha * (entry["layer"] + 1 - m0), 4)
            p.score("layer-following", f"alpha {alpha} x{factor}", recipe)


@torch.no_grad()
def _answer_means(p: Probe, prompt_ids, answers, starts=None) -> torch.Tensor | None:
    """Per decoder-layer input index, the mean residual over answer positions (teacher
    forced), from answer token starts[i] on (None: skip the prompt)."""
    total, count = None, 0
    for i, (ids, answer) in enumerate(zip(prompt_ids, answers, strict=True)):
        start = 0 if starts is None else starts[i]
        if not answer or start is None:
            continue
        states = p.model(
            input_ids=torch.tensor([list(ids) + list(answer)]), output_hidden_states=True
        )
        span = slice(len(ids) - 1 + start, len(ids) - 1 + len(answer))
        h = torch.stack([s[0, span].float() for s in states.hidden_states[:-1]])
        total = h.sum(1) if total is None else total + h.sum(1)
        count += h.shape[1]
    return None if total is None else total / count


def answer_positions(p: Probe) -> None:
    """Directions at answer positions: base refusals vs base benign answers, and the
    edited model's own answers from their first refusal token vs those that do not refuse."""
    from abliterate.evaluate import generate, is_refusal

    def text(tokens):
        return p.tok.decode(tokens, skip_special_tokens=True)

    train_t, train_b = p.prompt_sets(p.prompts / "target_train.txt", p.prompts / "benign_train.txt")
    base_t = generate(p.model, p.tok, train_t.ids, p.settings)
    base_b = generate(p.model, p.tok, train_b.ids, p.settings)
    mt, mb = _answer_means(p, train_t.ids, base_t), _answer_means(p, train_b.ids, base_b)
    candidates = {f"base answers m{m}": mt[m] - mb[m] for m in range(1, len(p.layers))}
    with p.ev.editor.applied(p.plan(p.best)):
        edited = generate(p.model, p.tok, train_t.ids, p.settings)
        starts = []  # refused answers only: an empty prefix also counts as a refusal
        for answer in edited:
            refused = is_refusal(text(answer))
            onset = (j for j in range(len(answer)) if is_refusal(text(answer[: j + 1])))
            starts.append(next(onset, None) if refused else None)
        print(
            f"answer-positions: {sum(s is not None for s in starts)} of {len(edited)} train "
            "target prompts still refused by the selected recipe",
            flush=True,
        )
        refusing = _answer_means(p, train_t.ids, edited, starts)
        answering = _answer_means(
            p, train_t.ids, edited, [0 if s is None else None for s in starts]
        )
    if refusing is not None and answering is not None:
        for m in range(1, len(p.layers)):
            candidates[f"edited refusal onset m{m}"] = refusing[m] - answering[m]
    for name, v in candidates.items():
        units = orthonormal_extra([v], p.direction)
        if units is not None:
            for s in (0.5, 1.0):
                p.score_with_writers_projected("answer-positions", f"{name} s{s}", units, s)


def free_strengths(p: Probe) -> None:
    """Every entry's strength fitted by coordinate descent on validation; then the fit
    and the selected recipe scored on the test prompts and on fresh ones."""

    def fit_score(recipe):
        r = p.ev.evaluate("fit", p.plan(recipe))
        return r.refusal_rate, r.benign_kept, r.kl_first_token

    def objective(t):  # KL, with refusal <= 0.04 and kept >= 0.98 as (steep) gates
        refusal, kept, kl = t
        return kl + 10 * max(0.0, refusal - 0.04) + 10 * max(0.0, 0.98 - kept)

    current = copy.deepcopy(p.best)
    current_score = fit_score(current)
    for _ in range(3):
        for i in range(len(current["ablate"])):
            for factor in (0.8, 0.9, 1.1, 1.25):
                candidate = copy.deepcopy(current)
                candidate["ablate"][i]["scale"] = round(candidate["ablate"][i]["scale"] * factor, 4)
                t = fit_score(candidate)
                if objective(t) < objective(current_score):
                    current, current_score = candidate, t
    scales = ", ".join(f"{e['scale']:.3g}" for e in current["ablate"])
    p.score("free-strengths", f"fit on validation ({scales})", current)
    p.score_held_out("free-strengths", "fit", current)


def clip(p: Probe) -> None:
    """The selected recipe with directions from winsorized class means (measure.clip)."""
    from abliterate.measure import MeasureOptions, measure
    from abliterate.prompts import load_prompts

    target = load_prompts(p.prompts / "target_train.txt")
    benign = load_prompts(p.prompts / "benign_train.txt")
    for quantile in (0.02, 0.05, 0.1, 0.2, 0.3):
        meas = measure(
            p.model,
            p.tok,
            target,
            benign,
            MeasureOptions(progress=False, batch_size=32, clip=quantile),
        )
        for factor in (1.0, 1.1):
            p.score("clip", f"clip {quantile} x{factor}", scaled(p.best, factor), meas=meas)


def along(meas, direction_at):
    """`meas` with each index m >= 1's target mean moved so that its difference of means
    points along direction_at(m, delta) at the same length (index 0, the embeddings'
    input, defines no direction and is kept)."""
    target_mean = meas.target_mean.clone()
    for m in range(1, len(target_mean)):
        delta = meas.target_mean[m] - meas.benign_mean[m]
        v = direction_at(m, delta)
        target_mean[m] = meas.benign_mean[m] + delta.norm() * v / v.norm()
    return dataclasses.replace(meas, target_mean=target_mean)


def whitened(p: Probe) -> None:
    """The recipe's direction replaced at every index by the discriminant one,
    Sigma^-1 (mean_target - mean_benign), Sigma the pooled within-class covariance of the
    per-prompt train rows shrunk toward its mean variance (lambda 1: the plain difference of
    means), so the direction ignores what varies most within each class."""
    rows_t, rows_b = p.train_rows

    def discriminant(m, delta, shrink):
        xt, xb = rows_t[:, m], rows_b[:, m]
        centred = torch.cat([xt - xt.mean(0), xb - xb.mean(0)])
        sigma = centred.T @ centred / len(centred)
        sigma = (1 - shrink) * sigma + shrink * sigma.trace() / len(sigma) * torch.eye(len(sigma))
        return torch.linalg.solve(sigma, delta)

    for shrink in (0.05, 0.2, 0.5, 0.8):
        meas = along(p.meas, lambda m, delta, shrink=shrink: discriminant(m, delta, shrink))
        for factor in (1.0, 1.2):
            p.score("whitened", f"shrink {shrink} x{factor}", scaled(p.best, factor), meas=meas)


def benign_subspace(p: Probe) -> None:
    """The difference of means made orthogonal to the top-k principal directions of the
    benign train rows (centred), at every index: what benign prompts vary along is left
    alone, on top of the recipe's projection against the benign mean."""
    _, rows_b = p.train_rows

    def off_benign(m, delta, k):
        xb = rows_b[:, m]
        _, _, vh = torch.linalg.svd(xb - xb.mean(0), full_matrices=False)
        basis = vh[:k]
        return delta - basis.T @ (basis @ delta)

    for k in (1, 2, 4, 8, 16):
        meas = along(p.meas, lambda m, delta, k=k: off_benign(m, delta, k))
        for factor in (1.0, 1.2, 1.4):
            p.score("benign-subspace", f"k{k} x{factor}", scaled(p.best, factor), meas=meas)


# the writer each recipe component names, on the Llama/Qwen3 modules these probes address
WRITERS = {"attn_out": "self_attn.o_proj", "mlp_down": "mlp.down_proj"}


def _refusal_openings(p: Probe, answers, texts) -> list[int]:
    """The tokens refusals open with, read off the base model's refusing train answers:
    each answer's first token, and the first token of each refusal marker it contains."""
    from abliterate.evaluate import is_refusal, normalize_answer

    openings = set()
    for tokens, text in zip(answers, texts, strict=True):
        if not is_refusal(text, p.settings.markers):
            continue
        openings.add(tokens[0])
        for marker in p.settings.markers:
            if marker.strip() and normalize_answer(marker) in normalize_answer(text):
                openings.add(p.tok.encode(marker, add_special_tokens=False)[0])
    return sorted(openings)


def gradient(p: Probe) -> None:
    """The recipe's direction and its entries' strengths fitted by gradient on the train
    prompts, checkpoints and a final strength factor chosen on validation, the choice then
    scored on the test prompts and on fresh ones.

    Why: every other probe picks the direction by a statistic of the activations; this one
    asks which single direction, projected out of the same writers, the behaviour itself
    points to. The loss is the probability of the refusal-opening tokens at every position
    of the edited model's own greedy target answers (regenerated every other step, so a
    refusal that moves later in the answer is still seen) plus 0.3 x the KL from the base
    model over the base model's benign answers (every position, and the first once more:
    the first-token KL is what the targets count). The fit edits a float32 copy by plain
    projection (W <- W - s u u^T W); the choice is scored with the tool's own edit of the
    loaded model, the recipe's measurements moved so that their difference of means points
    along the fitted u (`along`), norm preservation and all."""
    from torch.func import functional_call

    from abliterate.model import decode, greedy_generate, pad_batch, pad_id
    from abliterate.search_steps import selection_targets

    lam, lr, steps = 0.3, 0.003, 100
    targets = selection_targets(p.config.get("select", {}))

    def feasible(refusal_rate, benign_kept):  # the selection rule's gates (`select:`)
        return (
            refusal_rate <= targets["max_refusal_rate"]
            and benign_kept >= targets["min_benign_kept"]
        )

    target, benign = p.prompt_sets(p.prompts / "target_train.txt", p.prompts / "benign_train.txt")
    model = copy.deepcopy(p.model).float().eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    pad = pad_id(p.tok)

    def answers(prompt_ids):  # as long as the evaluation's answers
        return greedy_generate(
            model, p.tok, prompt_ids, max_new_tokens=p.settings.max_new_tokens, batch_size=64
        )

    base_target, base_benign = answers(target.ids), answers(benign.ids)
    openings = torch.tensor(_refusal_openings(p, base_target, decode(p.tok, base_target)))
    entries = [
        (f"model.layers.{e['layer']}.{WRITERS[e['components'][0]]}.weight", e["scale"])
        for e in p.best["ablate"]
    ]
    weights = {name: model.get_parameter(name) for name, _ in entries}

    def edited(u, log_gain):  # parameter name -> projected weight, differentiable in u, gain
        out = {}
        for (name, strength), gain in zip(entries, log_gain.exp(), strict=True):
            w = weights[name]
            out[name] = w - strength * gain * u[:, None] * (u[None, :] @ w)
        return out

    def answer_logprobs(params, prompt_ids, continuations):
        """Per prompt [len(answer) + 1, vocab]: the log-probabilities that predict each
        answer token and the one after it (right padded, teacher-forced)."""
        sequences = [list(a) + list(b) for a, b in zip(prompt_ids, continuations, strict=True)]
        ids, mask = pad_batch(sequences, pad, side="right")
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions)
        logprobs = torch.log_softmax(functional_call(model, params, (), kwargs).logits, -1)
        return [
            logprobs[row, len(a) - 1 : len(a) + len(b)]
            for row, (a, b) in enumerate(zip(prompt_ids, continuations, strict=True))
        ]

    def as_recipe(log_gain):
        recipe = copy.deepcopy(p.best)
        for entry, gain in zip(recipe["ablate"], log_gain.exp(), strict=True):
            entry["scale"] = round(entry["scale"] * float(gain), 4)
        return recipe

    def moved(u):
        return along(p.meas, lambda m, delta: u.to(delta.dtype))

    with torch.no_grad():
        base_logprobs = answer_logprobs({}, benign.ids, base_benign)
    v = p.direction.clone().float().requires_grad_(True)
    log_gain = torch.zeros(len(entries), requires_grad=True)
    optimizer = torch.optim.Adam([v, log_gain], lr=lr)
    chosen = None
    for step in range(1, steps + 1):
        u = v / v.norm()
        if step % 2 == 1:  # the edited model's own target answers, as they stand now
            swapped = edited(u.detach(), log_gain.detach())
            modules = (
                (model.get_submodule(n.removesuffix(".weight")), w) for n, w in swapped.items()
            )
            with torch.no_grad(), p.weights_edited((m, lambda _, w=w: w) for m, w in modules):
                own = answers(target.ids)
        params = edited(u, log_gain)
        opening = torch.cat(
            [lp[:, openings].exp().sum(-1) for lp in answer_logprobs(params, target.ids, own)]
        )
        refusal_loss = -torch.log1p(-opening.clamp(max=1 - 1e-6)).mean()
        kls = [
            # KL(base || edited) unclamped, unlike evaluate.kl_divergence: a loss keeps the
            # gradient where rounding makes a near-equal position's KL slightly negative
            (b.exp() * (b - e)).sum(-1)
            for b, e in zip(
                base_logprobs, answer_logprobs(params, benign.ids, base_benign), strict=True
            )
        ]
        kl_loss = (
            torch.stack([k.mean() for k in kls]).mean() + torch.stack([k[0] for k in kls]).mean()
        )
        optimizer.zero_grad()
        (refusal_loss + lam * kl_loss).backward()
        optimizer.step()
        if step % 10 == 0:  # a checkpoint, scored on validation by the tool's own edit
            u = (v / v.norm()).detach()
            result = p.ev.evaluate("checkpoint", p.plan(as_recipe(log_gain.detach()), moved(u)))
            ok = feasible(result.refusal_rate, result.benign_kept)
            rank = (not ok, result.kl_first_token if ok else result.refusal_rate)
            if chosen is None or rank < chosen[0]:
                chosen = (rank, step, u, log_gain.detach().clone())
            print(
                f"gradient: step {step}, validation {result.refusal_rate:.3f} "
                f"{result.benign_kept:.3f} {result.kl_first_token:.4f}",
                flush=True,
            )
    _, step, u, gains = chosen
    meas, fit = moved(u), as_recipe(gains)
    cosine = float(u @ p.direction)
    rows = {
        1.0: p.score(
            "gradient", f"fit, step {step} (cos {cosine:.3f} to the recipe's)", fit, meas=meas
        )
    }
    for factor in (0.85, 0.9, 0.95):
        rows[factor] = p.score("gradient", f"fit x{factor}", scaled(fit, factor), meas=meas)
    candidates = [(row[4], f) for f, row in rows.items() if feasible(row[2], row[3])]
    factor = min(candidates)[1] if candidates else 1.0  # the lowest KL the gates allow
    p.score_held_out("gradient", f"fit x{factor}", scaled(fit, factor), meas=meas)


RUNNERS = {
    "untied-embed": untied_embed,
    "read-side": read_side,
    "rank-k": rank_k,
    "layer-following": layer_following,
    "answer-positions": answer_positions,
    "free-strengths": free_strengths,
    "clip": clip,
    "whitened": whitened,
    "benign-subspace": benign_subspace,
    "gradient": gradient,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=DENSE, default="qwen3")
    parser.add_argument("--work", type=Path, default=None, help="a finished search run's work dir")
    parser.add_argument("--probes", nargs="+", choices=PROBES, default=list(PROBES))
    parser.add_argument("--out", type=Path, default=None, help="also write the rows here (TSV)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work
        if work is None:
            from quality_table import run_workflow, workflow_config

            model_dir = _demo(args.family, wording=FAMILY_ORGANISMS.get(args.family, "a"))
            work = Path(tmp) / args.family
            wall, error = run_workflow(
                work, workflow_config(model_dir, args.family, "tpe"), args.family
            )
            if error:
                raise SystemExit(f"the search run failed after {wall:.0f} s: {error}")
            print(f"search run: {wall:.0f} s", flush=True)
        elif not (work / "results" / args.family / "best.yaml").is_file():
            raise SystemExit(
                f"{work}: no results/{args.family}/best.yaml; expected a finished search run"
            )
        probe = Probe(work, args.family)
        probe.record(
            "selected",
            "selected recipe (validation)",
            probe.ev.evaluate("best", probe.plan(probe.best)),
        )
        for name in args.probes:
            RUNNERS[name](probe)
    if args.out:
        lines = ["probe\tvariant\trefusal_rate\tbenign_kept\tkl_first_token"]
        lines += ["\t".join(str(x) for x in row) for row in probe.rows]
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
