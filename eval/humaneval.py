"""HumanEval: n completions per task through the engine, executed against the tests, pass@k.

    python eval/humaneval.py --checkpoint runs/sft_full_tiny/final --source synthetic
    python eval/humaneval.py --config_path configs/examples/eval_humaneval.yaml n_samples=20 temperature=0.8

The prompt is the task's code (signature + docstring) as plain text, as in Chen et al. (2021);
the model continues it. Generation stops at the Codex stop sequences (a new top-level
"class", "def", "#", "if" or "print"), and the completion is cut there. Every completion runs
in a sandboxed subprocess (eval/humaneval_exec.py: bubblewrap when installed, an audit hook,
time and memory limits, no network, no process spawning, no files outside its own directory); pass@k is the unbiased estimator over the n samples per task, for each
k <= n in k_list. temperature 0 with n_samples 1 is greedy pass@1; the Codex paper samples
n=200 at T=0.8 for pass@100. A task whose prompt does not fit the context is not generated: it
counts as failed, and the summary says how many ("errors"; outcome "not generated", with the
engine's reason in its records). Writes out/eval/humaneval/humaneval_summary.json and
humaneval_records.jsonl (one line per completion).
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import time
from typing import Callable, Optional, Sequence

from eval.common import EvalRecipe, load_tokenizer, out_dir, parse_eval_args, summary_header, engine_summary
from eval.data import load_humaneval
from eval.humaneval_exec import evaluate_completions
from eval.report import write_results
from utils.cli import main_guard
from utils.errors import UserError

NAME = "humaneval"
STOP_SEQUENCES = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # Chen et al. (2021), section 2.3

# prompts (token ids), n -> n samples per prompt, each {"text"} or, when the engine could not run the
# prompt (longer than the context), {"text": "", "error": why}; the engine in real runs, a stub in tests
Generate = Callable[[list[list[int]], int], list[list[dict]]]


def truncate_at_stops(completion: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """The completion up to the first stop sequence (the function body, nothing after it)."""
    cut = min((i for i in (completion.find(s) for s in stops) if i >= 0), default=len(completion))
    return completion[:cut]


def encode_prompt(tok, prompt: str) -> list[int]:
    """Plain-text prompt ids after what starts a document for this tokenizer (ours: EOS, the pretraining
    separator; an imported model: its BOS)."""
    return list(tok.document_prefix) + tok.encode(prompt)


def engine_generate(recipe: EvalRecipe, tok) -> Generate:
    """`generate` over the engine for the recipe's checkpoint (stop strings, seeds per task)."""
    from eval.common import load_model, make_engine
    from inference.sampling_params import SamplingParams

    engine = make_engine(load_model(recipe), tok, recipe)
    ctx = engine.max_model_len

    def generate(prompts: list[list[int]], n: int) -> list[list[dict]]:
        params = [SamplingParams(max_tokens=max(1, min(recipe.max_new_tokens, ctx - len(p))), n=n,
                                 temperature=recipe.temperature, top_p=recipe.top_p,
                                 seed=recipe.seed + i if recipe.temperature > 0 else None,
                                 stop=list(STOP_SEQUENCES)) for i, p in enumerate(prompts)]
        completions = engine.generate(prompts, params, use_tqdm=recipe.progress)
        return [[{"text": o.text or "", **({"error": o.error} if o.error else {})} for o in c.outputs]
                for c in completions]

    generate.engine = engine  # the summary reports its speculative acceptance rate
    return generate


def run(recipe: EvalRecipe, generate: Optional[Generate] = None) -> dict:
    """Evaluate; returns the summary (also written to out_dir). `generate` replaces the engine
    (tests pass the canonical solutions through it)."""
    started = time.time()
    if recipe.temperature == 0 and recipe.n_samples > 1:
        raise UserError(f"n_samples={recipe.n_samples} with temperature=0: greedy samples are all the same; "
                        "set temperature (e.g. 0.8) for pass@k with k > 1, or n_samples=1")
    tok = load_tokenizer(recipe)
    problems = load_humaneval(recipe.source, recipe.data_path, recipe.limit)
    if not problems:
        raise UserError("HumanEval: no tasks to evaluate (empty set or limit=0)")
    if generate is None:
        generate = engine_generate(recipe, tok)
    t_gen = time.time()
    raw = generate([encode_prompt(tok, p["prompt"]) for p in problems], recipe.n_samples)
    gen_seconds = time.time() - t_gen
    # a sample the engine could not generate (None) fails without running, and is counted
    completions = {p["task_id"]: [None if o.get("error") else truncate_at_stops(o["text"]) for o in outs]
                   for p, outs in zip(problems, raw, strict=True)}
    errors = {p["task_id"]: outs[0]["error"] for p, outs in zip(problems, raw) if outs[0].get("error")}
    metrics, records = evaluate_completions(problems, completions, k_list=recipe.k_list, n_workers=recipe.n_workers,
                                            timeout_s=recipe.timeout_s, memory_mb=recipe.memory_mb,
                                            progress=recipe.progress, sandbox=recipe.sandbox)
    for r in records:
        if r["result"] == "not generated":
            r["error"] = errors[r["task_id"]]
    skipped = [k for k in recipe.k_list if f"pass@{k}" not in metrics]
    summary = {**summary_header(NAME, recipe, started), **metrics, "n_samples_per_task": recipe.n_samples,
               "temperature": recipe.temperature, "k_skipped": skipped, "errors": len(errors),
               "generation_seconds": round(gen_seconds, 2), **engine_summary(generate)}
    summary_path, _ = write_results(out_dir(recipe, NAME), NAME, summary, records)
    if errors:
        first = next(iter(errors.items()))
        print(f"humaneval: {len(errors)} of {len(problems)} tasks were not generated and count as failed "
              f"(e.g. {first[0]}: {first[1]})")
    passes = ", ".join(f"{k} {v:.1%}" for k, v in metrics.items() if k.startswith("pass@"))
    print(f"humaneval: {passes} on {metrics['n_problems']} tasks x {recipe.n_samples} samples "
          f"(T={recipe.temperature}), outcomes {metrics['outcomes']}, source {recipe.source}, sandbox "
          f"{metrics['sandbox']} -> {summary_path}")
    return summary


def main(argv: Optional[list[str]] = None) -> None:
    run(parse_eval_args(NAME, "HumanEval pass@k with sandboxed execution.", argv))


if __name__ == "__main__":
    main_guard(main)
