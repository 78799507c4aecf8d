"""The task module: data splits, answer-only labels, answer extraction and user-data errors."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_chat import tiny_chat_tokenizer

from peft_s2ft.train.task import (
    IGNORE_INDEX,
    CompletionCollator,
    DataError,
    Split,
    encode_example,
    extract_answer,
    gold_number,
    gsm_symbolic,
    is_correct,
    jsonl_splits,
    largest_number,
    normalize_number,
    read_jsonl,
    render_prompt,
)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_chat_tokenizer()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so 3 + 4 = 7\n#### 7", "7"),
        ("#### 1,234", "1234"),
        ("#### 69.0\nThe answer is 70.", "69"),
        ("She pays $12.50 in total.", "12.5"),
        ("The answer is 42.", "42"),
        ("We get 5-3 = 2", "2"),
        ("It drops to -4 degrees", "-4"),
        ("first 10 then 20 and finally 30", "30"),
        ("no number here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", "42"),
        ("42.0", "42"),
        ("1,000", "1000"),
        ("0.50", "0.5"),
        ("-7", "-7"),
        ("9" * 40, "9" * 40),
        ("abc", None),
    ],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_gold_number_and_is_correct():
    assert gold_number("Step 1: 2 * 3 = 6\n#### 6") == "6"
    assert gold_number("  17 ") == "17"
    assert gold_number("Paris is the capital") is None
    assert is_correct("... so #### 8.0", "8")
    assert not is_correct("the answer is 9", "8")
    assert not is_correct("anything 8", None)


def test_labels_cover_only_the_completion(tokenizer):
    prompt, completion = "What is 2+3?", "2+3 = 5\n#### 5"
    row = encode_example(tokenizer, prompt, completion, max_length=512)
    rendered = render_prompt(tokenizer, prompt)
    prompt_len = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert row["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    answer = row["labels"][prompt_len:]
    assert IGNORE_INDEX not in answer and answer == row["input_ids"][prompt_len:]
    assert answer[-1] == tokenizer.eos_token_id  # the model learns to stop
    assert tokenizer.decode(answer, skip_special_tokens=True) == completion
    assert tokenizer.decode(row["input_ids"][:prompt_len]) == rendered
    assert encode_example(tokenizer, prompt, completion, max_length=prompt_len + 3) is None


def test_plain_prompt_without_chat_template():
    tokenizer = tiny_chat_tokenizer(chat_template=False)
    row = encode_example(tokenizer, "Q: 1+1?\nA:", " 2", max_length=64)
    labeled = [t for t in row["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(labeled, skip_special_tokens=True) == " 2"
    assert labeled[-1] == tokenizer.eos_token_id


def test_collator_pads_and_masks(tokenizer):
    rows = [encode_example(tokenizer, p, c, 512) for p, c in [("a", "1"), ("longer prompt", "#### 22")]]
    batch = CompletionCollator(tokenizer.pad_token_id)(rows)
    short = len(rows[0]["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(rows[1]["input_ids"]))
    assert torch.all(batch["attention_mask"][0, short:] == 0)
    assert torch.all(batch["labels"][0, short:] == IGNORE_INDEX)
    assert batch["attention_mask"][1].all()


def test_gsm_symbolic_is_seeded_and_disjoint():
    train, test = gsm_symbolic(train_size=30, eval_size=10, seed=3)
    assert (len(train), len(test)) == (30, 10)
    assert not set(train.prompts) & set(test.prompts)
    assert len(set(train.prompts)) == 30
    assert test.numeric and all(gold_number(c) == a for c, a in zip(test.completions, test.answers, strict=True))
    again, _ = gsm_symbolic(train_size=30, eval_size=10, seed=3)
    assert again.prompts == train.prompts


@pytest.mark.parametrize(
    ("text", "expected"),
    [("14 + 29 = 43, then 43 x 4 = 172", 172.0), ("#### 1,234", 1234.0), ("a loss of -7.5", 7.5), ("none", 0.0)],
)
def test_largest_number(text, expected):
    assert largest_number(text) == expected


def test_gsm_symbolic_filter_applies_to_both_splits():
    def small(question, solution):
        return largest_number(solution) <= 100

    train, test = gsm_symbolic(train_size=20, eval_size=10, seed=3, keep=small)
    assert (len(train), len(test)) == (20, 10)
    assert all(largest_number(c) <= 100 for c in train.completions + test.completions)
    assert not set(train.prompts) & set(test.prompts)


def test_gsm_symbolic_filter_that_rejects_everything_is_a_clear_error():
    with pytest.raises(DataError, match="--max-length"):
        gsm_symbolic(train_size=2, eval_size=1, seed=0, keep=lambda question, solution: False)


def _write(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_jsonl_missing_field_names_field_and_line(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "1"}, "", {"prompt": "b"}])
    with pytest.raises(DataError, match=r"d\.jsonl:3: missing field 'completion'"):
        read_jsonl(path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r":1: not valid JSON"),
        ('["a"]', r":1: expected a JSON object"),
        ('{"prompt": 1, "completion": "x"}', r":1: field 'prompt' must be a string"),
    ],
)
def test_jsonl_malformed_lines(tmp_path, line, message):
    with pytest.raises(DataError, match=message):
        read_jsonl(_write(tmp_path / "d.jsonl", [line]))


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "absent.jsonl")


def test_jsonl_splits_hold_out_and_detect_numeric(tmp_path):
    rows = [{"prompt": f"{i} + 1 =", "completion": f"#### {i + 1}"} for i in range(20)]
    train, test = jsonl_splits(_write(tmp_path / "n.jsonl", rows), train_size=100, eval_size=5, seed=0)
    assert (len(train), len(test)) == (15, 5)
    assert not set(train.prompts) & set(test.prompts)
    assert test.numeric

    words = [{"prompt": f"Say hi {i}", "completion": "hello there"} for i in range(6)]
    _, test = jsonl_splits(_write(tmp_path / "w.jsonl", words), train_size=100, eval_size=2, seed=0)
    assert not test.numeric  # evaluated by completion loss instead of accuracy


def test_split_head():
    split = Split(["a", "b"], ["1", "2"], ["1", None])
    assert len(split.head(1)) == 1 and split.head(1).numeric and not split.numeric


def test_trimmed_logits_give_the_same_loss(tokenizer, tmp_path):
    from tiny_chat import save_tiny_llama
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(save_tiny_llama(tmp_path)).eval()
    pairs = [("What is 2+3?", "#### 5"), ("A much longer question here?", "It is 2 * 4 = 8\n#### 8")]
    rows = [encode_example(tokenizer, p, c, 512) for p, c in pairs]
    full = CompletionCollator(tokenizer.pad_token_id)(rows)
    trimmed = CompletionCollator(tokenizer.pad_token_id, trim_logits=True)(rows)
    assert trimmed["logits_to_keep"] < full["input_ids"].shape[1]
    with torch.no_grad():
        expected = model(**full).loss
        actual = model(**trimmed)
    assert actual.logits.shape[1] == trimmed["logits_to_keep"]
    torch.testing.assert_close(actual.loss, expected)
