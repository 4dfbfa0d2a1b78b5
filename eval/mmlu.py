"""MMLU: k-shot multiple choice scored by the log-probabilities of the answer letters.

    python eval/mmlu.py --checkpoint runs/sft_full_tiny/final --source synthetic
    python eval/mmlu.py --config_path configs/examples/eval_mmlu.yaml limit=5

The protocol of Hendrycks et al. (2021) and lm-eval-harness: a plain-text prompt (no chat
template) with the subject's first k dev questions and their answers, then the test question
ending in "Answer:"; the model's choice is the letter among " A", " B", " C", " D" with the
highest log-probability as the next token. Nothing is generated, so the scoring runs batched
forward passes (eval/scoring.py) instead of the engine. A prompt longer than the context loses
shots until it fits; a 0-shot prompt still too long keeps its end (lm-eval-harness truncates
from the left). Reports per-subject accuracy, micro (all questions) and macro (subject mean).
Writes out/eval/mmlu/mmlu_summary.json and mmlu_records.jsonl.
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import time
from typing import Optional, Sequence

import torch

from eval.common import EvalRecipe, context_length, load_model_and_tokenizer, out_dir, parse_eval_args, summary_header
from eval.data import load_mmlu
from eval.mmlu_format import (LETTERS, choose_letter, format_mmlu_prompt, group_by_subject, letter_continuations,
                              letter_logprobs_from_logits, mmlu_scores)
from eval.report import write_results
from eval.scoring import continuation_logprobs, next_token_logits
from utils.cli import main_guard
from utils.errors import UserError

NAME = "mmlu"
DEFAULT_N_SHOT = 5


def letter_token_ids(tok) -> list[list[int]]:
    """Token ids of " A" .. " D" (each usually one token)."""
    return [tok.encode(c) for c in letter_continuations()]


def build_prompt(tok, subject: str, dev: Sequence[dict], example: dict, k: int,
                 max_len: int) -> tuple[list[int], int, bool]:
    """Prompt ids (after an EOS document separator) with as many of the k shots as fit max_len.

    Returns (ids, shots used, truncated): truncated when even the 0-shot prompt was too long
    and only its last max_len tokens are kept.
    """
    k = min(k, len(dev))
    while True:
        # A document starts as in pretraining: our streams read "doc <eos> doc" (a leading EOS), HF models with BOS.
        ids = list(tok.document_prefix) + tok.encode(format_mmlu_prompt(subject, dev, example, k))
        if len(ids) <= max_len:
            return ids, k, False
        if k == 0:
            return ids[-max_len:], 0, True
        k -= 1


def letter_logprobs(model: torch.nn.Module, prompts: Sequence[list[int]], letter_ids: Sequence[list[int]],
                    batch_size: int = 8, pad_id: int = 0, progress: bool = False) -> torch.Tensor:
    """(N, 4) log-probabilities of the four letter continuations after each prompt.

    One forward per prompt when every letter is a single token (the usual case); otherwise
    each letter's tokens are scored as a continuation and summed.
    """
    if all(len(ids) == 1 for ids in letter_ids):
        logits = next_token_logits(model, prompts, batch_size, pad_id, progress)  # (N, V)
        return letter_logprobs_from_logits(logits, [ids[0] for ids in letter_ids])
    contexts = [p for p in prompts for _ in letter_ids]
    conts = [ids for _ in prompts for ids in letter_ids]
    return continuation_logprobs(model, contexts, conts, batch_size, pad_id, progress).view(len(prompts), len(letter_ids))


def run(recipe: EvalRecipe, model: Optional[torch.nn.Module] = None, tok=None) -> dict:
    """Evaluate; returns the summary (also written to out_dir). Tests may pass model and tok."""
    started = time.time()
    if model is None or tok is None:
        model, tok = load_model_and_tokenizer(recipe)
    dev, test = load_mmlu(recipe.source, recipe.data_path, recipe.limit)
    if not test:
        raise UserError("MMLU: no test questions to evaluate (empty set or limit=0)")
    n_shot = DEFAULT_N_SHOT if recipe.n_shot is None else recipe.n_shot
    dev_by_subject = group_by_subject(dev)
    letter_ids = letter_token_ids(tok)
    max_len = context_length(model, recipe) - max(len(ids) for ids in letter_ids) + 1  # the last letter token is only a target
    built = [build_prompt(tok, ex["subject"], dev_by_subject.get(ex["subject"], []), ex, n_shot, max_len) for ex in test]
    if n_shot and any(len(dev_by_subject.get(ex["subject"], [])) < n_shot for ex in test):
        short = sorted({ex["subject"] for ex in test if len(dev_by_subject.get(ex["subject"], [])) < n_shot})
        print(f"mmlu: {len(short)} subject(s) have fewer than {n_shot} dev questions (e.g. {short[0]}); "
              "their prompts use the ones there are")
    logprobs = letter_logprobs(model, [ids for ids, _, _ in built], letter_ids, recipe.batch_size,
                               tok.pad_id, recipe.progress)
    preds = choose_letter(logprobs).tolist()
    records = [{"idx": i, "subject": ex["subject"], "question": ex["question"], "answer": ex["answer"],
                "pred": pred, "correct": pred == ex["answer"], "letter_logprobs": [round(x, 5) for x in lp],
                "n_shot": k, "prompt_tokens": len(ids), "truncated": cut}
               for i, (ex, pred, lp, (ids, k, cut)) in enumerate(zip(test, preds, logprobs.tolist(), built))]
    scores = mmlu_scores(records)
    used = [k for _, k, _ in built]
    summary = {**summary_header(NAME, recipe, started), "accuracy": scores["micro"], **scores,
               "n_subjects": len(scores["per_subject"]), "n_shot": n_shot, "mean_shots_used": sum(used) / len(used),
               "prompts_with_fewer_shots": sum(k < n_shot for k in used),
               "truncated_prompts": sum(cut for _, _, cut in built),
               "letters_single_token": all(len(ids) == 1 for ids in letter_ids),
               "pred_distribution": {LETTERS[j]: preds.count(j) for j in range(4)}}
    summary_path, _ = write_results(out_dir(recipe, NAME), NAME, summary, records)
    print(f"mmlu: micro {scores['micro']:.1%}, macro {scores['macro']:.1%} over {scores['n']} questions in "
          f"{summary['n_subjects']} subjects, {n_shot}-shot ({summary['mean_shots_used']:.1f} used), "
          f"source {recipe.source} -> {summary_path}")
    return summary


def main(argv: Optional[list[str]] = None) -> None:
    run(parse_eval_args(NAME, "MMLU accuracy by answer-letter log-probabilities.", argv))


if __name__ == "__main__":
    main_guard(main)
