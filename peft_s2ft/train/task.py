"""The fine-tuning task of `peft-s2ft train`: data, chat formatting, answer extraction and evaluation.

The embedded default is GSM8K-style arithmetic from reasoning-gym's offline `gsm_symbolic` generator, so a
run needs no hub access. Users may bring their own `prompt`/`completion` JSONL instead.

Evaluation of user data: when every held-out row has a gold number (an `answer` field, a completion ending
in "#### <number>", or a completion that is just a number) it is exact-match accuracy of the final number
of a greedy generation; otherwise it is the mean loss on the completion tokens (teacher forcing).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100
FIELDS = ("prompt", "completion")
# Offset between the training and test seeds: reasoning-gym seeds item i with `seed + i`, so nearby seeds
# would mostly regenerate the same problems.
TEST_SEED_OFFSET = 1_000_003
MARKER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
NUMBER = re.compile(r"(?<![\d.])-?\d[\d,]*(?:\.\d+)?")  # "5-3" reads as 5 and 3, not 5 and -3


class DataError(ValueError):
    """User-supplied data is unusable; the message names the file, line and field."""


# ----------------------------------------------------------------------------------------------- data


@dataclass
class Split:
    """Rows of one split; `answers` holds the gold final number of each row, or None where there is none."""

    prompts: list[str]
    completions: list[str]
    answers: list[str | None]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def numeric(self) -> bool:
        """Whether accuracy can be measured: every row has a gold number."""
        return len(self) > 0 and all(a is not None for a in self.answers)

    def head(self, n: int) -> Split:
        return Split(self.prompts[:n], self.completions[:n], self.answers[:n])


def gsm_symbolic(
    train_size: int, eval_size: int, seed: int, keep: Callable[[str, str], bool] | None = None
) -> tuple[Split, Split]:
    """Seeded GSM8K-style problems; test questions never occur among the training questions.

    `keep(question, solution)` filters both splits alike (the CLI keeps problems that fit in --max-length
    tokens and use numbers up to --max-number), so test problems come from the training distribution.
    """
    import reasoning_gym

    train = _unique_problems(reasoning_gym, train_size, seed, set(), keep)
    test = _unique_problems(reasoning_gym, eval_size, seed + TEST_SEED_OFFSET, set(train.prompts), keep)
    return train, test


def _unique_problems(
    reasoning_gym: Any, size: int, seed: int, exclude: set[str], keep: Callable[[str, str], bool] | None
) -> Split:
    split = Split([], [], [])
    seen = set(exclude)
    request, rejected = size, 0
    while len(split) < size:
        dataset = reasoning_gym.create_dataset("gsm_symbolic", size=request, seed=seed)
        for item in dataset:
            question, solution = item["question"], item["metadata"]["answer_cot"]
            if question in seen:
                continue
            seen.add(question)
            if keep is not None and not keep(question, solution):
                rejected += 1
                continue
            split.prompts.append(question)
            split.completions.append(solution)
            split.answers.append(str(item["answer"]))
            if len(split) == size:
                break
        if rejected > 20 * size + 100:
            raise DataError(
                "almost no gsm_symbolic problem passes the filters; raise --max-length or --max-number (0: no limit)."
            )
        seed += request  # reasoning-gym seeds item i with seed + i: continue where this request stopped
        request = max(2 * (size - len(split)), 16)
    return split


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file with string `prompt` and `completion` fields (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file.")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error.msg}).") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object with fields {', '.join(FIELDS)}.")
            for name in FIELDS:
                if name not in row:
                    raise DataError(
                        f"{path}:{number}: missing field '{name}' (each line needs {' and '.join(FIELDS)})."
                    )
                if not isinstance(row[name], str):
                    raise DataError(f"{path}:{number}: field '{name}' must be a string.")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows.")
    return rows


def _split_from_rows(rows: Iterable[dict[str, Any]]) -> Split:
    split = Split([], [], [])
    for row in rows:
        split.prompts.append(row["prompt"])
        split.completions.append(row["completion"])
        gold = row.get("answer")
        split.answers.append(normalize_number(str(gold)) if gold is not None else gold_number(row["completion"]))
    return split


def jsonl_splits(
    path: str | Path, train_size: int, eval_size: int, seed: int, eval_path: str | Path | None = None
) -> tuple[Split, Split]:
    """Train and test splits from user JSONL: a seeded hold-out of `path`, or all of `eval_path`.

    Test prompts that also occur in training are dropped from the test split.
    """
    rows = read_jsonl(path)
    random.Random(seed).shuffle(rows)
    if eval_path is None:
        if len(rows) < 2:
            raise DataError(f"{path}: needs at least 2 rows to hold some out for evaluation.")
        held = min(eval_size, len(rows) // 2)
        test_rows, train_rows = rows[:held], rows[held:]
    else:
        test_rows, train_rows = read_jsonl(eval_path)[:eval_size], rows
    train = _split_from_rows(train_rows[:train_size])
    known = set(train.prompts)
    test = _split_from_rows(r for r in test_rows if r["prompt"] not in known)
    if not len(test):
        raise DataError(f"{eval_path or path}: every evaluation prompt also occurs in the training data.")
    return train, test


# ------------------------------------------------------------------------------------------- answers


def normalize_number(text: str) -> str | None:
    """Canonical form of a number ("1,234.50" -> "1234.5", "42.0" -> "42"), None if it is not one."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))  # exact at any size: 42.0 -> 42
    return format(value.normalize(), "f")  # 0.50 -> 0.5


def largest_number(text: str) -> float:
    """Largest absolute value of the numbers in `text` (0 when there are none)."""
    values = (normalize_number(n) for n in NUMBER.findall(text))
    return max((abs(float(v)) for v in values if v is not None), default=0.0)


def extract_answer(text: str) -> str | None:
    """Final number of a generated solution: after the first "####" if present, else the last number."""
    marked = MARKER.search(text)
    if marked:
        return normalize_number(marked.group(1))
    numbers = NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def gold_number(completion: str) -> str | None:
    """Gold answer of a reference completion: its "#### N" marker, or the completion itself if a number."""
    marked = MARKER.search(completion)
    return normalize_number(marked.group(1)) if marked else normalize_number(completion)


def is_correct(generation: str, gold: str | None) -> bool:
    prediction = extract_answer(generation)
    return gold is not None and prediction is not None and prediction == normalize_number(gold)


# ---------------------------------------------------------------------------------------- formatting


def render_prompt(tokenizer: Any, prompt: str) -> str:
    """The prompt as the model sees it: a user turn of its chat template (if any) plus the reply header."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def _completion_text(tokenizer: Any, prompt: str, completion: str, rendered_prompt: str) -> str:
    """The completion as the template renders an assistant turn, end-of-turn token included."""
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenize=False
        )
        if full.startswith(rendered_prompt):
            return full[len(rendered_prompt) :].rstrip()
    return completion


def encode_example(tokenizer: Any, prompt: str, completion: str, max_length: int) -> dict[str, list[int]] | None:
    """Token ids with labels only on the completion (the prompt is masked); None if longer than max_length.

    Prompt and completion are tokenized separately, exactly as generation later sees them: the prompt as
    input, the completion as what follows it. The completion ends with the end-of-sequence token so the
    model learns to stop.
    """
    rendered = render_prompt(tokenizer, prompt)
    plain = not getattr(tokenizer, "chat_template", None)
    prompt_ids = tokenizer(rendered, add_special_tokens=plain)["input_ids"]
    completion_ids = tokenizer(_completion_text(tokenizer, prompt, completion, rendered), add_special_tokens=False)[
        "input_ids"
    ]
    eos = tokenizer.eos_token_id
    if eos is not None and (not completion_ids or completion_ids[-1] != eos):
        completion_ids = completion_ids + [eos]
    ids = prompt_ids + completion_ids
    if len(ids) > max_length:
        return None
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
    }


def encode_split(tokenizer: Any, split: Split, max_length: int) -> tuple[list[dict[str, list[int]]], int]:
    """Encoded rows of `split` and the number dropped for exceeding `max_length`."""
    encoded = [
        encode_example(tokenizer, p, c, max_length) for p, c in zip(split.prompts, split.completions, strict=True)
    ]
    kept = [row for row in encoded if row is not None]
    return kept, len(encoded) - len(kept)


@dataclass
class CompletionCollator:
    """Right-pads a batch; padding is masked out of both attention and loss.

    With `trim_logits` the batch also asks the model (via `logits_to_keep`) for logits only from the first
    position that predicts a completion token on: the LM head and the loss over a 50k vocabulary are a
    large share of a small model's step, and prompt positions carry no loss anyway.
    """

    pad_token_id: int
    trim_logits: bool = False

    def __call__(self, rows: Sequence[dict[str, list[int]]]) -> dict[str, Any]:
        width = max(len(row["input_ids"]) for row in rows)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.tensor([row[key] + [value] * (width - len(row[key])) for row in rows])

        batch: dict[str, Any] = {
            "input_ids": pad("input_ids", self.pad_token_id),
            "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", IGNORE_INDEX),
        }
        if self.trim_logits:
            labeled = (batch["labels"] != IGNORE_INDEX).any(dim=0).nonzero()
            # Logits at position t predict token t + 1; the loss shifts the (equally trimmed) labels itself.
            start = max(int(labeled[0]) - 1, 0) if len(labeled) else 0
            batch["labels"] = batch["labels"][:, start:]
            batch["logits_to_keep"] = width - start
        return batch


def completion_token_lengths(tokenizer: Any, completions: Iterable[str]) -> list[int]:
    return [len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for c in completions]


# ---------------------------------------------------------------------------------------- evaluation


@dataclass
class EvalResult:
    """Accuracy for numeric tasks (`accuracy`, `correct`), else mean completion loss (`loss`)."""

    total: int
    correct: int | None = None
    loss: float | None = None
    generations: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float | None:
        return None if self.correct is None else self.correct / self.total


@torch.no_grad()
def generate(
    model: Any, tokenizer: Any, prompts: Sequence[str], batch_size: int, max_new_tokens: int, desc: str
) -> list[str]:
    """Greedy completions of `prompts`, batched with left padding (similar lengths batched together)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    rendered = [render_prompt(tokenizer, p) for p in prompts]
    plain = not getattr(tokenizer, "chat_template", None)
    order = sorted(range(len(rendered)), key=lambda i: len(rendered[i]))
    outputs: list[str] = [""] * len(rendered)
    device = next(model.parameters()).device
    try:
        with tqdm(total=len(order), desc=desc, unit="problem") as bar:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = tokenizer(
                    [rendered[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=plain
                ).to(device)
                generated = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=_stop_ids(model, tokenizer),
                )
                new_tokens = generated[:, batch["input_ids"].shape[1] :]
                for i, text in zip(chunk, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True):
                    outputs[i] = text
                bar.update(len(chunk))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def _stop_ids(model: Any, tokenizer: Any) -> list[int]:
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [*ids, tokenizer.eos_token_id] if i is not None})


@torch.no_grad()
def completion_loss(model: Any, tokenizer: Any, split: Split, batch_size: int, max_length: int, desc: str) -> float:
    """Mean per-token loss of the reference completions given their prompts."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    rows, _ = encode_split(tokenizer, split, max_length)
    collate = CompletionCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch"):
            batch = {k: v.to(device) for k, v in collate(rows[start : start + batch_size]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            total += loss.item()
            tokens += int((labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return total / tokens if tokens else math.nan


def evaluate(
    model: Any, tokenizer: Any, split: Split, batch_size: int, max_new_tokens: int, max_length: int, desc: str
) -> EvalResult:
    """Exact-match accuracy of the final number when the split is numeric, else completion loss."""
    if not split.numeric:
        return EvalResult(total=len(split), loss=completion_loss(model, tokenizer, split, batch_size, max_length, desc))
    generations = generate(model, tokenizer, split.prompts, batch_size, max_new_tokens, desc)
    correct = sum(is_correct(g, a) for g, a in zip(generations, split.answers, strict=True))
    return EvalResult(total=len(split), correct=correct, generations=generations)
