"""lm-evaluation-harness against the server, and our own evals, on the same checkpoint and items.

    python bench/bench_lm_eval.py [--checkpoint out/demo/runs/sft/final] [--mmlu_limit 20] [--gsm8k_limit 100]

What a user does (README, "Evaluate with lm-evaluation-harness"), timed and checked in one run:
the tasks from eval/lm_eval_tasks.py over the synthetic sets in data/eval, inference/server.py
started as a command on the checkpoint, then the ``lm_eval`` command twice:

1. MMLU-format, ``local-completions`` (loglikelihood: echo + logprobs, 4 scored prompts per
   question) against eval/mmlu.py's letter scoring of the same prompt text in process (lm-eval's
   prompt has no document prefix, so eval/mmlu.py's own run, which puts one first, is shown too).
2. GSM8K-format, ``local-chat-completions`` with the chat template (greedy generation that stops at
   the end-of-turn token) against eval/gsm8k.py's outputs and accuracy on the same questions.

Every process runs with ``--threads`` OpenMP threads; lm-eval sends one request at a time
(its default), so its wall time includes an HTTP round trip per request.
"""
from __future__ import annotations

import sys, pathlib  # noqa: E401

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request

import torch

from utils.cli import main_guard
from utils.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
MMLU_DIR, GSM8K_TEST = REPO / "data" / "eval" / "mmlu", REPO / "data" / "eval" / "gsm8k_test.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, env: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "inference/server.py", "--checkpoint", args.checkpoint, "--port", str(port),
           "--clamp-max-tokens", "--model-name", "bench", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise UserError(f"the server did not start: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise UserError("the server did not answer /health within 120 s")


def lm_eval(out: pathlib.Path, tasks: pathlib.Path, env: dict, *args: str) -> tuple[dict, dict, float]:
    """Run the ``lm_eval`` command; returns ({task: samples by doc_id}, results, wall seconds)."""
    cmd = [sys.executable, "-m", "lm_eval", "--include_path", str(tasks), "--output_path", str(out), "--log_samples", *args]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise UserError(f"lm_eval failed: {done.stderr[-3000:]}")
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        samples[path.name[len("samples_") :].rsplit("_", 1)[0]] = sorted(rows, key=lambda r: r["doc_id"])
    return samples, json.loads(next(out.rglob("results_*.json")).read_text())["results"], seconds


def compare_mmlu(args, samples: dict, dev: list, test: list, seconds: float, work: pathlib.Path) -> None:
    from eval import mmlu
    from eval.common import EvalRecipe
    from eval.mmlu_format import format_mmlu_prompt, group_by_subject
    from model.load import load

    model, tok = load(args.checkpoint)
    letters, dev_by_subject = mmlu.letter_token_ids(tok), group_by_subject(dev)
    theirs, ours, answers = [], [], []
    start = time.perf_counter()
    for subject, rows in group_by_subject(test).items():
        prompts = [tok.encode(format_mmlu_prompt(subject, dev_by_subject.get(subject, []), r, args.mmlu_shots)) for r in rows]
        ours.append(mmlu.letter_logprobs(model, prompts, letters))
        theirs += [[float(resp[0][0]) for resp in s["resps"]] for s in samples[f"local_mmlu_{subject}"]]
        answers += [r["answer"] for r in rows]
    t_ours = time.perf_counter() - start
    if any(len(p) + 1 > model.cfg.max_seq_len for p in prompts):
        raise UserError(f"{args.mmlu_shots}-shot prompts do not fit the model's context (lm-eval would cut them); lower --mmlu_shots")
    ours_lp, theirs_lp, answers = torch.cat(ours), torch.tensor(theirs), torch.tensor(answers)
    recipe = EvalRecipe(checkpoint=args.checkpoint, source="local", data_path=str(MMLU_DIR), limit=args.mmlu_limit,
                        n_shot=args.mmlu_shots, out_dir=str(work / "mmlu"), progress=False, device="cpu")
    own = mmlu.run(recipe)
    acc = lambda lp: (lp.argmax(-1) == answers).float().mean().item()  # noqa: E731
    same = (ours_lp.argmax(-1) == theirs_lp.argmax(-1)).sum().item()
    print(f"[1] MMLU-format, {len(answers)} questions, {args.mmlu_shots}-shot, {4 * len(answers)} scored requests: "
          f"lm-eval {acc(theirs_lp):.1%} in {seconds:.0f} s   our scoring of the same prompts {acc(ours_lp):.1%} in "
          f"{t_ours:.1f} s   same choice {same}/{len(answers)}   max |logprob diff| {(theirs_lp - ours_lp).abs().max():.1e}   "
          f"eval/mmlu.py (document prefix first) {own['accuracy']:.1%}")


def compare_gsm8k(args, samples: dict, results: dict, seconds: float, work: pathlib.Path) -> None:
    from eval import gsm8k
    from eval.common import EvalRecipe

    recipe = EvalRecipe(checkpoint=args.checkpoint, source="local", data_path=str(GSM8K_TEST), limit=args.gsm8k_limit,
                        n_shot=0, max_new_tokens=args.max_gen_toks, out_dir=str(work / "gsm8k"), progress=False, device="cpu")
    start = time.perf_counter()
    own = gsm8k.run(recipe)
    t_ours = time.perf_counter() - start
    ours = [json.loads(line)["output"] for line in (work / "gsm8k" / "gsm8k_records.jsonl").read_text().splitlines()]
    theirs = [s["resps"][0][0] for s in samples["local_gsm8k"] if s["filter"] == "strict-match"]
    r = results["local_gsm8k"]
    print(f"[2] GSM8K-format, {len(ours)} questions, 0-shot chat, greedy: lm-eval strict {r['exact_match,strict-match']:.1%} "
          f"flexible {r['exact_match,flexible-extract']:.1%} in {seconds:.0f} s   eval/gsm8k.py {own['accuracy']:.1%} in "
          f"{t_ours:.0f} s (the engine, batched)   identical outputs {sum(a == b for a, b in zip(ours, theirs))}/{len(ours)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="out/demo/runs/sft/final")
    p.add_argument("--mmlu_limit", type=int, default=20, help="MMLU questions per subject")
    p.add_argument("--gsm8k_limit", type=int, default=100)
    p.add_argument("--mmlu_shots", type=int, default=2, help="the demo model's 256-token context fits 2")
    p.add_argument("--max_gen_toks", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sections", default="12")
    args = p.parse_args()
    for path in (args.checkpoint, MMLU_DIR, GSM8K_TEST):
        if not pathlib.Path(path).exists():
            raise UserError(f"{path} is missing: run `make demo` (or its data and SFT stages) first, or pass --checkpoint")
    torch.set_num_threads(args.threads)
    from eval.data import load_gsm8k, load_mmlu
    from eval.lm_eval_tasks import write_tasks

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory(prefix="bench_lm_eval_") as tmp:
        work = pathlib.Path(tmp)
        env["HF_DATASETS_CACHE"] = str(work / "hf_datasets")
        dev, test = load_mmlu("local", str(MMLU_DIR), args.mmlu_limit)
        write_tasks(work / "tasks", (dev, test), (load_gsm8k("local", str(GSM8K_TEST), args.gsm8k_limit), []),
                    args.mmlu_shots, args.max_gen_toks)
        server, url = start_server(args, env)
        try:
            with urllib.request.urlopen(url + "/v1/models") as r:  # lm-eval must be told the context
                ctx = json.load(r)["data"][0]["max_model_len"]
            runs = {}
            if "1" in args.sections:
                runs["mmlu"] = lm_eval(work / "out_mmlu", work / "tasks", env, "--model", "local-completions", "--tasks",
                                       "local_mmlu", "--model_args", f"model=bench,base_url={url}/v1/completions,max_length={ctx}")
            if "2" in args.sections:
                runs["gsm8k"] = lm_eval(work / "out_gsm8k", work / "tasks", env, "--model", "local-chat-completions",
                                        "--tasks", "local_gsm8k", "--apply_chat_template", "--fewshot_as_multiturn",
                                        "--model_args", f"model=bench,base_url={url}/v1/chat/completions")
        finally:
            server.terminate()
            server.wait(60)
        print(f"checkpoint {args.checkpoint}, {args.threads} thread(s) per process")
        if "mmlu" in runs:
            samples, _, seconds = runs["mmlu"]
            compare_mmlu(args, samples, dev, test, seconds, work)
        if "gsm8k" in runs:
            compare_gsm8k(args, *runs["gsm8k"], work)


if __name__ == "__main__":
    main_guard(main)
