"""lm-evaluation-harness tasks over this project's eval sets, so ``lm_eval`` pointed at the
OpenAI-compatible server (inference/server.py) scores the very items eval/mmlu.py and
eval/gsm8k.py score, with no hub access.

    python eval/lm_eval_tasks.py --out out/lm_eval_tasks                  # synthetic sets (data/eval)
    python eval/lm_eval_tasks.py --out out/lm_eval_tasks --mmlu_path data/ --gsm8k_path test.jsonl --shots_path train.jsonl
    lm_eval --model local-completions --tasks local_mmlu --include_path out/lm_eval_tasks --model_args ...

Writes, each over JSONL files beside its YAML:
- ``local_mmlu_<subject>`` (tag ``local_mmlu``): lm-eval's MMLU prompt, which is eval/mmlu.py's
  text: the subject line, the subject's first n dev questions with their answers, the question,
  "Answer:"; the letters " A" .. " D" scored by log-likelihood (``local-completions``).
- ``local_gsm8k``: the question as the user turn and n training problems as earlier turns,
  which with ``--apply_chat_template --fewshot_as_multiturn`` (``local-chat-completions``) is
  the chat eval/gsm8k.py renders; greedy, no stop strings (the chat format's end-of-turn stops
  it), exact match on the number after "####" (strict) or the last number (flexible).
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import yaml

from eval.common import EvalRecipe
from eval.data import load_gsm8k, load_mmlu
from eval.gsm8k import load_shots
from eval.mmlu_format import LETTERS, format_subject, group_by_subject
from utils.cli import main_guard
from utils.errors import UserError
from utils.fs import atomic_dir

MMLU_QUESTION = "{{question.strip()}}\n" + "".join(f"{x}. {{{{choices[{i}]}}}}\n" for i, x in enumerate(LETTERS)) + "Answer:"
ANSWER_AFTER_HASHES = r"#### (\-?[0-9\.\,]+)"  # GSM8K's answer line
LAST_NUMBER = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"


def _jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _task(directory: Path, final: Path, name: str, config: dict, splits: dict[str, Sequence[dict]]) -> None:
    """``name``.yaml plus a JSONL per split, written into ``directory`` but naming the files where
    they will be once ``directory`` is renamed to ``final``. An empty few-shot split is left out
    (datasets cannot read an empty JSON file), and the task then names none."""
    splits = {split: rows for split, rows in splits.items() if rows or split == config["test_split"]}
    if config["fewshot_split"] not in splits:
        config = {k: v for k, v in config.items() if k not in ("fewshot_split", "fewshot_config")}
    for split, rows in splits.items():
        _jsonl(directory / f"{name}_{split}.jsonl", rows)
    files = {split: str(final / f"{name}_{split}.jsonl") for split in splits}
    config = {"task": name, **config, "dataset_path": "json", "dataset_kwargs": {"data_files": files}}
    (directory / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")


def mmlu_tasks(directory: Path, final: Path, dev: Sequence[dict], test: Sequence[dict], n_shot: int) -> list[str]:
    """One multiple-choice task per subject of ``test``; returns the task names."""
    dev_by_subject, names = group_by_subject(dev), []
    for subject, rows in group_by_subject(test).items():
        name = f"local_mmlu_{subject}"
        shots = dev_by_subject.get(subject, [])
        config = {
            "tag": "local_mmlu", "output_type": "multiple_choice", "test_split": "test",
            "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"}, "num_fewshot": min(n_shot, len(shots)),
            "description": f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n",
            "doc_to_text": MMLU_QUESTION, "doc_to_choice": list(LETTERS), "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
        _task(directory, final, name, config, {"dev": shots, "test": rows})
        names.append(name)
    return names


def gsm8k_task(directory: Path, final: Path, problems: Sequence[dict], shots: Sequence[dict], max_gen_toks: int) -> str:
    def exact(name: str, pattern: str, **extra) -> dict:
        return {"name": name, "filter": [{"function": "regex", "regex_pattern": pattern, **extra}, {"function": "take_first"}]}

    config = {
        "output_type": "generate_until", "test_split": "test", "fewshot_split": "train",
        "fewshot_config": {"sampler": "first_n"}, "num_fewshot": len(shots),
        "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": [], "do_sample": False, "temperature": 0.0, "max_gen_toks": max_gen_toks},
        "filter_list": [exact("strict-match", ANSWER_AFTER_HASHES), exact("flexible-extract", LAST_NUMBER, group_select=-1)],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True, "ignore_case": True,
                         "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}],
    }
    _task(directory, final, "local_gsm8k", config, {"train": shots, "test": problems})
    return "local_gsm8k"


def write_tasks(out: str | Path, mmlu: Optional[tuple[list, list]], gsm8k: Optional[tuple[list, list]],
                mmlu_shots: int = 5, max_gen_toks: int = 256) -> list[str]:
    """Write the tasks into ``out`` (replaced whole, atomically); returns the task names.
    mmlu: (dev, test) records; gsm8k: (test problems, few-shot problems)."""
    final = Path(out).resolve()
    names: list[str] = []
    with atomic_dir(final) as directory:
        if mmlu is not None:
            names += mmlu_tasks(directory, final, *mmlu, mmlu_shots)
        if gsm8k is not None:
            names.append(gsm8k_task(directory, final, *gsm8k, max_gen_toks))
    return names


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/lm_eval_tasks", help="task folder for lm_eval --include_path (replaced)")
    p.add_argument("--source", default="synthetic", choices=["synthetic", "hf"], help="where sets without a path come from")
    p.add_argument("--mmlu_path", help="your MMLU copy (data/ folder or cais/mmlu snapshot); implies source local")
    p.add_argument("--gsm8k_path", help="your GSM8K test.jsonl; implies source local")
    p.add_argument("--shots_path", help="GSM8K few-shot problems (train .jsonl); default per source")
    p.add_argument("--limit", type=int, help="first N questions (MMLU: per subject)")
    p.add_argument("--mmlu_shots", type=int, default=5)
    p.add_argument("--gsm8k_shots", type=int, default=5, help="lm-eval's gsm8k default; the demo's eval uses 0")
    p.add_argument("--max_gen_toks", type=int, default=256, help="GSM8K tokens per answer (eval/gsm8k.py's max_new_tokens)")
    p.add_argument("--only", choices=["mmlu", "gsm8k"], help="write one set's tasks")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1 or min(args.mmlu_shots, args.gsm8k_shots) < 0 or args.max_gen_toks < 1:
        raise UserError("--limit and --max_gen_toks must be >= 1, --mmlu_shots and --gsm8k_shots >= 0")
    for flag in ("mmlu_path", "gsm8k_path", "shots_path"):
        if getattr(args, flag) and not Path(getattr(args, flag)).exists():
            raise UserError(f"--{flag} {getattr(args, flag)} does not exist; point it at your copy of the set")
    mmlu = gsm8k = None
    if args.only != "gsm8k":
        mmlu = load_mmlu("local" if args.mmlu_path else args.source, args.mmlu_path, args.limit)
    if args.only != "mmlu":
        recipe = EvalRecipe(source="local" if args.gsm8k_path else args.source, data_path=args.gsm8k_path,
                            shots_path=args.shots_path, limit=args.limit)
        gsm8k = (load_gsm8k(recipe.source, recipe.data_path, recipe.limit), load_shots(recipe, args.gsm8k_shots))
    names = write_tasks(args.out, mmlu, gsm8k, args.mmlu_shots, args.max_gen_toks)
    print(f"lm-eval tasks: {len(names)} in {args.out} (local_mmlu: {sum(n.startswith('local_mmlu') for n in names)} subjects"
          f"{', local_gsm8k' if gsm8k else ''}); run lm_eval with --include_path {args.out}")


if __name__ == "__main__":
    main_guard(main)
