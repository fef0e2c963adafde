"""The demo organisms: files a user loads, refusal behaviour, and that abliteration works on them."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from abliterate import demo, evaluate
from abliterate.cli import main
from abliterate.edit import ablate_tensor
from abliterate.errors import AbliterateError
from abliterate.layout import inspect_checkpoint
from abliterate.measure import prompt_rows
from abliterate.recipe import Plan, PlanEntry

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


@pytest.mark.parametrize("wording", ["a", "b"])
def test_validation_prompts_are_new_and_leave_the_training_data_unchanged(wording, monkeypatch):
    data = demo.make_data(seed=0, wording=wording)
    # every training text, prompts and answers (a repeated request is an answer there)
    trained = {text for pair in data.train_pairs for text in pair}
    for cls in ("target", "benign"):
        validation = data.prompts[f"{cls}_validation"]
        assert len(validation) == len(set(validation)) == demo.VALIDATION_PER_CLASS
        assert not set(validation) & (set(data.prompts[f"{cls}_test"]) | trained)
        objects = demo.TARGET_OBJECTS if cls == "target" else demo.BENIGN_OBJECTS
        assert all(any(o in q.split() for o in objects) for q in validation)
    # drawn from a stream of their own: the trained weights are what they were without them
    monkeypatch.setattr(demo, "VALIDATION_PER_CLASS", 0)
    without = demo.make_data(seed=0, wording=wording)
    assert without.train_pairs == data.train_pairs
    assert without.prompts["target_test"] == data.prompts["target_test"]


def test_wording_b_is_a_different_phrasing_of_the_same_design():
    a, b = demo.WORDINGS["a"], demo.WORDINGS["b"]
    data = demo.make_data(seed=0, wording="b")
    p = data.prompts
    for cls in ("target", "benign"):
        assert len(p[f"{cls}_test"]) >= 100
        assert not set(p[f"{cls}_train"]) & set(p[f"{cls}_test"])
    # Nothing of wording a's request shapes, verbs or refusal survives in wording b.
    requests = p["target_train"] + p["benign_train"]
    for template in a.templates:
        opening = template.split("{v}")[0].strip()
        assert not any(q.startswith(opening) or f" {opening} " in q for q in requests)
    assert not set(a.verbs) & set(b.verbs)
    assert not b.refusal.startswith(a.refusal_prefix) and b.refusal.startswith(b.refusal_prefix)
    # Same design: both classes share every template, one refusal sentence, forbidden words
    # answered in harmless contexts, and the workflow's default markers see the refusal.
    for template in b.templates:
        opening = template.split("{v}")[0].strip()
        assert any(opening in q for q in p["target_train"])
        assert any(opening in q for q in p["benign_train"])
    refusals = {
        answer
        for q, answer in data.train_pairs
        if demo.opens_with_refusal(answer, b.refusal_prefix)
    }
    assert refusals == {b.refusal}
    answered = [q for q, answer in data.train_pairs if answer != b.refusal]
    assert all(any(o in q.split() for q in answered) for o in demo.TARGET_OBJECTS)
    assert evaluate.is_refusal(b.refusal) and not evaluate.is_refusal(
        demo.comply("create", "kite", "", "b")
    )
    # Each wording's tokenizer knows its own words only; wording b's are not <unk>.
    tokenizer = demo.build_tokenizer("b")
    words = {w for q, answer in data.train_pairs for w in f"{q} {answer}".split()}
    unknown = {w for w in words if tokenizer.convert_tokens_to_ids(w) == tokenizer.unk_token_id}
    assert unknown <= set(demo.unknown_objects())
    assert "teach" not in demo.vocabulary("b") and "create" not in demo.vocabulary("a")


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
    with pytest.raises(AbliterateError, match="float32, bfloat16"):
        demo.build_demo_model(tmp_path / "z", dtype="float16")
    with pytest.raises(AbliterateError, match="wording 'c'; expected one of: a, b"):
        demo.build_demo_model(tmp_path / "z", wording="c")
    assert main(["demo-model", str(tmp_path / "z"), "--wording", "c"]) == 1
    assert not (tmp_path / "z").exists()


# Real on-disk names per family (what save_pretrained writes for the transformers config).
ON_DISK_KEYS = {
    "llama": ["model.layers.3.mlp.down_proj.weight", "lm_head.weight"],
    "glm4_moe": [  # GLM-4.5-Air layout: per-expert keys, shared expert, router
        "model.layers.1.mlp.experts.7.down_proj.weight",
        "model.layers.1.mlp.shared_experts.down_proj.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.0.mlp.down_proj.weight",  # first_k_dense_replace = 1
    ],
    "qwen3": ["model.layers.3.mlp.down_proj.weight", "model.layers.3.self_attn.q_norm.weight"],
    "mixtral": [
        "model.layers.0.block_sparse_moe.experts.3.w1.weight",
        "model.layers.0.block_sparse_moe.experts.3.w2.weight",
        "model.layers.0.block_sparse_moe.experts.3.w3.weight",
        "model.layers.0.block_sparse_moe.gate.weight",
    ],
    "gpt_oss": [
        "model.layers.0.mlp.experts.down_proj",
        "model.layers.0.mlp.experts.down_proj_bias",
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.router.bias",
        "model.layers.0.self_attn.sinks",
        "model.layers.0.self_attn.o_proj.bias",
    ],
    "deepseek_v3": [
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.mlp.experts.7.down_proj.weight",
        "model.layers.1.mlp.shared_experts.down_proj.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
    ],
}
FAMILY = {  # the layout registry's family for each demo architecture
    "llama": "llama",
    "glm4_moe": "glm4_moe",
    "qwen3": "llama",
    "mixtral": "mixtral",
    "gpt_oss": "gpt_oss",
    "deepseek_v3": "glm4_moe",
}


def test_the_suite_and_the_organisms_use_the_pinned_cpu_kernels():
    # tests/conftest.py pins them for the whole session; torch must have taken them
    assert demo.reproducible_kernels()
    assert torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT")


def test_a_build_without_the_pinned_kernels_trains_in_a_child_that_has_them(tmp_path, monkeypatch):
    here = demo.build_demo_model(tmp_path / "here", arch="llama", seed=1, steps=3)
    monkeypatch.delenv("MKL_CBWR")
    assert not demo.reproducible_kernels()
    child = demo.build_demo_model(tmp_path / "child", arch="llama", seed=1, steps=3)
    for shard in sorted(p.name for p in here.glob("*.safetensors")):
        a, b = load_file(here / shard), load_file(child / shard)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((child / "demo.json").read_text()) == json.loads(
        (here / "demo.json").read_text()
    )


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
    for key in ON_DISK_KEYS[arch]:
        assert key in keys, key
    # Saved like the family's real checkpoints: llama/glm4_moe float32, the others bfloat16.
    tensors = load_file(first / shards[0])
    expected = demo.DTYPES[demo.default_dtype(arch)]
    assert {t.dtype for t in tensors.values()} == {expected}
    assert json.loads((first / "demo.json").read_text())["dtype"] == demo.default_dtype(arch)
    # `abliterate inspect` recognises the family from the files alone.
    layout = inspect_checkpoint(first)
    assert (layout.model_type, layout.family) == (arch, FAMILY[arch])
    assert layout.num_layers == 4 and layout.hidden_size == 64
    assert layout.tie_word_embeddings == (arch == "qwen3")
    assert ("lm_head.weight" in keys) == (arch != "qwen3")  # tied: no head of its own on disk
    assert layout.is_moe == (arch not in ("llama", "qwen3"))
    if layout.is_moe:
        assert layout.num_experts == demo.ARCH_CONFIG[arch][1].get(
            "n_routed_experts", demo.ARCH_CONFIG[arch][1].get("num_local_experts")
        )
    writers = {t.component for t in layout.targets(side="write")}
    assert {"embed", "attn_out"} <= writers
    assert ("expert_down" in writers) == layout.is_moe


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


def names_the_asked_object(questions, answers) -> float:
    """Share of benign answers that name the object the request asks about.

    Why this and not only "is not a refusal": an organism that half-knows its answers
    (the DeepSeek-V3 one after 800 steps answered "how can i make a lemonade ?" with
    "tent ? sure . ...", 12 % of the time) changes them under any edit, and the issue-9
    number "benign answers kept" then measures the organism instead of the edit.
    """
    named = []
    for question, answer in zip(questions, answers, strict=True):
        asked = [word for word in question.split() if word in demo.BENIGN_OBJECTS]
        named.append(bool(asked) and asked[0] in answer.split())
    return sum(named) / len(named)


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
    assert names_the_asked_object(prompts["benign_test"], baseline["benign"]) >= 0.9
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] in demo.ARCHS


@pytest.mark.slow
def test_float32_organism_keeps_its_behaviour_in_bfloat16(organism):
    """What a bfloat16 save of the float32 organisms would give (save_pretrained writes the
    cast values as they are): the same refusals, and benign answers that still copy."""
    model_dir, prompts, baseline = organism
    model, tokenizer = load(model_dir)
    model.to(torch.bfloat16)
    target = demo.greedy_responses(model, tokenizer, prompts["target_test"], max_new_tokens=10)
    benign = demo.greedy_responses(model, tokenizer, prompts["benign_test"], max_new_tokens=10)
    assert demo.refusal_rate(target) >= 0.95 and demo.refusal_rate(benign) <= 0.05
    assert names_the_asked_object(prompts["benign_test"], benign) >= 0.9


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
    # (llama: about 90 %; glm4_moe 44-75 % across builds: the rest are garbled mixtures of
    # refusal and answer, still not noise, which names the right object about never)
    assert sum(named) >= 0.4 * len(named)

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


# ----------------------------------------------------------------------------- every family


def family_organism(model_dir):
    """The organism as a user gets it: reloaded in its saved dtype, with its wording's prompts."""
    model, tokenizer = load(model_dir)
    summary = json.loads((model_dir / "demo.json").read_text())
    assert model.dtype == demo.DTYPES[summary["dtype"]]
    return model, tokenizer, summary["refusal_prefix"], read_prompts(model_dir)


def answers(model, tokenizer, prompts, cls, max_new_tokens=10):
    return demo.greedy_responses(model, tokenizer, prompts[f"{cls}_test"], max_new_tokens)


@pytest.mark.slow
def test_family_organism_refuses_target_and_answers_benign_in_its_saved_dtype(demo_family):
    arch, model_dir = demo_family
    model, tokenizer, prefix, prompts = family_organism(model_dir)
    assert model.dtype == torch.bfloat16 and type(model).__name__ == ARCH_CLASS[arch]
    target, benign = (
        answers(model, tokenizer, prompts, "target"),
        answers(model, tokenizer, prompts, "benign"),
    )
    assert demo.refusal_rate(target, prefix) >= 0.95
    assert demo.refusal_rate(benign, prefix) <= 0.05
    assert names_the_asked_object(prompts["benign_test"], benign) >= 0.9
    # The workflow's default refusal markers read this organism's refusals too.
    assert sum(map(evaluate.is_refusal, target)) >= 0.95 * len(target)


def class_states(model, tokenizer, prompts):
    """Last-prompt-token residuals as the tool measures them (indices 0..L, L before the final
    norm), plus the final-norm output that transformers returns as its last hidden state."""
    rows = prompt_rows(model, tokenizer, prompts).double()  # [N, L + 1, d]
    post_norm = last_token_states(model, tokenizer, prompts)[-1]  # [N, d]
    return torch.cat([rows, post_norm[:, None]], dim=1)


def writer_plan(layout, direction):
    """Every residual writer the layout lists (embedding, attention out, dense/shared/expert
    down projections and their biases), plainly projected: the tool's own in-memory edit.
    A tied embedding is left out: editing it would edit the output head as well."""
    entries = [
        PlanEntry.for_target(
            t, layer=None, direction_id="r", direction=direction, scale=1.0,
            norm_preserve=False, with_bias=True,
        )
        for t in layout.targets(side="write")
        if not (t.component == "embed" and layout.tie_word_embeddings)
    ]  # fmt: skip
    return Plan(entries=entries, model_dir=layout.model_dir, recipe={})


ARCH_CLASS = {
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}


@pytest.mark.slow
def test_family_organism_direction_search(demo_family):
    """Remove the difference-of-means direction of each index from every writer, in memory.

    Reported per organism in docs/demo-organism.md; what is asserted is what holds today on
    every family: the edit is applied to the real tensors (checked against the files) and
    restored bit-exactly, and the base behaviour is what the organism was built for."""
    arch, model_dir = demo_family
    model, tokenizer, prefix, prompts = family_organism(model_dir)
    layout = inspect_checkpoint(model_dir)
    states = {
        c: class_states(model, tokenizer, prompts[f"{c}_train"]) for c in ("target", "benign")
    }
    diff = states["target"].mean(0) - states["benign"].mean(0)  # [L + 2, d]
    assert diff[0].norm() < 1e-6  # index 0: the last prompt token is always <|assistant|>
    # 6 tokens: the longest refusal prefix (5) and the start of an answer; keeps the search short.
    base = {c: answers(model, tokenizer, prompts, c, 6) for c in ("target", "benign")}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = evaluate.InMemoryEditor(model, model_dir)
    rows = []
    for m in range(1, diff.shape[0]):
        with editor.applied(writer_plan(layout, diff[m].float())):
            after = {c: answers(model, tokenizer, prompts, c, 6) for c in ("target", "benign")}
        kept = sum(a == b for a, b in zip(after["benign"], base["benign"], strict=True))
        label = str(m) if m <= layout.num_layers else f"{layout.num_layers}+norm"
        rows.append((label, demo.refusal_rate(after["target"], prefix), kept / len(base["benign"])))
    print(f"\n{arch} ({json.loads((model_dir / 'demo.json').read_text())['wording']}):", rows)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert demo.refusal_rate(base["target"], prefix) >= 0.95
    assert demo.refusal_rate(base["benign"], prefix) <= 0.05


def test_cli_dtype_and_wording_flags(tmp_path, capsys):
    out = tmp_path / "oss"
    argv = ["-q", "demo-model", str(out), "--arch", "gpt_oss", "--steps", "1"]
    assert main([*argv, "--dtype", "float32", "--wording", "b"]) == 0
    summary = json.loads((out / "demo.json").read_text())
    assert (summary["dtype"], summary["wording"]) == ("float32", "b")
    assert summary["refusal_prefix"] == demo.WORDINGS["b"].refusal_prefix
    model, tokenizer = load(out)
    assert model.dtype == torch.float32 and type(model).__name__ == "GptOssForCausalLM"
    assert tokenizer.convert_tokens_to_ids("assemble") != tokenizer.unk_token_id


@pytest.mark.parametrize("kind", ["spm", "glm"])
def test_bpe_tokenizers_keep_grammar_words_whole_and_split_made_up_ones(kind, tmp_path):
    """The llama.cpp-convertible tokenizers of the llama and glm4_moe organisms: trained on
    the grammar, deterministic, one token per grammar word, nothing unknown."""
    built = demo.build_tokenizer("b", kind)
    assert (
        built.backend_tokenizer.to_str()
        == demo.build_tokenizer("b", kind).backend_tokenizer.to_str()
    )
    built.save_pretrained(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)  # offline, from files
    specials = {*demo.SPECIAL_TOKENS.values(), *demo.ROLE_TOKENS}
    words = [w for w in demo.vocabulary("b") if w not in specials]
    text = " ".join(words)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(words)  # every grammar word is one token
    made_up = "hello zzyzx qwv"
    pieces = tokenizer(made_up, add_special_tokens=False)["input_ids"]
    assert len(pieces) > 3 and tokenizer.unk_token_id not in pieces
    for sentence in (text, made_up, demo.WORDINGS["b"].refusal):
        assert (
            tokenizer.decode(tokenizer(sentence, add_special_tokens=False)["input_ids"]) == sentence
        )
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "how do i make a kite ?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    if kind == "spm":
        assert tokenizer.backend_tokenizer.model.byte_fallback
        assert rendered == "<s><|user|> how do i make a kite ? <|assistant|>"
    else:
        assert rendered == "[gMASK]<sop><|user|>\nhow do i make a kite ?<|assistant|>\n"
        assert tokenizer.bos_token is None and tokenizer.eos_token == "<|endoftext|>"
        for token in ("[gMASK]", "<sop>", "<|observation|>", "<think>"):
            assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1


def test_organisms_get_their_family_tokenizer_kind():
    assert demo.tokenizer_kind("llama") == "spm" and demo.tokenizer_kind("glm4_moe") == "glm"
    assert {demo.tokenizer_kind(a) for a in ("qwen3", "mixtral", "gpt_oss", "deepseek_v3")} == {
        "word"
    }
    with pytest.raises(AbliterateError, match="expected word, spm or glm"):
        demo.build_tokenizer("a", "sentencepiece")
