"""GSM8K: n-shot chat prompts, generation through the engine, exact-match accuracy.

    python eval/gsm8k.py --checkpoint runs/sft_full_tiny/final --source synthetic --n_shot 0
    python eval/gsm8k.py --config_path configs/examples/eval_gsm8k.yaml limit=50

Each test question becomes a chat (the one template, data_pipeline/tokenizer/chat_template.py):
the n few-shot problems as earlier user/assistant turns (question -> full worked solution
ending in "#### <number>"), then the question as the last user turn. All prompts go to the
engine in one batched ``generate`` call (greedy unless temperature > 0); the answer is the
number after the last "####" (else the last number) and must equal the reference exactly.
Few-shot problems come from training data, never the test set: synthetic -> the data
pipeline's RL train prompts, hf -> the GSM8K train split, local -> shots_path.
Prompts that do not fit the context lose shots (the last ones first) until they do.
Writes out/eval/gsm8k/gsm8k_summary.json and gsm8k_records.jsonl.
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import time
from typing import Callable, Optional, Sequence

from data_pipeline.answer import ends_with_answer_line, extract_gsm8k_answer, extract_hash_answer
from data_pipeline.download.eval_files import gsm8k_problems, read_records
from eval.common import REPO_ROOT, EvalRecipe, load_tokenizer, out_dir, parse_eval_args, summary_header, engine_summary
from eval.data import DOWNLOAD_CMD, _hf_stream, load_gsm8k
from eval.report import write_results
from utils.cli import main_guard
from utils.errors import UserError

NAME = "gsm8k"
DEFAULT_N_SHOT = 5  # lm-eval-harness's gsm8k default
SYNTHETIC_SHOTS = REPO_ROOT / "data" / "prompts" / "rl_train.jsonl"

# prompts (token ids) -> [{"text": output, ...extra record fields}], same order;
# the engine in real runs, a stub in tests
Generate = Callable[[list[list[int]]], list[dict]]


def load_shots(recipe: EvalRecipe, n: int) -> list[dict]:
    """The first n training problems {"question", "answer"} used as few-shot turns."""
    if n == 0:
        return []
    if recipe.shots_path:
        path = pathlib.Path(recipe.shots_path)
        if not path.is_file():
            raise UserError(f"shots_path {path} does not exist; point it at a .jsonl of question/answer problems")
        rows = read_records(path)
    elif recipe.source == "hf":
        rows = [r for _, r in zip(range(n), _hf_stream("openai/gsm8k", "main", "train"))]
        path = "openai/gsm8k (train)"
    elif recipe.source == "synthetic":
        if not SYNTHETIC_SHOTS.is_file():
            raise UserError(f"the few-shot problems {SYNTHETIC_SHOTS} are missing; create them with "
                            f"`{DOWNLOAD_CMD}`, or run with n_shot=0")
        path, rows = SYNTHETIC_SHOTS, read_records(SYNTHETIC_SHOTS)
    else:
        raise UserError(f"n_shot={n} with --source local needs shots_path=<train .jsonl with question/answer> "
                        "(few-shot examples must not come from the test set), or n_shot=0")
    if len(rows) < n:
        raise UserError(f"n_shot={n} but {path} holds only {len(rows)} problems; lower n_shot")
    return gsm8k_problems(rows[:n], str(path))  # each shot shows the "#### N" answer line


def chat_messages(shots: Sequence[dict], question: str) -> list[dict]:
    """Few-shot problems as earlier user/assistant turns, then the question."""
    messages = []
    for s in shots:
        messages += [{"role": "user", "content": s["question"]}, {"role": "assistant", "content": s["answer"]}]
    return messages + [{"role": "user", "content": question}]


def build_prompt(tok, shots: Sequence[dict], question: str, max_prompt_len: int) -> tuple[list[int], int]:
    """Chat prompt ids for `question` with as many of `shots` as fit in max_prompt_len tokens.

    Returns (ids, shots used). With no shots the prompt is returned even if too long:
    the engine then reports it as an error for that one example.
    """
    from data_pipeline.tokenizer.chat_template import render_chat

    k = len(shots)
    while True:
        ids, _ = render_chat(tok, chat_messages(shots[:k], question), add_generation_prompt=True)
        if len(ids) <= max_prompt_len or k == 0:
            return ids, k
        k -= 1


def score(problems: Sequence[dict], outputs: Sequence[dict]) -> tuple[dict, list[dict]]:
    """Exact-match accuracy and format rate of `outputs` ({"text", ...}) against the references.

    Returns (metrics, records); a record per problem with the prediction and reference answer.
    """
    records = []
    for i, (p, out) in enumerate(zip(problems, outputs, strict=True)):
        text = out["text"]
        gold = extract_hash_answer(p["answer"])
        pred = extract_gsm8k_answer(text)
        records.append({"idx": i, "question": p["question"], "output": text, "pred": pred, "gold": gold,
                        "correct": pred is not None and pred == gold, "formatted": ends_with_answer_line(text),
                        **{k: v for k, v in out.items() if k != "text"}})
    n = len(records)
    n_correct = sum(r["correct"] for r in records)
    n_formatted = sum(r["formatted"] for r in records)
    metrics = {"accuracy": n_correct / n if n else 0.0, "format_rate": n_formatted / n if n else 0.0,
               "n": n, "n_correct": n_correct, "n_formatted": n_formatted}
    return metrics, records


def engine_generate(recipe: EvalRecipe, tok) -> tuple[Generate, int]:
    """(generate over the engine, the engine's context length) for the recipe's checkpoint."""
    from data_pipeline.tokenizer.chat_template import chat_stop_ids
    from eval.common import load_model, make_engine
    from inference.sampling_params import SamplingParams

    engine = make_engine(load_model(recipe), tok, recipe)
    ctx = engine.max_model_len

    def generate(prompts: list[list[int]]) -> list[dict]:
        params = [SamplingParams(max_tokens=max(1, min(recipe.max_new_tokens, ctx - len(p))),
                                 temperature=recipe.temperature, top_p=recipe.top_p,
                                 seed=recipe.seed + i if recipe.temperature > 0 else None,
                                 stop_token_ids=chat_stop_ids(tok), calculator=recipe.calculator)
                  for i, p in enumerate(prompts)]
        completions = engine.generate(prompts, params, use_tqdm=recipe.progress)
        return [{"text": tok.decode(c.outputs[0].token_ids), "finish_reason": c.outputs[0].finish_reason,
                 "n_generated": len(c.outputs[0].token_ids), **({"error": c.outputs[0].error} if c.outputs[0].error else {})}
                for c in completions]

    generate.engine = engine  # the summary reports its speculative acceptance rate
    return generate, ctx


def run(recipe: EvalRecipe, generate: Optional[Generate] = None, context: Optional[int] = None) -> dict:
    """Evaluate; returns the summary (also written to out_dir). `generate`/`context` replace the
    engine (tests feed reference solutions through it)."""
    started = time.time()
    tok = load_tokenizer(recipe)
    problems = load_gsm8k(recipe.source, recipe.data_path, recipe.limit)
    if not problems:
        raise UserError("GSM8K: no problems to evaluate (empty set or limit=0)")
    n_shot = DEFAULT_N_SHOT if recipe.n_shot is None else recipe.n_shot
    shots = load_shots(recipe, n_shot)
    if generate is None:
        generate, context = engine_generate(recipe, tok)
    context = context or 1 << 30
    max_prompt_len = max(1, context - recipe.max_new_tokens)
    built = [build_prompt(tok, shots, p["question"], max_prompt_len) for p in problems]
    prompts = [ids for ids, _ in built]
    t_gen = time.time()
    outputs = generate(prompts)
    gen_seconds = time.time() - t_gen
    for out, (ids, k) in zip(outputs, built, strict=True):
        out.update(n_shot=k, prompt_tokens=len(ids))
    metrics, records = score(problems, outputs)
    used = [k for _, k in built]
    summary = {**summary_header(NAME, recipe, started), **metrics, "n_shot": n_shot,
               "mean_shots_used": sum(used) / len(used), "prompts_with_fewer_shots": sum(k < n_shot for k in used),
               "errors": sum(1 for r in records if r.get("finish_reason") == "error"),
               "generation_seconds": round(gen_seconds, 2), "calculator": recipe.calculator, **engine_summary(generate)}
    summary_path, _ = write_results(out_dir(recipe, NAME), NAME, summary, records)
    print(f"gsm8k: accuracy {metrics['accuracy']:.1%} ({metrics['n_correct']}/{metrics['n']}), "
          f"format {metrics['format_rate']:.1%}, {n_shot}-shot ({summary['mean_shots_used']:.1f} used)"
          f"{', calculator on' if recipe.calculator else ''}, "
          f"source {recipe.source} -> {summary_path}")
    return summary


def main(argv: Optional[list[str]] = None) -> None:
    run(parse_eval_args(NAME, "GSM8K exact-match accuracy through the inference engine.", argv))


if __name__ == "__main__":
    main_guard(main)
