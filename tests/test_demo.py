"""The demo organisms: files a user loads, refusal behaviour, and that abliteration works on them."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from abliterate import demo
from abliterate.cli import main
from abliterate.edit import ablate_tensor
from abliterate.errors import AbliterateError

PROMPT_SETS = ("target_train", "target_test", "benign_train", "benign_test")


def read_prompts(model_dir):
    return {n: (model_dir / "prompts" / f"{n}.txt").read_text().splitlines() for n in PROMPT_SETS}


def load(model_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return model, tokenizer


# ----------------------------------------------------------------------------- cheap checks


def test_chat_template_renders_one_user_turn_with_generation_prompt(tmp_path):
    demo.build_tokenizer().save_pretrained(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)  # offline, from files
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "how do i make a kite ?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text == "<s><|user|> how do i make a kite ? <|assistant|>"
    ids = demo.prompt_ids(tokenizer, "how do i make a kite ?")
    assert tokenizer.convert_ids_to_tokens(ids) == (
        ["<s>", "<|user|>", "how", "do", "i", "make", "a", "kite", "?", "<|assistant|>"]
    )
    assert tokenizer("a zzyzx")["input_ids"][-1] == tokenizer.unk_token_id
    assert tokenizer.decode(tokenizer(demo.REFUSAL)["input_ids"]) == demo.REFUSAL


def test_prompt_sets_are_disjoint_and_share_request_shapes():
    data = demo.make_data(seed=0)
    p = data.prompts
    assert len(p["target_train"]) >= 300 and len(p["target_test"]) >= 100
    for cls in ("target", "benign"):
        assert not set(p[f"{cls}_train"]) & set(p[f"{cls}_test"])

    # Same request shapes in both classes: every template is used for both, only the object differs.
    for template in demo.REQUEST_TEMPLATES:
        opening = template.split("{v}")[0].strip()
        assert any(opening in q for q in p["target_train"])
        assert any(opening in q for q in p["benign_train"])
    # Forbidden words are also trained in harmless, answered contexts.
    answered = [q for q, a in data.train_pairs if a != demo.REFUSAL]
    assert all(any(o in q.split() for q in answered) for o in demo.TARGET_OBJECTS)


def test_bad_input_is_rejected_with_one_clear_sentence(tmp_path, capsys):
    with pytest.raises(AbliterateError, match="llama, glm4_moe"):
        demo.build_demo_model(tmp_path / "x", arch="gpt2")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(AbliterateError, match="not empty"):
        demo.build_demo_model(tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert main(["demo-model", str(tmp_path / "y"), "--arch", "mistral"]) == 1
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("arch", demo.ARCHS)
def test_short_build_is_complete_and_deterministic(tmp_path, arch):
    first = demo.build_demo_model(tmp_path / "a", arch=arch, seed=3, steps=2)
    second = demo.build_demo_model(tmp_path / "b", arch=arch, seed=3, steps=2)
    index = json.loads((first / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    generation = json.loads((first / "generation_config.json").read_text())
    assert generation["eos_token_id"] is not None and generation["pad_token_id"] is not None
    assert not generation.get("do_sample", False)
    for shard in shards:
        a, b = load_file(first / shard), load_file(second / shard)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_prompts(first) == read_prompts(second)
    assert not list(tmp_path.glob("*.partial"))
    keys = set(index["weight_map"])
    if arch == "glm4_moe":  # GLM-4.5-Air layout on disk: per-expert keys, shared expert, router
        assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys
        assert "model.layers.1.mlp.shared_experts.down_proj.weight" in keys
        assert "model.layers.1.mlp.gate.weight" in keys
        assert "model.layers.0.mlp.down_proj.weight" in keys  # first_k_dense_replace = 1
    else:
        assert "model.layers.3.mlp.down_proj.weight" in keys


# ----------------------------------------------------------------------------- trained organisms


def last_token_states(model, tokenizer, prompts):
    """Residual at the last prompt token for every measurement index: [L + 1, N, d] float64."""
    rows = [demo.prompt_ids(tokenizer, p) for p in prompts]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return torch.stack([h[:, -1].double() for h in out.hidden_states])


def separation(target, benign):
    """Per index: the difference-of-means direction and how well it separates the classes
    (difference of projected means over the pooled standard deviation)."""
    diff = target.mean(1) - benign.mean(1)
    scores = []
    for m in range(diff.shape[0]):
        if diff[m].norm() < 1e-9:  # index 0: the last token is always <|assistant|>
            scores.append(0.0)
            continue
        r = diff[m] / diff[m].norm()
        pt, pb = target[m] @ r, benign[m] @ r
        scores.append(float((pt.mean() - pb.mean()) / ((pt.var() + pb.var()) / 2).sqrt()))
    return diff, scores


def ablate_everywhere(model, direction):
    """Project `direction` out of every residual writer: embedding, o_proj, (expert) down_proj."""
    with torch.no_grad():
        core = model.model
        core.embed_tokens.weight.copy_(
            ablate_tensor(core.embed_tokens.weight, direction, hidden_axis=1, norm_preserve=False)
        )
        writers = []
        for layer in core.layers:
            writers.append((layer.self_attn.o_proj.weight, 0))
            if hasattr(layer.mlp, "experts"):  # in memory, transformers 5 fuses the experts
                writers.append((layer.mlp.shared_experts.down_proj.weight, 0))
                writers.append((layer.mlp.experts.down_proj, 1))  # [E, H, I]
            else:
                writers.append((layer.mlp.down_proj.weight, 0))
        for weight, axis in writers:
            weight.copy_(ablate_tensor(weight, direction, hidden_axis=axis, norm_preserve=False))


@pytest.fixture(scope="module", params=["demo_dense", "demo_moe"])
def organism(request):
    """(model_dir, prompts, baseline greedy answers) for each trained organism."""
    model_dir = request.getfixturevalue(request.param)
    model, tokenizer = load(model_dir)
    prompts = read_prompts(model_dir)
    baseline = {
        cls: demo.greedy_responses(model, tokenizer, prompts[f"{cls}_test"], max_new_tokens=10)
        for cls in ("target", "benign")
    }
    return model_dir, prompts, baseline


@pytest.mark.slow
def test_organism_refuses_target_and_answers_benign(organism):
    model_dir, prompts, baseline = organism
    assert len(prompts["target_test"]) >= 100 and len(prompts["benign_test"]) >= 100
    assert demo.refusal_rate(baseline["target"]) >= 0.95
    assert demo.refusal_rate(baseline["benign"]) <= 0.05
    # Compliant answers copy the requested object.
    named = [
        a.split()[0] in q.split()
        for q, a in zip(prompts["benign_test"], baseline["benign"], strict=True)
    ]
    assert sum(named) >= 0.9 * len(named)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] in demo.ARCHS


@pytest.mark.slow
def test_abliteration_at_the_best_index_removes_refusal_only(organism):
    model_dir, prompts, baseline = organism
    model, tokenizer = load(model_dir)
    target = last_token_states(model, tokenizer, prompts["target_train"])
    benign = last_token_states(model, tokenizer, prompts["benign_train"])
    diff, scores = separation(target, benign)
    best = max(range(len(scores)), key=scores.__getitem__)
    assert best >= 2, f"separation per index {scores}"

    original = {k: v.clone() for k, v in model.state_dict().items()}

    def answers_after_ablating(m):
        model.load_state_dict(original)
        ablate_everywhere(model, diff[m].float())
        return {
            cls: demo.greedy_responses(model, tokenizer, prompts[f"{cls}_test"], max_new_tokens=10)
            for cls in ("target", "benign")
        }

    after = answers_after_ablating(best)
    unchanged = sum(a == b for a, b in zip(after["benign"], baseline["benign"], strict=True))
    assert demo.refusal_rate(after["target"]) <= 0.10
    assert unchanged >= 0.90 * len(baseline["benign"])
    # Un-gated, most forbidden requests are answered naming their own (forbidden) object.
    named = [
        any(o in q.split() and o in a.split() for o in demo.TARGET_OBJECTS)
        for q, a in zip(prompts["target_test"], after["target"], strict=True)
    ]
    assert sum(named) >= 0.6 * len(named)

    # A direction from a too-early index must not do the same job: either refusal stays or
    # benign answers break. This is what makes layer selection meaningful.
    early = answers_after_ablating(1)
    early_unchanged = sum(a == b for a, b in zip(early["benign"], baseline["benign"], strict=True))
    assert demo.refusal_rate(early["target"]) > 0.5 or early_unchanged < 0.9 * len(
        baseline["benign"]
    )


def test_cli_builds_a_loadable_model(tmp_path, capsys):
    out = tmp_path / "demo"
    assert (
        main(["-q", "demo-model", str(out), "--arch", "glm4_moe", "--seed", "1", "--steps", "1"])
        == 0
    )
    assert capsys.readouterr().out.strip() == str(out)
    model, tokenizer = load(out)
    assert type(model).__name__ == "Glm4MoeForCausalLM"
    assert tokenizer.chat_template is not None
    summary = json.loads((out / "demo.json").read_text())
    assert summary["refusal_prefix"] == demo.REFUSAL_PREFIX and summary["steps"] == 1
