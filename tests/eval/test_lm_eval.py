"""lm-evaluation-harness (the real ``lm_eval`` command) against the OpenAI-compatible server, on
tasks eval/lm_eval_tasks.py writes from the project's synthetic MMLU- and GSM8K-format data:
``local-completions`` loglikelihood gives eval/mmlu.py's letter scores and accuracy for the same
prompts; ``local-chat-completions`` greedy generation gives eval/gsm8k.py's outputs, item by item.
lm-eval finds the server's tokenizer through /tokenizer_info and /tokenize (no hub, no local
tokenizer), passing the server's API key. lm-eval is a test-only dependency (requirements-dev.txt)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipeline.download.download_prompts import synthetic_math, synthetic_mmlu
from eval import gsm8k
from eval.common import EvalRecipe
from eval.lm_eval_tasks import write_tasks
from eval.mmlu import letter_logprobs, letter_token_ids
from eval.mmlu_format import format_mmlu_prompt, group_by_subject
from inference import server
from inference.async_engine import AsyncEngine
from inference.engine import LLMEngine
from tests.inference import test_server_helpers as H

pytest.importorskip("lm_eval")

CTX, MMLU_SHOTS, GEN_TOKENS = 512, 2, 24
KEY = "sk-local-test"  # the server requires it, as `--api-key` does
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random checkpoint, the lm-eval tasks, and the server on that checkpoint."""
    root = tmp_path_factory.mktemp("lm_eval")
    ckpt = H.tiny_checkpoint(root / "ckpt", H.train_tokenizer(root / "tokenizer.json"), max_seq_len=CTX)
    dev, test = synthetic_mmlu(seed=0, n_test=10, dev_per_subject=MMLU_SHOTS)
    shots, _, problems = synthetic_math(seed=0, n_train=1, n_rl_test=0, n_gsm8k=4)
    write_tasks(root / "tasks", (dev, test), (problems, shots), MMLU_SHOTS, GEN_TOKENS)
    engine = LLMEngine.from_checkpoint(str(ckpt), max_model_len=CTX)
    settings = server.ServerSettings(model_name="tiny", max_model_len=CTX, clamp_max_tokens=True, api_key=KEY)
    with H.LiveServer(server.build_app(AsyncEngine(engine), engine.tokenizer, settings)) as url:
        yield {"root": root, "ckpt": ckpt, "url": url, "model": engine.model, "tok": engine.tokenizer,
               "mmlu": (dev, test), "gsm8k": (problems, shots)}


def lm_eval(world, name: str, *args: str) -> dict:
    """Run the lm_eval command as a user does; returns {task: [samples, by doc_id]} and the results."""
    out = world["root"] / f"out_{name}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(world["root"] / "hf_datasets"), OMP_NUM_THREADS="1",
               OPENAI_API_KEY=KEY)  # what lm-eval's local-* models send as the bearer token
    cmd = [sys.executable, "-m", "lm_eval", "--include_path", str(world["root"] / "tasks"), "--output_path", str(out),
           "--log_samples", *args]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name[len("samples_") :].rsplit("_", 1)[0]
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        samples[task] = sorted(rows, key=lambda r: r["doc_id"])
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    return samples, results


def test_zero_shot_tasks_load_in_lm_eval(tmp_path, monkeypatch):
    """The README's `--gsm8k_shots 0` (and MMLU with no dev questions): lm-eval must load the tasks.
    An empty few-shot split file made datasets' JSON reader raise StopIteration inside lm_eval."""
    from lm_eval.tasks import TaskManager, get_task_dict

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dev, test = synthetic_mmlu(seed=0, n_test=5, dev_per_subject=1)
    _, _, problems = synthetic_math(seed=0, n_train=1, n_rl_test=0, n_gsm8k=3)
    names = write_tasks(tmp_path / "tasks", ([], test), (problems, []), 0, 8)
    tasks = get_task_dict(names, TaskManager(include_path=str(tmp_path / "tasks")))
    assert sorted(tasks) == sorted(names)
    assert len(list(tasks["local_gsm8k"].test_docs())) == 3
    assert sum(len(list(tasks[n].test_docs())) for n in names if n.startswith("local_mmlu")) == 5


@pytest.mark.slow
def test_lm_eval_multiple_choice_equals_eval_mmlu(world):
    url, model, tok = world["url"], world["model"], world["tok"]
    samples, results = lm_eval(world, "mmlu", "--model", "local-completions", "--tasks", "local_mmlu",
                               "--model_args", f"model=tiny,base_url={url}/v1/completions,max_length={CTX},auth_token={KEY}")
    dev, test = world["mmlu"]
    dev_by_subject, letters = group_by_subject(dev), letter_token_ids(tok)
    n_correct = n = 0
    for subject, rows in group_by_subject(test).items():
        got = samples[f"local_mmlu_{subject}"]
        assert [s["doc"]["question"] for s in got] == [r["question"] for r in rows]
        # eval/mmlu.py's scoring of the prompt lm-eval sends (its text; no document prefix)
        prompts = [tok.encode(format_mmlu_prompt(subject, dev_by_subject[subject], r, MMLU_SHOTS)) for r in rows]
        assert all(len(p) + 1 < CTX for p in prompts), "prompts must fit, or lm-eval truncates them"
        ours = letter_logprobs(model, prompts, letters)  # (N, 4)
        theirs = torch.tensor([[float(resp[0][0]) for resp in s["resps"]] for s in got])  # logged as strings
        assert torch.allclose(theirs, ours, atol=1e-4, rtol=0), (theirs - ours).abs().max()
        acc = (ours.argmax(-1) == torch.tensor([r["answer"] for r in rows])).float().mean().item()
        assert results[f"local_mmlu_{subject}"]["acc,none"] == pytest.approx(acc)
        n_correct, n = n_correct + acc * len(rows), n + len(rows)
    assert 0 < n_correct < n, "a random model gets some right, some wrong: the comparison can fail"


@pytest.mark.slow
def test_lm_eval_chat_generation_equals_eval_gsm8k(world):
    url, root = world["url"], world["root"]
    samples, results = lm_eval(world, "gsm8k", "--model", "local-chat-completions", "--tasks", "local_gsm8k",
                               "--apply_chat_template", "--fewshot_as_multiturn",
                               "--model_args", f"model=tiny,base_url={url}/v1/chat/completions")
    recipe = EvalRecipe(checkpoint=str(world["ckpt"]), source="local", data_path=str(root / "tasks" / "local_gsm8k_test.jsonl"),
                        shots_path=str(root / "tasks" / "local_gsm8k_train.jsonl"), n_shot=1, max_new_tokens=GEN_TOKENS,
                        out_dir=str(root / "ours"), progress=False, device="cpu")
    summary = gsm8k.run(recipe)
    ours = [json.loads(line) for line in (root / "ours" / "gsm8k_records.jsonl").read_text().splitlines()]
    theirs = [s for s in samples["local_gsm8k"] if s["filter"] == "strict-match"]  # a sample per filter, same output
    assert len(theirs) == len(ours) == summary["n"] == 4
    assert [s["resps"][0][0] for s in theirs] == [r["output"] for r in ours]
    assert any(r["output"] for r in ours)
    assert summary["accuracy"] == gsm8k.score(world["gsm8k"][0], [{"text": s["resps"][0][0]} for s in theirs])[0]["accuracy"]
    assert "exact_match,strict-match" in results["local_gsm8k"]
