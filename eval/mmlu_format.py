"""MMLU prompts and letter scoring, as in Hendrycks et al. (2021) and lm-eval-harness.

A k-shot prompt for subject "high_school_physics":

    The following are multiple choice questions (with answers) about high school physics.

    {dev question 1}
    A. {choice}
    B. {choice}
    C. {choice}
    D. {choice}
    Answer: B

    ... (k dev examples) ...
    {test question}
    A. ...
    D. {choice}
    Answer:

The model is not asked to generate: we compare the log-probabilities of the four
continuations " A", " B", " C", " D" after "Answer:" and pick the largest.

Records here use the HF ``cais/mmlu`` layout: {"subject", "question",
"choices": [4 strings], "answer": int 0-3}.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

LETTERS = ("A", "B", "C", "D")


def letter_continuations() -> list[str]:
    """The four continuations scored after the prompt's final "Answer:"."""
    return [" " + letter for letter in LETTERS]


def format_subject(subject: str) -> str:
    """'high_school_physics' -> 'high school physics'."""
    return subject.replace("_", " ")


def format_example(example: dict, include_answer: bool) -> str:
    """One question block; with the answer (few-shot) it ends in a blank line."""
    choices = example["choices"]
    if len(choices) != 4:
        raise ValueError(f"MMLU example needs 4 choices, got {len(choices)}: {example['question'][:60]!r}")
    text = example["question"].strip()
    for letter, choice in zip(LETTERS, choices):
        text += f"\n{letter}. {choice}"
    text += "\nAnswer:"
    if include_answer:
        text += f" {LETTERS[example['answer']]}\n\n"
    return text


def format_mmlu_prompt(subject: str, dev_examples: Sequence[dict], example: dict, k: int = 5) -> str:
    """The k-shot prompt for `example`, with the first k of `dev_examples` as shots.

    Args:
        subject: MMLU subject id, e.g. "abstract_algebra".
        dev_examples: the subject's dev split (the original uses its first k rows).
        example: the test question; its answer is not shown.
        k: number of shots; 0 gives the zero-shot prompt.
    Returns:
        The prompt string ending in "Answer:" (no trailing space).
    """
    if k > len(dev_examples):
        raise ValueError(f"{k}-shot prompt for {subject!r} needs {k} dev examples, got {len(dev_examples)}")
    prompt = f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"
    for shot in dev_examples[:k]:
        prompt += format_example(shot, include_answer=True)
    return prompt + format_example(example, include_answer=False)


def group_by_subject(records: Sequence[dict]) -> dict[str, list[dict]]:
    """subject -> its records, in their original order (to pick a subject's dev shots)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["subject"]].append(r)
    return dict(groups)


def letter_logprobs_from_logits(next_token_logits: torch.Tensor, letter_token_ids: Sequence[int]) -> torch.Tensor:
    """Log-probabilities of the four letter tokens at the position after "Answer:".

    Args:
        next_token_logits: (N, V) logits of the token following each prompt.
        letter_token_ids: the 4 token ids of " A", " B", " C", " D" (each a single
            token; multi-token continuations must instead be summed over their tokens).
    Returns:
        (N, 4) float32 log-probabilities, normalised over the whole vocabulary.
    """
    ids = torch.as_tensor(list(letter_token_ids), dtype=torch.long, device=next_token_logits.device)
    if ids.numel() != 4:
        raise ValueError(f"need 4 letter token ids, got {ids.numel()}")
    logprobs = torch.log_softmax(next_token_logits.float(), dim=-1)  # (N, V)
    return logprobs[:, ids]  # (N, 4)


def choose_letter(letter_logprobs: torch.Tensor) -> torch.Tensor:
    """(N, 4) letter log-probabilities -> (N,) chosen index 0-3 (first on a tie)."""
    if letter_logprobs.dim() != 2 or letter_logprobs.shape[1] != 4:
        raise ValueError(f"expected (N, 4) letter log-probabilities, got {tuple(letter_logprobs.shape)}")
    return letter_logprobs.argmax(dim=-1)


def mmlu_scores(records: Sequence[dict]) -> dict:
    """Accuracy from per-question records {"subject", "pred": int, "answer": int}.

    Returns:
        {"micro": accuracy over all questions,
         "macro": mean of the per-subject accuracies (each subject weighs the same),
         "per_subject": {subject: accuracy}, "counts": {subject: n questions}, "n": total}.
    """
    if not records:
        raise ValueError("no MMLU records to score")
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for r in records:
        total[r["subject"]] += 1
        correct[r["subject"]] += int(int(r["pred"]) == int(r["answer"]))
    per_subject = {s: correct[s] / total[s] for s in sorted(total)}
    n = sum(total.values())
    return {"micro": sum(correct.values()) / n,
            "macro": sum(per_subject.values()) / len(per_subject),
            "per_subject": per_subject,
            "counts": {s: total[s] for s in sorted(total)},
            "n": n}
