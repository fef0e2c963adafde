"""Prompt sets: every file format, the seeded subset, chat rendering and its errors."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from abliterate.errors import AbliterateError
from abliterate.prompts import encode, load_prompts, prompt_sha256, render

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}<system> {{ m['content'] }} <end> "
    "{% else %}<user> {{ m['content'] }} <end> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def chat_tokenizer(with_template: bool = True, vocab_size: int = 64):
    """A word-level tokenizer over `w0..wN` with a small chat template; no download."""
    words = ["<pad>", "<unk>", "<user>", "<assistant>", "<end>", "<system>", "User:", "Assistant:"]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<end>"
    )
    if with_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_txt_skips_blank_lines_and_strips(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("  first prompt \n\n second\n   \nthird\n")
    assert load_prompts(path) == ["first prompt", "second", "third"]


def test_json_jsonl_csv_with_fields(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(["x", "y"]))
    assert load_prompts(tmp_path / "a.json") == ["x", "y"]
    (tmp_path / "b.json").write_text(json.dumps([{"q": "x"}, {"q": "y"}]))
    assert load_prompts(tmp_path / "b.json", field="q") == ["x", "y"]
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert load_prompts(tmp_path / "c.jsonl") == ["one", "two"]
    (tmp_path / "d.jsonl").write_text('{"prompt": "one"}\n')
    assert load_prompts(tmp_path / "d.jsonl", field="prompt") == ["one"]
    (tmp_path / "e.csv").write_text('id,prompt\n1,"hello, there"\n2,bye\n')
    assert load_prompts(tmp_path / "e.csv", field="prompt") == ["hello, there", "bye"]


def test_parquet_with_a_column(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"id": [1, 2, 3], "prompt": ["how do i bake bread", None, "hi"]})
    frame.to_parquet(tmp_path / "f.parquet")
    assert load_prompts(tmp_path / "f.parquet", field="prompt") == ["how do i bake bread", "hi"]


def test_max_is_a_seeded_subset(tmp_path):
    path = tmp_path / "p.txt"
    lines = [f"prompt {i}" for i in range(50)]
    path.write_text("\n".join(lines))
    first = load_prompts(path, max_count=10, seed=3)
    assert first == load_prompts(path, max_count=10, seed=3)
    assert first != load_prompts(path, max_count=10, seed=4)
    assert len(set(first)) == 10 and set(first) <= set(lines)
    assert load_prompts(path, max_count=100) == lines


def test_sha256_depends_on_text_and_order():
    assert prompt_sha256(["a", "b"]) == prompt_sha256(["a", "b"])
    assert prompt_sha256(["a", "b"]) != prompt_sha256(["b", "a"])
    assert prompt_sha256(["ab"]) != prompt_sha256(["a", "b"])


def test_empty_prompt_file_is_one_sentence(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n  \n")
    with pytest.raises(AbliterateError, match=r"empty\.txt contains no prompts"):
        load_prompts(path)


def test_missing_column_names_the_file_and_columns(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("id,prompt\n1,hi\n")
    with pytest.raises(AbliterateError, match=r"t\.csv has no column 'text'.*\['id', 'prompt'\]"):
        load_prompts(path, field="text")
    with pytest.raises(AbliterateError, match="name its text column"):
        load_prompts(path)
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"prompt": "hi"}\n')
    with pytest.raises(AbliterateError, match=r"x\.jsonl line 1 has no text field 'text'"):
        load_prompts(jsonl)


def test_missing_file(tmp_path):
    with pytest.raises(AbliterateError, match="does not exist"):
        load_prompts(tmp_path / "nope.txt")


def test_render_uses_chat_template_with_system_prompt():
    tokenizer = chat_tokenizer()
    assert render(tokenizer, ["w1 w2"]) == ["<user> w1 w2 <end> <assistant>"]
    assert render(tokenizer, ["w1"], system="w9") == [
        "<system> w9 <end> <user> w1 <end> <assistant>"
    ]


def test_no_chat_template_is_an_error_unless_fallback():
    tokenizer = chat_tokenizer(with_template=False)
    with pytest.raises(AbliterateError, match="no chat template.*fallback_template"):
        render(tokenizer, ["w1"])
    assert render(tokenizer, ["w1"], fallback_template=True) == ["User: w1\nAssistant:"]
    assert render(tokenizer, ["w1"], system="w2", fallback_template=True) == [
        "System: w2\n\nUser: w1\nAssistant:"
    ]


def test_encode_counts_template_tokens_after_the_instruction():
    tokenizer = chat_tokenizer()
    (item,) = encode(tokenizer, ["w1 w2 w3"])
    assert tokenizer.convert_ids_to_tokens(item.ids) == [
        "<user>",
        "w1",
        "w2",
        "w3",
        "<end>",
        "<assistant>",
    ]
    assert item.tail == 2  # "<end> <assistant>"
    (plain,) = encode(chat_tokenizer(with_template=False), ["w1"], fallback_template=True)
    assert plain.tail == 1  # "Assistant:"


def test_binary_prompt_file_names_the_file_and_byte(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"fine line\nbad \xff byte\n")
    with pytest.raises(AbliterateError, match=r"not UTF-8 text \(byte 14 is 0xff\)") as error:
        load_prompts(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_non_utf8_structured_files_are_one_sentence(tmp_path, suffix):
    path = tmp_path / f"p{suffix}"
    path.write_bytes(b"text\n\xe9t\xe9\n")
    with pytest.raises(AbliterateError, match="not UTF-8 text"):
        load_prompts(path, field="text")


def test_corrupt_parquet_is_one_sentence(tmp_path):
    path = tmp_path / "p.parquet"
    path.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(AbliterateError, match="not a readable Parquet file"):
        load_prompts(path, field="text")


def test_long_prompts_are_refused_or_truncated_to_the_limit():
    tokenizer = chat_tokenizer()
    long_prompt = " ".join(f"w{i % 50}" for i in range(40))
    (full,) = encode(tokenizer, [long_prompt])
    assert len(full.ids) > 20
    with pytest.raises(AbliterateError, match="more than prompts.max_tokens = 20"):
        encode(tokenizer, [long_prompt, "w1"], max_tokens=20)
    short, untouched = encode(tokenizer, [long_prompt, "w1"], max_tokens=20, truncate=True)
    assert len(short.ids) == 20
    # the template around the text is kept whole: same opening and closing tokens
    assert short.ids[:1] == full.ids[:1] and short.ids[-short.tail :] == full.ids[-full.tail :]
    assert untouched == encode(tokenizer, ["w1"])[0]


def test_token_limit_defaults_to_the_model_context_capped():
    from types import SimpleNamespace

    from abliterate.prompts import DEFAULT_MAX_TOKENS, prompt_token_limit

    assert prompt_token_limit(SimpleNamespace(max_position_embeddings=512)) == 512
    big = SimpleNamespace(max_position_embeddings=131072)
    assert prompt_token_limit(big) == DEFAULT_MAX_TOKENS
    assert prompt_token_limit(big, requested=300) == 300
    assert prompt_token_limit(SimpleNamespace()) == DEFAULT_MAX_TOKENS
