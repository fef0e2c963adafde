"""Measurement: float64 accumulation, padding/batch invariance, router counts, 4-bit on
CPU, file formats (safetensors, legacy .refuse) and separation on the demo organism."""

from __future__ import annotations

import pytest
import torch
from test_prompts import chat_tokenizer
from tiny_models import build_tiny

from abliterate import cli
from abliterate.analyze import auroc, layer_metrics, suggest_recipe
from abliterate.directions import direction
from abliterate.errors import AbliterateError
from abliterate.measure import (
    Measurements,
    MeasureOptions,
    RunningMean,
    load_measurements,
    measure,
    position_weights,
    prompt_rows,
    save_measurements,
)
from abliterate.model import LoadOptions, load_model
from abliterate.prompts import load_prompts

CPU = LoadOptions(device="cpu")
QUIET = MeasureOptions(progress=False)
HELD_OUT = MeasureOptions(batch_size=64, progress=False)


def word_prompts(n: int, seed: int, lo: int = 10, hi: int = 40) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(n):
        length = int(torch.randint(1, 9, (1,), generator=generator))
        words = torch.randint(lo, hi, (length,), generator=generator)
        prompts.append(" ".join(f"w{int(w)}" for w in words))
    return prompts


TARGET = word_prompts(12, seed=1)
BENIGN = word_prompts(12, seed=2)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Tiny random llama and glm4_moe checkpoints with a chat tokenizer saved beside them."""
    root = tmp_path_factory.mktemp("tiny")
    dirs = {}
    for arch in ("llama", "glm4_moe"):
        path = build_tiny(root / arch, arch)
        chat_tokenizer().save_pretrained(path)
        dirs[arch] = path
    return dirs


@pytest.fixture(scope="module")
def tiny_llama_model(tiny_dirs):
    model, tokenizer, _ = load_model(tiny_dirs["llama"], CPU)
    return model, tokenizer


def test_float64_accumulation_across_batches_equals_one_big_batch():
    torch.manual_seed(0)
    rows = torch.randn(1000, 3, 16) * 1e3 + 1e4  # large offset: float32 sums would drift
    running = RunningMean()
    for chunk in torch.split(rows, [1, 7, 300, 2, 690]):
        running.add(chunk)
    assert running.count == 1000
    assert running.mean().dtype == torch.float64
    assert torch.allclose(running.mean(), rows.double().mean(0), rtol=0, atol=1e-9)


def test_position_weights_for_both_padding_sides():
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert position_weights(left, None).tolist() == [[0, 0, 0, 0, 1], [0, 0, 0, 0, 1]]
    assert position_weights(right, None).tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 0, 1]]
    tails = torch.tensor([2, 3])
    expected = torch.tensor([[0, 0.5, 0.5, 0, 0], [0, 0, 1 / 3, 1 / 3, 1 / 3]])
    assert torch.allclose(position_weights(right, tails), expected)


def test_padding_side_and_batch_size_do_not_change_the_means(tiny_llama_model):
    model, tokenizer = tiny_llama_model
    reference = measure(
        model, tokenizer, TARGET, BENIGN, MeasureOptions(batch_size=1, progress=False)
    )
    for batch_size, side in ((5, "left"), (12, "right"), (3, "right")):
        other = measure(
            model,
            tokenizer,
            TARGET,
            BENIGN,
            MeasureOptions(batch_size=batch_size, padding_side=side, progress=False),
        )
        assert torch.allclose(other.target_mean, reference.target_mean, atol=1e-5)
        assert torch.allclose(other.benign_mean, reference.benign_mean, atol=1e-5)
        assert torch.allclose(other.target_proj, reference.target_proj, atol=1e-4)
    assert reference.target_mean.shape == (4, 32)  # L + 1 indices for 3 layers
    assert reference.target_proj.shape == (4, len(TARGET))
    assert reference.meta["counts"] == {"target": 12, "benign": 12}


def test_last_index_is_the_pre_norm_output_of_the_last_layer(tiny_llama_model):
    model, tokenizer = tiny_llama_model
    meas = measure(model, tokenizer, TARGET[:1], BENIGN[:1], QUIET)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": TARGET[0]}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    hidden = out.hidden_states
    for m in range(3):
        assert torch.allclose(meas.target_mean[m].float(), hidden[m][0, -1], atol=1e-5)
    # HF's last hidden state has the final norm applied; index L must not
    final = model.model.layers[-1]
    captured = {}
    handle = final.register_forward_hook(lambda mod, args, output: captured.update(h=output))
    with torch.no_grad():
        model(torch.tensor([ids]))
    handle.remove()
    h = captured["h"][0] if isinstance(captured["h"], tuple) else captured["h"]
    assert torch.allclose(meas.target_mean[3].float(), h[0, -1], atol=1e-5)
    assert not torch.allclose(meas.target_mean[3].float(), hidden[3][0, -1], atol=1e-3)
    # ... and the final norm's output (what the head reads) is kept beside the indices
    assert torch.allclose(meas.target_final_norm_mean.float(), hidden[3][0, -1], atol=1e-5)
    # the weights of the norms that read each index: layer m's input norm, then the final one
    assert torch.equal(meas.norm_weights[1].float(), model.model.layers[1].input_layernorm.weight)
    assert torch.equal(meas.norm_weights[3].float(), model.model.norm.weight)


def test_post_instruction_averages_the_template_tail(tiny_llama_model):
    model, tokenizer = tiny_llama_model
    last = measure(model, tokenizer, TARGET, BENIGN, QUIET)
    tail = measure(
        model,
        tokenizer,
        TARGET,
        BENIGN,
        MeasureOptions(position="post_instruction", progress=False),
    )
    assert tail.meta["position"] == "post_instruction"
    assert not torch.allclose(last.target_mean[1:], tail.target_mean[1:], atol=1e-4)
    # embeddings (index 0): mean of the "<end>" and "<assistant>" embeddings for every prompt
    embed = model.get_input_embeddings().weight
    expected = (embed[tokenizer.convert_tokens_to_ids("<end>")] + embed[3]) / 2
    assert torch.allclose(tail.target_mean[0].float(), expected, atol=1e-6)


def test_unknown_position_and_empty_set_are_one_sentence(tiny_llama_model):
    model, tokenizer = tiny_llama_model
    with pytest.raises(
        AbliterateError, match=r"position 'first' is unknown.*'last', 'post_instruction'"
    ):
        measure(model, tokenizer, TARGET, BENIGN, MeasureOptions(position="first"))
    with pytest.raises(AbliterateError, match="target prompt set is empty"):
        measure(model, tokenizer, [], BENIGN)


def test_moe_router_counts(tiny_dirs):
    model, tokenizer, _ = load_model(tiny_dirs["glm4_moe"], CPU)
    meas = measure(model, tokenizer, TARGET, BENIGN, MeasureOptions(batch_size=5, progress=False))
    assert meas.has_router_stats
    counts, tokens = meas.target_expert_counts, meas.target_router_tokens
    assert counts.shape == (3, 8)
    # layer 0 is dense (first_k_dense_replace=1); every routed token picks top-2 experts
    assert counts[0].sum() == 0 and tokens[0] == 0
    prompt_tokens = sum(
        len(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, return_dict=True
            )["input_ids"]
        )
        for p in TARGET
    )
    assert tokens[1:].tolist() == [prompt_tokens, prompt_tokens]
    assert counts[1:].sum(-1).tolist() == [2 * prompt_tokens, 2 * prompt_tokens]
    # padding must not be counted: batch size 1 gives the same counts
    single = measure(model, tokenizer, TARGET, BENIGN, MeasureOptions(batch_size=1, progress=False))
    assert torch.equal(single.target_expert_counts, counts)


def test_4bit_measurement_runs_on_cpu(tmp_path):
    """bitsandbytes' CPU 4-bit kernel packs weights in blocks of 64 inputs, so this tiny model
    uses dimensions that are multiples of 64 (as every real model's are)."""
    pytest.importorskip("bitsandbytes")
    path = build_tiny(
        tmp_path / "llama64", "llama", hidden_size=64, intermediate_size=128, num_key_value_heads=4
    )
    chat_tokenizer().save_pretrained(path)
    model, tokenizer, info = load_model(path, LoadOptions(device="cpu", load_in_4bit=True))
    assert info["quantization"] == "4bit"
    assert type(model.model.layers[0].self_attn.o_proj).__name__ == "Linear4bit"
    quantized = measure(model, tokenizer, TARGET, BENIGN, QUIET)
    full = measure(*load_model(path, CPU)[:2], TARGET, BENIGN, QUIET)
    assert quantized.meta["quantization"] == "4bit"
    assert torch.isfinite(quantized.target_mean).all()
    # 4-bit weights perturb activations but keep them recognisably the same
    cos = torch.nn.functional.cosine_similarity(quantized.target_mean, full.target_mean, dim=-1)
    assert (cos[1:] > 0.9).all(), cos


def test_safetensors_round_trip_with_metadata(tiny_llama_model, tmp_path):
    meas = measure(*tiny_llama_model, TARGET, BENIGN, QUIET)
    path = save_measurements(meas, tmp_path / "m.safetensors")
    assert (tmp_path / "m.json").is_file()
    assert not list(tmp_path.glob("*.tmp"))
    loaded = load_measurements(path)
    assert torch.equal(loaded.target_mean, meas.target_mean)
    assert torch.equal(loaded.benign_proj, meas.benign_proj)
    assert torch.equal(loaded.benign_final_norm_mean, meas.benign_final_norm_mean)
    assert loaded.meta["prompt_sha256"] == meas.meta["prompt_sha256"]
    assert loaded.num_layers == 3 and loaded.hidden_size == 32


def test_refuse_round_trip_through_the_cli(tiny_llama_model, tiny_dirs, tmp_path):
    meas = measure(*tiny_llama_model, TARGET, BENIGN, QUIET)
    save_measurements(meas, tmp_path / "m.safetensors")
    args = ["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "m.refuse")]
    assert cli.main([*args, "--model", str(tiny_dirs["llama"])]) == 0
    legacy = torch.load(tmp_path / "m.refuse", weights_only=True)
    assert legacy["layers"] == 3
    assert {
        f"{k}_{i}" for k in ("harmful", "harmless", "refuse", "refusenorm") for i in range(4)
    } <= set(legacy)
    assert torch.allclose(legacy["refusenorm_2"].double(), direction(meas, 2), atol=1e-6)
    assert (
        cli.main(["convert", str(tmp_path / "m.refuse"), str(tmp_path / "back.safetensors")]) == 0
    )
    back = load_measurements(tmp_path / "back.safetensors")
    assert torch.allclose(back.target_mean, meas.target_mean, atol=1e-6)
    assert torch.allclose(back.benign_mean, meas.benign_mean, atol=1e-6)
    for m in range(1, 4):
        assert torch.allclose(direction(back, m), direction(meas, m), atol=1e-5)


def test_refuse_of_another_hidden_size_is_one_sentence(tiny_dirs, tmp_path, caplog):
    torch.save(
        {
            "layers": 3,
            **{f"harmful_{i}": torch.ones(48) for i in range(4)},
            **{f"harmless_{i}": torch.zeros(48) for i in range(4)},
        },
        tmp_path / "big.refuse",
    )
    meas = load_measurements(tmp_path / "big.refuse")
    with pytest.raises(
        AbliterateError,
        match=r"big\.refuse has hidden size 48 but .*config\.json has hidden size 32",
    ):
        meas.check_compatible(32, 3, str(tiny_dirs["llama"] / "config.json"))
    code = cli.main(
        [
            "convert",
            str(tmp_path / "big.refuse"),
            str(tmp_path / "x.safetensors"),
            "--model",
            str(tiny_dirs["llama"]),
        ]
    )
    assert code == 1 and not (tmp_path / "x.safetensors").exists()


class Payload:
    """An arbitrary object: unpickling it would mean running code from the file."""


def test_refuse_is_never_unpickled(tmp_path):
    torch.save({"layers": 1, "harmful_0": Payload()}, tmp_path / "evil.refuse")
    with pytest.raises(
        AbliterateError, match=r"evil\.refuse holds Python objects besides tensors.*refused"
    ) as error:
        load_measurements(tmp_path / "evil.refuse")
    assert "weights_only=False" not in str(error.value)  # never advise running the file's code


def test_non_finite_measurements_are_refused_naming_the_indices(tmp_path):
    meas = Measurements(
        torch.zeros(4, 8, dtype=torch.float64),
        torch.ones(4, 8, dtype=torch.float64),
        torch.zeros(4, 0),
        torch.zeros(4, 0),
        meta={"num_layers": 3, "hidden_size": 8},
    )
    meas.target_mean[2, 5] = float("nan")
    save_measurements(meas, tmp_path / "m.safetensors")
    with pytest.raises(AbliterateError, match=r"m\.safetensors holds non-finite .* indices 2;"):
        load_measurements(tmp_path / "m.safetensors")
    from abliterate.analyze import layer_metrics

    with pytest.raises(AbliterateError, match="non-finite values"):
        layer_metrics(meas)  # analyze never suggests a recipe from NaN means


def test_malformed_measurement_metadata_is_one_sentence(tmp_path):
    from safetensors.torch import save_file

    means = {"target_mean": torch.zeros(2, 4), "benign_mean": torch.ones(2, 4)}
    save_file(means, tmp_path / "m.safetensors", metadata={"abliterate": "{not json"})
    with pytest.raises(AbliterateError, match="malformed 'abliterate' metadata"):
        load_measurements(tmp_path / "m.safetensors")


def test_demo_direction_separates_held_out_prompts(demo_dense):
    """On the trained demo organism the best index separates *held-out* prompts."""
    prompts = demo_dense / "prompts"
    target = load_prompts(prompts / "target_train.txt", max_count=100)
    benign = load_prompts(prompts / "benign_train.txt", max_count=100)
    model, tokenizer, _ = load_model(demo_dense, CPU)
    meas = measure(model, tokenizer, target, benign, MeasureOptions(batch_size=64, progress=False))
    recipe, _ = suggest_recipe(layer_metrics(meas), meas.num_layers)
    best = recipe["ablate"][0]["measurement"]
    r = direction(meas, best).float()
    held_target = prompt_rows(model, tokenizer, load_prompts(prompts / "target_test.txt"), HELD_OUT)
    held_benign = prompt_rows(model, tokenizer, load_prompts(prompts / "benign_test.txt"), HELD_OUT)
    score = auroc(held_target[:, best].float() @ r, held_benign[:, best].float() @ r)
    assert score >= 0.95, (best, score)
