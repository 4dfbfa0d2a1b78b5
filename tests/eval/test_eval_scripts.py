"""The four eval scripts end to end, on a tiny random model and a tiny tokenizer built here.

Checks numbers, not just that files appear: perplexity against a plain full forward and a
token-by-token brute force, GSM8K/HumanEval scoring 100% when fed the reference solutions,
MMLU picking the letter a stub model's known logits favour, batched padded scoring equal to
unpadded forwards, and generation going through LLMEngine.
"""
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval.data as eval_data
from eval import common, gsm8k, humaneval, mmlu, perplexity
from eval.common import EvalRecipe, parse_eval_args
from tests.utils.faults import flip_bytes, safetensors_data_start
from eval.scoring import continuation_logprobs, next_token_logits, sliding_window_nll, sliding_windows
from utils.config import load_config
from utils.errors import UserError

torch.set_num_threads(1)  # tiny models: threads only wait on each other on the shared 2-core box


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tokenizer, a tiny random checkpoint, and the synthetic eval sets under one temp dir."""
    from data_pipeline.jsonl import write_jsonl
    from data_pipeline.synthetic import arithmetic
    from data_pipeline.synthetic import mmlu as syn_mmlu
    from data_pipeline.synthetic.humaneval import humaneval_tasks
    from data_pipeline.tokenizer.tokenizer import Tokenizer
    from data_pipeline.tokenizer.train_tokenizer import train_hf
    from model import ModelConfig, Transformer
    from utils.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("evalworld")
    rng = random.Random(0)
    math_train = [arithmetic.generate_problem(rng) for _ in range(20)]
    math_test = [arithmetic.generate_problem(rng) for _ in range(6)]
    dev, test = [], []
    for subject in syn_mmlu.SUBJECTS[:2]:
        items = [syn_mmlu.generate_question(rng, subject) for _ in range(7)]
        dev += items[:5]
        test += items[5:]
    tasks = humaneval_tasks(random.Random(0), 3)
    texts = [p["question"] + "\n" + p["answer"] for p in math_train + math_test]
    texts += [syn_mmlu.format_multiple_choice(q) for q in dev + test] + [t["prompt"] + t["canonical_solution"] for t in tasks]
    texts += ["Answer: A B C D"] * 20  # so " A".." D" become single tokens, as in real tokenizers
    train_hf(texts, 400, False).save(str(root / "tokenizer.json"))
    tok = Tokenizer.from_file(root / "tokenizer.json")

    write_jsonl(root / "eval" / "gsm8k_test.jsonl", math_test)
    write_jsonl(root / "eval" / "mmlu" / "dev.jsonl", dev)
    write_jsonl(root / "eval" / "mmlu" / "test.jsonl", test)
    write_jsonl(root / "eval" / "humaneval.jsonl", tasks)
    write_jsonl(root / "rl_train.jsonl", math_train)

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                                    max_seq_len=256)).eval()
    ckpt = save_checkpoint(root / "ckpt", model, tokenizer_path=root / "tokenizer.json")
    return {"root": root, "tok": tok, "model": model, "ckpt": ckpt, "gsm8k": math_test, "tasks": tasks,
            "mmlu_test": test, "shots": math_train}


@pytest.fixture
def synthetic(world, monkeypatch):
    """Point the loaders' synthetic source (and GSM8K's few-shot file) at the test's sets."""
    monkeypatch.setattr(eval_data, "SYNTHETIC_DIR", world["root"] / "eval")
    monkeypatch.setattr(gsm8k, "SYNTHETIC_SHOTS", world["root"] / "rl_train.jsonl")
    return world


def recipe(world, tmp_path, **kw) -> EvalRecipe:
    return EvalRecipe(checkpoint=str(world["ckpt"]), out_dir=str(tmp_path / "out"), progress=False, **kw)


def read_out(tmp_path, name):
    summary = json.loads((tmp_path / "out" / f"{name}_summary.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "out" / f"{name}_records.jsonl").read_text().splitlines()]
    return summary, records


def full_forward_nll(model, tokens) -> np.ndarray:
    """-log p(tokens[t] | tokens[:t]) for t >= 1 from one plain forward over the whole sequence."""
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))[None]
    with torch.no_grad():
        logits = model(ids)[0, :-1].float()
    return F.cross_entropy(logits, ids[0, 1:], reduction="none").numpy()


# ----------------------------------------------------------------------------- scoring core

@pytest.mark.parametrize("n,window,stride", [(2, 4, 4), (10, 4, 4), (10, 4, 1), (37, 8, 3), (37, 8, 8), (9, 16, 5)])
def test_sliding_windows_score_every_token_once_with_max_context(n, window, stride):
    scored = []
    for begin, end, first in sliding_windows(n, window, stride):
        assert 0 <= begin < end <= n - 1 and end - begin <= window and 0 <= first < end - begin
        for j in range(first, end - begin):
            t = begin + j + 1  # target index
            context = t - begin
            assert min(t, window - stride + 1) <= context <= window
            scored.append(t)
    assert scored == list(range(1, n))


def test_perplexity_matches_a_plain_full_forward_and_stride_does_not_change_it(world):
    model, tokens = world["model"], np.random.default_rng(0).integers(0, world["tok"].vocab_size, 60)
    direct = full_forward_nll(model, tokens)  # 59 targets: the sequence fits one 64-token window
    for stride in (64, 16, 7):
        nll = sliding_window_nll(model, tokens, window=64, stride=stride, batch_size=3)
        np.testing.assert_allclose(nll, direct, rtol=0, atol=1e-5)
    assert math.isclose(math.exp(nll.mean()), math.exp(direct.mean()), rel_tol=1e-6)


def test_stride_one_gives_each_token_the_last_window_tokens_as_context(world):
    model, tokens = world["model"], np.random.default_rng(1).integers(0, world["tok"].vocab_size, 30)
    window = 8
    brute = np.array([full_forward_nll(model, tokens[max(0, t - window): t + 1])[-1] for t in range(1, 30)])
    np.testing.assert_allclose(sliding_window_nll(model, tokens, window, 1, batch_size=4), brute, atol=1e-5)
    # non-overlapping windows give less context, so a different (here: any) value; still finite
    assert np.isfinite(sliding_window_nll(model, tokens, window, window)).all()


def test_batched_padded_scoring_equals_unpadded_forwards(world):
    model = world["model"]
    rng = np.random.default_rng(2)
    prompts = [rng.integers(5, 300, n).tolist() for n in (3, 11, 1, 7, 20)]
    got = next_token_logits(model, prompts, batch_size=2, pad_id=0)
    with torch.no_grad():
        want = torch.stack([model(torch.tensor([p]))[0, -1] for p in prompts])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    conts = [rng.integers(5, 300, n).tolist() for n in (1, 3, 2, 4, 1)]
    lp = continuation_logprobs(model, prompts, conts, batch_size=3)
    for i, (p, c) in enumerate(zip(prompts, conts)):
        want_i = -full_forward_nll(model, p + c)[len(p) - 1:].sum()
        assert abs(lp[i].item() - want_i) < 1e-4


# ----------------------------------------------------------------------------- perplexity script

def test_perplexity_script_on_text_and_bin(world, tmp_path):
    tok, model = world["tok"], world["model"]
    docs = [p["question"] for p in world["gsm8k"][:4]]
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    s = perplexity.run(recipe(world, tmp_path, text_path=str(tmp_path / "held.jsonl"), window=64, stride=32,
                              batch_size=2), model, tok)
    tokens = perplexity.encode_stream(tok, docs)
    assert tokens.tolist() == sum((tok.encode(d) + [tok.eos_id] for d in docs), [])
    direct = np.concatenate([sliding_window_nll(model, tokens, 64, 64)])
    assert s["n_tokens"] == len(tokens) - 1 and s["n_docs"] == 4
    assert math.isclose(s["perplexity"], math.exp(direct.astype(np.float64).mean()), rel_tol=1e-4)
    # bits per byte: every byte of the text except the unscored first token's
    n_bytes = sum(len(d.encode()) for d in docs) - len(tok.decode(tokens[:1].tolist()).encode())
    assert s["n_bytes"] == n_bytes
    assert math.isclose(s["bits_per_byte"], s["total_nll"] / math.log(2) / n_bytes, rel_tol=1e-9)
    _, records = read_out(tmp_path, "perplexity")
    assert len(records) == 4 and math.isclose(sum(r["nll"] for r in records), s["total_nll"], rel_tol=1e-6)

    # the same stream as a pretraining val bin, through the command line
    bins = tmp_path / "bins"
    bins.mkdir()
    tokens.astype(np.uint16).tofile(bins / "val.bin")
    (bins / "meta.json").write_text(json.dumps({"format": "pretrain", "dtype": "uint16", "eos_id": tok.eos_id,
                                                "tokenizer_hash": tok.hash, "n_tokens": {"val": len(tokens)}}))
    perplexity.main(["--checkpoint", str(world["ckpt"]), f"bin_path={bins / 'val.bin'}", "window=64",
                     "stride=32", f"--out_dir={tmp_path / 'out'}", "progress=false"])
    s_bin, _ = read_out(tmp_path, "perplexity")
    assert math.isclose(s_bin["perplexity"], s["perplexity"], rel_tol=1e-6) and s_bin["n_bytes"] == n_bytes
    perplexity.main(["--checkpoint", str(world["ckpt"]), f"bin_path={bins / 'val.bin'}", "--limit", "2",
                     f"--out_dir={tmp_path / 'out'}", "progress=false"])
    assert read_out(tmp_path, "perplexity")[0]["n_docs"] == 2

    meta = json.loads((bins / "meta.json").read_text())
    (bins / "meta.json").write_text(json.dumps({**meta, "tokenizer_hash": "0" * 16}))
    with pytest.raises(UserError, match="tokenizer"):
        perplexity.main(["--checkpoint", str(world["ckpt"]), f"bin_path={bins / 'val.bin'}", "progress=false"])


def test_perplexity_of_a_hopeless_model_is_inf_not_an_overflow():
    assert perplexity.perplexity_metrics(800.0 * 10, 10, 40)["perplexity"] == math.inf  # OverflowError before
    assert perplexity.perplexity_metrics(2.0 * 10, 10, 40)["perplexity"] == pytest.approx(math.exp(2.0))


@pytest.mark.parametrize("damage,fragment", [
    (lambda d: flip_bytes(d / "model.safetensors", 8, seed=1, start=safetensors_data_start(d / "model.safetensors")),
     "model.safetensors does not match the checksum"),  # an OverflowError traceback before
    (lambda d: (d / "model_config.json").write_text('{"d_model": "big"}'), "invalid model config"),
    (lambda d: (d / "meta.json").write_text("\x00garbage{"), "meta.json is not valid JSON"),
])
def test_perplexity_on_a_damaged_checkpoint_is_one_clear_error(world, tmp_path, damage, fragment):
    import shutil

    ckpt = shutil.copytree(world["ckpt"], tmp_path / "ckpt")
    damage(ckpt)
    with pytest.raises(UserError, match=fragment):
        perplexity.main(["--checkpoint", str(ckpt), f"--text_path={tmp_path / 'x.jsonl'}", "progress=false"])


# ----------------------------------------------------------------------------- GSM8K

def test_gsm8k_reference_solutions_score_100_percent(synthetic, tmp_path):
    problems = synthetic["gsm8k"]
    seen = {}

    def oracle(prompts):
        seen["prompts"] = prompts
        return [{"text": p["answer"]} for p in problems]

    s = gsm8k.run(recipe(synthetic, tmp_path, n_shot=2, max_new_tokens=64), generate=oracle, context=512)
    assert s["accuracy"] == 1.0 and s["format_rate"] == 1.0 and s["n"] == len(problems) and s["mean_shots_used"] == 2
    _, records = read_out(tmp_path, "gsm8k")
    assert all(r["correct"] and r["pred"] == r["gold"] for r in records)
    # the prompt is the one chat template: shots as earlier user/assistant turns, then the question
    from data_pipeline.tokenizer.chat_template import render_chat

    shots = synthetic["shots"][:2]
    want = render_chat(synthetic["tok"], gsm8k.chat_messages(shots, problems[0]["question"]), add_generation_prompt=True)[0]
    assert seen["prompts"][0] == want

    wrong = gsm8k.run(recipe(synthetic, tmp_path, n_shot=0),
                      generate=lambda prompts: [{"text": "I think 12345.5"} for _ in prompts])
    assert wrong["accuracy"] == 0.0 and wrong["format_rate"] == 0.0


def test_gsm8k_drops_shots_that_do_not_fit_the_context(synthetic):
    tok, shots, q = synthetic["tok"], synthetic["shots"][:5], synthetic["gsm8k"][0]["question"]
    full, k = gsm8k.build_prompt(tok, shots, q, 10_000)
    zero, k0 = gsm8k.build_prompt(tok, shots, q, 1)
    assert k == 5 and k0 == 0 and len(zero) < len(full)
    mid, k_mid = gsm8k.build_prompt(tok, shots, q, len(full) - 1)
    assert 0 < k_mid < 5 and len(mid) <= len(full) - 1


def test_gsm8k_script_generates_through_the_engine(synthetic, tmp_path, monkeypatch):
    from inference.engine import LLMEngine

    calls = []
    real = LLMEngine.generate

    def spy(self, prompts, params=None, use_tqdm=False):
        calls.append((len(prompts), {p.calculator for p in params}))
        return real(self, prompts, params, use_tqdm)

    monkeypatch.setattr(LLMEngine, "generate", spy)
    gsm8k.main(["--checkpoint", str(synthetic["ckpt"]), "--limit", "3", "--n_shot", "1", "max_new_tokens=8",
                "--out_dir", str(tmp_path / "calc"), "progress=false", "--calculator", "true"])
    gsm8k.main(["--checkpoint", str(synthetic["ckpt"]), "--limit", "3", "--n_shot", "1", "max_new_tokens=8",
                "--out_dir", str(tmp_path / "out"), "progress=false"])
    assert calls == [(3, {True}), (3, {False})]  # one batched call with every prompt, the calculator as asked
    assert json.loads((tmp_path / "calc" / "gsm8k_summary.json").read_text())["calculator"] is True
    s, records = read_out(tmp_path, "gsm8k")
    assert s["n"] == 3 and s["n_shot"] == 1 and 0.0 <= s["accuracy"] <= 1.0
    assert all(0 < r["n_generated"] <= 8 and r["n_shot"] == 1 for r in records)


# ----------------------------------------------------------------------------- MMLU

class LetterStub(torch.nn.Module):
    """Logits depend only on the current token: table[token]. The prompts' last token favours
    " C"; the pad token favours " A", so reading a padded position would pick A."""

    def __init__(self, vocab: int, favour: dict[int, int]):
        super().__init__()
        from types import SimpleNamespace

        self.cfg = SimpleNamespace(vocab_size=vocab, max_seq_len=1024)
        self.table = torch.nn.Parameter(torch.zeros(vocab, vocab))
        with torch.no_grad():
            for token, target in favour.items():
                self.table[token, target] = 5.0

    def forward(self, idx, positions=None, cache=None, return_hidden=False):
        return self.table[idx]  # "hidden" == logits: (B, T, V)

    def logits(self, hidden):
        return hidden


def test_mmlu_picks_the_letter_the_logits_favour(synthetic, tmp_path):
    tok = synthetic["tok"]
    letters = mmlu.letter_token_ids(tok)
    assert all(len(ids) == 1 for ids in letters)  # " A".." D" are single tokens here
    last = tok.encode("Answer:")[-1]
    stub = LetterStub(tok.vocab_size, {last: letters[2][0], tok.pad_id: letters[0][0]})
    s = mmlu.run(recipe(synthetic, tmp_path, batch_size=3), stub, tok)
    test = synthetic["mmlu_test"]
    assert s["pred_distribution"] == {"A": 0, "B": 0, "C": len(test), "D": 0}
    assert s["micro"] == sum(q["answer"] == 2 for q in test) / len(test)
    _, records = read_out(tmp_path, "mmlu")
    assert [r["pred"] for r in records] == [2] * len(test) and all(r["n_shot"] == 5 for r in records)
    lp = records[0]["letter_logprobs"]
    # log-softmax of a row that is 5 at " C" and 0 elsewhere
    assert math.isclose(lp[2] - lp[0], 5.0, abs_tol=1e-4) and lp[0] == lp[1] == lp[3]
    assert math.isclose(lp[0], -math.log(tok.vocab_size - 1 + math.exp(5)), abs_tol=1e-4)


def test_mmlu_multi_token_letters_sum_their_tokens(world):
    model, rng = world["model"], np.random.default_rng(3)
    prompts = [rng.integers(5, 300, n).tolist() for n in (4, 9)]
    letters = [[10], [11, 12], [13], [14, 15, 16]]
    got = mmlu.letter_logprobs(model, prompts, letters, batch_size=3)
    for i, p in enumerate(prompts):
        for j, c in enumerate(letters):
            assert abs(got[i, j].item() + full_forward_nll(model, p + c)[len(p) - 1:].sum()) < 1e-4


def test_mmlu_end_to_end_with_the_checkpoint_and_shot_truncation(synthetic, tmp_path):
    mmlu.main(["--checkpoint", str(synthetic["ckpt"]), "--out_dir", str(tmp_path / "out"), "progress=false",
               "engine.max_model_len=120"])
    s, records = read_out(tmp_path, "mmlu")
    assert s["n"] == len(synthetic["mmlu_test"]) == len(records) and s["n_subjects"] == 2
    assert 0 <= s["macro"] <= 1 and s["prompts_with_fewer_shots"] == len(records)  # 5 shots never fit 120 tokens
    assert all(r["prompt_tokens"] <= 120 for r in records)


# ----------------------------------------------------------------------------- HumanEval

def test_humaneval_canonical_solutions_pass(synthetic, tmp_path):
    tasks = synthetic["tasks"]
    # what a model continues with: the body, then more code that the stop sequences cut off
    outs = [[{"text": t["canonical_solution"] + "\n\ndef helper():\n    while True: pass\n"}] for t in tasks]
    s = humaneval.run(recipe(synthetic, tmp_path), generate=lambda prompts, n: outs)
    assert s["pass@1"] == 1.0 and s["n_problems"] == len(tasks) and s["k_skipped"] == [10, 100]
    bad = humaneval.run(recipe(synthetic, tmp_path), generate=lambda prompts, n: [[{"text": "    return None\n"}]] * len(prompts))
    assert bad["pass@1"] == 0.0


def test_truncate_at_stops():
    assert humaneval.truncate_at_stops("    return 1\nprint(2)") == "    return 1"
    assert humaneval.truncate_at_stops("    # ok\n    return 1\n# done") == "    # ok\n    return 1"
    assert humaneval.truncate_at_stops("    return 1\n") == "    return 1\n"


def test_humaneval_samples_n_per_task_through_the_engine(synthetic, tmp_path, monkeypatch):
    from inference.engine import LLMEngine

    calls = []
    real = LLMEngine.generate

    def spy(self, prompts, params=None, use_tqdm=False):
        calls.append([p.n for p in params])
        return real(self, prompts, params, use_tqdm)

    monkeypatch.setattr(LLMEngine, "generate", spy)
    humaneval.main(["--checkpoint", str(synthetic["ckpt"]), "--limit", "2", "--n_samples", "2", "--temperature", "0.8",
                    "max_new_tokens=6", "k_list=[1,2]", "--out_dir", str(tmp_path / "out"), "progress=false"])
    assert calls == [[2, 2]]
    s, records = read_out(tmp_path, "humaneval")
    assert s["n_samples"] == 4 and len(records) == 4 and 0 <= s["pass@1"] <= s["pass@2"] <= 1
    with pytest.raises(UserError, match="greedy"):
        humaneval.main(["--checkpoint", str(synthetic["ckpt"]), "n_samples=3", "progress=false"])


def test_humaneval_prompts_that_do_not_fit_are_counted_as_not_generated(synthetic, tmp_path):
    tasks = synthetic["tasks"]

    def generate(prompts, n):  # as the engine answers a prompt longer than the context
        return [[{"text": tasks[0]["canonical_solution"]}] * n] + \
               [[{"text": "", "error": "prompt (300 tokens) + max_tokens (1) = 301 exceeds the model's context"}] * n
                for _ in prompts[1:]]

    s = humaneval.run(recipe(synthetic, tmp_path), generate=generate)
    n = len(tasks)
    assert s["n_problems"] == n and s["errors"] == n - 1 and s["pass@1"] == 1 / n
    assert s["outcomes"] == {"passed": 1, "not generated": n - 1}
    _, records = read_out(tmp_path, "humaneval")
    assert [r["passed"] for r in records] == [True] + [False] * (n - 1)
    assert records[1]["result"] == "not generated" and records[1]["error"].startswith("prompt (300 tokens)")


def test_humaneval_real_file_with_a_prompt_longer_than_the_context(synthetic, tmp_path):
    from tests.eval.real_files import write_humaneval_gz

    long_task = dict(synthetic["tasks"][1], task_id="Long/0",
                     prompt="def f(x):\n    \"\"\"" + "Return x unchanged. " * 200 + "\"\"\"\n")
    gz = write_humaneval_gz(tmp_path / "HumanEval.jsonl.gz", [synthetic["tasks"][0], long_task])
    humaneval.main(["--checkpoint", str(synthetic["ckpt"]), "--data_path", str(gz), "max_new_tokens=4",
                    "--out_dir", str(tmp_path / "out"), "progress=false"])
    s, records = read_out(tmp_path, "humaneval")
    assert s["source"] == "local" and s["n_problems"] == 2 and s["errors"] == 1
    assert records[1]["task_id"] == "Long/0" and "exceeds the model's context" in records[1]["error"]
    assert s["outcomes"].get("not generated") == 1


def test_gsm8k_real_test_jsonl_by_data_path_alone(synthetic, tmp_path):
    from tests.eval.real_files import GSM8K_TEST, write_gsm8k_test_jsonl

    path = write_gsm8k_test_jsonl(tmp_path / "test.jsonl")
    s = gsm8k.run(parse_eval_args("gsm8k", "", ["--checkpoint", str(synthetic["ckpt"]), "--data_path", str(path),
                                                "n_shot=0", "--out_dir", str(tmp_path / "out")]),
                  generate=lambda prompts: [{"text": p["answer"]} for p in GSM8K_TEST])
    assert s["source"] == "local" and s["n"] == len(GSM8K_TEST) and s["accuracy"] == 1.0
    # integer answers are the gold number: scored, not a traceback
    write_gsm8k_test_jsonl(path, [{"question": r["question"], "answer": int(r["answer"].split("#### ")[1])}
                                  for r in GSM8K_TEST])
    s = gsm8k.run(recipe(synthetic, tmp_path, source="local", data_path=str(path), n_shot=0),
                  generate=lambda prompts: [{"text": "so #### 18"}, {"text": "#### 4"}])
    assert s["n_correct"] == 1 and s["n"] == 2


def test_a_data_path_is_never_ignored(synthetic, tmp_path):
    assert EvalRecipe().source == "synthetic" and EvalRecipe(data_path="x.jsonl").source == "local"
    for source in ("synthetic", "hf"):
        with pytest.raises(UserError, match=f"data_path.*source {source}.*source local"):
            parse_eval_args("gsm8k", "", ["--checkpoint", "x", "--source", source, "--data_path", "x.jsonl"])
    with pytest.raises(UserError, match="data_path.*text_path"):
        perplexity.main(["--checkpoint", str(synthetic["ckpt"]), "--data_path", "held_out.jsonl", "progress=false"])


# ----------------------------------------------------------------------------- command line, loading

def test_flags_and_overrides_are_the_same_keys(world, tmp_path):
    a = parse_eval_args("gsm8k", "", ["--checkpoint", "x", "--limit", "3", "--temperature=0.5", "--engine.max_num_seqs", "4"])
    b = parse_eval_args("gsm8k", "", ["checkpoint=x", "limit=3", "--set", "temperature=0.5", "--set", "engine.max_num_seqs=4"])
    assert a == b and a.limit == 3 and a.temperature == 0.5 and a.engine.max_num_seqs == 4
    with pytest.raises(UserError, match="checkpoint"):
        parse_eval_args("gsm8k", "", [])
    with pytest.raises(UserError, match="limt"):
        parse_eval_args("gsm8k", "", ["--checkpoint", "x", "limt=3"])
    with pytest.raises(UserError, match="does not exist"):
        gsm8k.main(["--checkpoint", str(tmp_path / "nope")])


@pytest.mark.parametrize("name", ["gsm8k", "mmlu", "perplexity", "humaneval"])
def test_example_recipes_validate(name):
    cfg = load_config(EvalRecipe, f"{common.REPO_ROOT}/configs/examples/eval_{name}.yaml")
    assert cfg.checkpoint and cfg.out_dir == f"out/eval/{name}"


def test_hf_source_offline_is_the_clear_error(world, monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(eval_data, "_hub_reachable", lambda timeout_s=3.0: False)
    for script in (gsm8k, mmlu, humaneval):
        with pytest.raises(UserError, match="--source synthetic"):
            script.main(["--checkpoint", str(world["ckpt"]), "--source", "hf", "n_shot=0", "progress=false"])


def test_adapter_checkpoint_is_merged_onto_its_base(world, tmp_path):
    from model.lora import LoRAConfig, apply_lora, lora_layers, merge_and_unload, save_adapter
    from model.load import load_model

    model = load_model(world["ckpt"])
    apply_lora(model, "all-linear", r=4, alpha=8)
    torch.manual_seed(1)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    save_adapter(tmp_path / "adapter", model, LoRAConfig(r=4, alpha=8), base_checkpoint=str(world["ckpt"]))
    loaded = common.load_model(EvalRecipe(checkpoint=str(tmp_path / "adapter"), device="cpu"))
    ids = torch.tensor([[1, 7, 42, 9, 100]])
    with torch.no_grad():
        want = merge_and_unload(model).eval()(ids)
        torch.testing.assert_close(loaded(ids), want, atol=1e-5, rtol=0)
        assert (loaded(ids) - world["model"](ids)).abs().max() > 1e-3  # the adapter changes the model
    assert common.load_tokenizer(EvalRecipe(checkpoint=str(tmp_path / "adapter"))).path == world["ckpt"] / "tokenizer.json"
