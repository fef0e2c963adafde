"""Model access (abliterate.model): padding, batching, pad ids, loading and 4-bit evaluation."""

from __future__ import annotations

import pytest
import torch
from test_prompts import chat_tokenizer
from tiny_models import build_tiny

from abliterate.errors import AbliterateError
from abliterate.evaluate import EvalSettings, Evaluator, render_prompts
from abliterate.model import (
    LoadOptions,
    decoder_layers,
    length_batches,
    load_model,
    pad_batch,
    pad_id,
)


def test_pad_batch_left_and_right():
    ids, mask = pad_batch([[5, 6, 7], [8]], 0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[5, 6, 7], [8]], -100, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, -100, -100]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(AbliterateError, match="padding side 'top'"):
        pad_batch([[1]], 0, side="top")


def test_length_batches_group_similar_lengths_or_keep_order():
    lengths = [5, 1, 4, 1, 9]
    assert length_batches(lengths, 2) == [[1, 3], [2, 0], [4]]
    assert length_batches(lengths, 2, by_length=False) == [[0, 1], [2, 3], [4]]
    with pytest.raises(AbliterateError, match="batch_size is 0"):
        length_batches(lengths, 0)


class _Ids:
    def __init__(self, pad=None, eos=None, unk=None):
        self.pad_token_id, self.eos_token_id, self.unk_token_id = pad, eos, unk


def test_pad_id_falls_back_from_pad_to_eos_to_unk():
    assert pad_id(_Ids(pad=3, eos=1)) == 3
    assert pad_id(_Ids(eos=[7, 8])) == 7
    assert pad_id(_Ids(unk=2)) == 2
    assert pad_id(_Ids()) == 0


def test_loading_errors_are_one_sentence(tmp_path):
    with pytest.raises(AbliterateError, match="has no config.json"):
        load_model(tmp_path)
    path = build_tiny(tmp_path / "m", "llama")
    chat_tokenizer().save_pretrained(path)
    with pytest.raises(AbliterateError, match="both set"):
        load_model(path, LoadOptions(load_in_4bit=True, load_in_8bit=True))
    with pytest.raises(AbliterateError, match="dtype 'float8'"):
        load_model(path, LoadOptions(dtype="float8"))
    with pytest.raises(AbliterateError, match="device 'tpu' is unknown"):
        load_model(path, LoadOptions(device="tpu"))
    model, tokenizer, info = load_model(path, LoadOptions(device="cpu", dtype="bfloat16"))
    assert model.dtype == torch.bfloat16 and tokenizer.padding_side == "left"
    assert info["device"] == "cpu" and info["quantization"] is None
    assert len(decoder_layers(model)) == model.config.num_hidden_layers


def test_evaluation_loads_4bit_for_the_base_model_and_refuses_variants(tmp_path):
    """Evaluation shares measurement's loader, so 4-bit works there too (base model only)."""
    pytest.importorskip("bitsandbytes")
    path = build_tiny(
        tmp_path / "llama64", "llama", hidden_size=64, intermediate_size=128, num_key_value_heads=4
    )
    chat_tokenizer().save_pretrained(path)
    settings = EvalSettings(
        max_new_tokens=3, kl_tokens=2, load=LoadOptions(device="cpu", load_in_4bit=True)
    )
    model, tokenizer, info = load_model(path, settings.load)
    assert info["quantization"] == "4bit"
    prompts = render_prompts(tokenizer, ["w10 w11", "w12"])
    evaluator = Evaluator(model, tokenizer, prompts, prompts, settings)
    base = evaluator.evaluate_base()
    assert base.n_target == 2 and base.kl_first_token == 0.0
    with pytest.raises(AbliterateError, match="4bit model does not hold"):
        evaluator.evaluate("edit", {"entries": []})
