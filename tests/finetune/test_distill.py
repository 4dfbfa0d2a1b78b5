"""The distillation stage on tiny models and real (tiny) SFT and pretraining bins: zero loss for a
teacher equal to the student, the tokenizer rule, the top-k cache against the online teacher,
full/LoRA/QLoRA and new students, on-policy batches, bad recipes."""
import json

import numpy as np
import pytest
import torch

from finetune.distill import load_teacher, make_batches, make_loss_fn, run_distill, student_tokenizer
from finetune.distill_onpolicy import MixedBatches, pad_rows
from finetune.distill_recipe import DistillRecipe
from model import ModelConfig, Transformer
from model.load import load_model, load_tokenizer
from tests.finetune.conftest import tiny_tokenizer
from utils.checkpoint import read_meta, save_checkpoint
from utils.config import config_from_dict
from utils.distributed import setup
from utils.errors import UserError


def recipe(world, out, steps=4, **over):
    data = {
        "teacher": {"init_from": str(world["root"] / "teacher")},
        "model": {"init_from": str(world["root"] / "student")},
        "data": {"bin_dir": world["bins"]},
        "train": {"out_dir": str(out), "max_steps": steps, "batch_size": 4, "seq_len": 64, "device": "cpu",
                  "progress": False, "log_every": 100, "eval_batches": 2, "seed": 3},
        "optim": {"lr": 1e-2, "warmup_steps": 0, "schedule": "constant"},
        "loss": {"kd_weight": 1.0},
        "format_eval_prompts": 0,
    }
    for key, value in over.items():
        section, _, name = key.partition("__")
        if name:
            data.setdefault(section, {})[name] = value
        else:
            data[section] = value
    return config_from_dict(DistillRecipe, data)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_teacher_equal_to_student_gives_zero_loss_and_gradient(world, tmp_path, kind):
    r = recipe(world, tmp_path, model={"init_from": str(world["root"] / "teacher")}, loss__divergence=kind,
               loss__temperature=2.0)
    student_tokenizer(r)
    teacher = load_teacher(r.teacher, torch.device("cpu"))
    student = load_model(r.model.init_from, train=True)
    batch = next(make_batches(r, setup("none", "cpu"), student, load_tokenizer(r.model.init_from), None))
    loss, metrics = make_loss_fn(teacher, r.loss, world["vocab"])(student, batch)
    loss.backward()
    assert abs(loss.item()) < 1e-6 and metrics["ce"] > 1.0  # not a model that has nothing left to learn
    assert max(p.grad.abs().max().item() for p in student.parameters()) < 1e-6


def test_tokenizers_must_match(world, tmp_path):
    other = tiny_tokenizer(tmp_path / "tok", ["a different corpus entirely"] * 50 + ["of other words"] * 50, 300)
    teacher = Transformer(ModelConfig(vocab_size=400, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=128))
    save_checkpoint(tmp_path / "teacher", teacher, tokenizer_path=other)
    with pytest.raises(UserError, match="same ids|one tokenizer"):
        run_distill(recipe(world, tmp_path / "run", teacher={"init_from": str(tmp_path / "teacher")}))
    # the same tokens in another file (a re-saved tokenizer.json) are the same tokenizer
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "tokenizer.json").write_text(json.dumps(json.loads(world["tok"].read_text()), indent=3))
    save_checkpoint(tmp_path / "teacher2", load_model(world["root"] / "teacher"), tokenizer_path=tmp_path / "copy" / "tokenizer.json")
    assert run_distill(recipe(world, tmp_path / "run2", steps=1, teacher={"init_from": str(tmp_path / "teacher2")})).final_step == 1


def test_topk_cache_with_k_equal_v_trains_as_the_online_teacher(world, tmp_path, capsys):
    common = dict(data={"bin_dir": world["bins"], "pack": False}, loss={"divergence": "jsd", "beta": 0.3,
                                                                         "temperature": 1.5, "kd_weight": 0.7})
    online = run_distill(recipe(world, tmp_path / "online", **common))
    teacher = {"init_from": str(world["root"] / "teacher"), "logits": "topk", "top_k": world["vocab"],
               "cache_dir": str(tmp_path / "cache")}
    cached = run_distill(recipe(world, tmp_path / "cached", teacher=teacher, **common))
    for a, b in zip(online.history, cached.history):
        for key in ("loss", "kd", "ce", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    out = capsys.readouterr().out
    assert f"top-{world['vocab']} of" in out and "prefer teacher.logits: online" not in out
    small = run_distill(recipe(world, tmp_path / "k8", teacher={**teacher, "top_k": 8}, **common))
    assert small.history[0]["kd"] < online.history[0]["kd"]  # the coarse view never exceeds the full divergence
    again = run_distill(recipe(world, tmp_path / "again", teacher=teacher, **common))
    assert f"reusing the teacher's top-{world['vocab']} cache" in capsys.readouterr().out
    assert again.history[-1]["loss"] == cached.history[-1]["loss"]
    # reverse KL is the divergence the top-k view gets wrong (docs/BENCHMARKS.md): the run says so
    run_distill(recipe(world, tmp_path / "rkl", steps=1, teacher={**teacher, "top_k": 8}, data=common["data"],
                       loss={"divergence": "reverse_kl"}))
    assert "prefer teacher.logits: online for reverse_kl" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_students_learn_from_the_teacher(world, tmp_path, mode):
    over = {}
    if mode != "full":
        over["lora"] = {"r": 4, "alpha": 8, "targets": "all-linear"}
        over["optim__lr"] = 5e-2  # adapters start at zero and take a larger LR (as usual for LoRA)
    if mode == "qlora":
        pytest.importorskip("bitsandbytes")
        over["qlora"] = {"compute_dtype": "fp32"}
    result = run_distill(recipe(world, tmp_path, steps=12, **over))
    kd = [h["kd"] for h in result.history]
    assert kd[-1] < 0.85 * kd[0], kd
    meta = read_meta(result.checkpoint)
    assert meta["kind"] == ("model" if mode == "full" else "adapter") and meta["stage"] == "distill"
    assert load_model(result.checkpoint).cfg.d_model == 32  # the student, whatever the teacher


def test_new_student_on_pretraining_windows_with_a_quantized_teacher(world, tmp_path):
    pytest.importorskip("bitsandbytes")
    new = {"config": {"vocab_size": world["vocab"], "d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "max_seq_len": 64}}
    data = {"train_bin": str(world["pre"] / "train.bin"), "val_bin": str(world["pre"] / "val.bin")}
    result = run_distill(recipe(world, tmp_path, steps=10, model=new, data=data, teacher__quantize="nf4",
                                loss__kd_weight=0.5, train__eval_every=5))
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.9 * losses[0] and "val_kd" in result.final_eval
    assert read_meta(result.checkpoint)["base_checkpoint"] == ""


def test_hf_directory_teacher_and_moe_student(world, tmp_path):
    """The teacher as an exported HF model directory (read through the one loader) is the same
    teacher as our checkpoint; a new MoE student (another architecture, with its balance loss)
    learns from it."""
    from model.hf_convert import export

    hf_dir = export(str(world["root"] / "teacher"), str(tmp_path / "hf_teacher"))
    assert (hf_dir / "config.json").is_file() and not (hf_dir / "model_config.json").exists()
    moe = {"config": {"vocab_size": world["vocab"], "d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64,
                      "max_seq_len": 128, "ffn": "moe", "moe": {"n_routed_experts": 4, "n_experts_per_tok": 2,
                                                               "moe_d_ff": 16, "seq_aux_loss_coef": 0.01}}}
    runs = {name: run_distill(recipe(world, tmp_path / name, steps=12, model=moe, teacher={"init_from": str(path)}))
            for name, path in (("ours", world["root"] / "teacher"), ("hf", hf_dir))}
    for a, b in zip(runs["ours"].history, runs["hf"].history):
        assert b["kd"] == pytest.approx(a["kd"], rel=1e-5)
    kd = [h["kd"] for h in runs["hf"].history]
    assert kd[-1] < 0.85 * kd[0], kd
    assert all(h["aux_loss"] > 0 for h in runs["hf"].history)  # the MoE's balance loss is trained too
    assert load_model(runs["hf"].checkpoint).cfg.ffn == "moe"


def test_bf16_teacher_matches_fp32(world, tmp_path):
    """teacher.dtype=bf16 halves the teacher's memory; its divergence stays within bf16's rounding."""
    fp32 = run_distill(recipe(world, tmp_path / "fp32", steps=2))
    bf16 = run_distill(recipe(world, tmp_path / "bf16", steps=2, teacher__dtype="bf16"))
    for a, b in zip(fp32.history, bf16.history):
        assert b["kd"] == pytest.approx(a["kd"], rel=0.05) and b["kd"] != a["kd"]


def test_on_policy_run_loss_falls(world, tmp_path):
    r = recipe(world, tmp_path, steps=12, loss__divergence="reverse_kl", loss__kd_weight=0.3, optim__lr=2e-2,
               onpolicy={"ratio": 1.0, "max_new_tokens": 12, "block_size": 8})
    result = run_distill(r)
    kd = [h["kd"] for h in result.history]
    # every batch is the student's own samples, trained on the divergence alone (whatever kd_weight says)
    assert all(h["on_policy"] == 1.0 and h["loss"] == pytest.approx(h["kd"], rel=1e-6) for h in result.history)
    assert np.mean(kd[-3:]) < 0.7 * np.mean(kd[:3]), kd


class FakeSamples:
    def __init__(self):
        self.calls = []

    def __call__(self, i):
        self.calls.append(i)
        return {**pad_rows([[5, 6, 7, 8]], [2]), "on_policy": torch.tensor(1.0)}


class Counter:
    def __init__(self):
        self.i = 0

    def __next__(self):
        self.i += 1
        return torch.full((1, 3), self.i), torch.full((1, 3), self.i)

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


def test_mixed_batches_ratio_and_resume():
    batches = MixedBatches(Counter(), FakeSamples(), 0.3, seed=1)
    first = [next(batches) for _ in range(200)]
    share = sum("on_policy" in b for b in first) / 200
    assert 0.2 < share < 0.4
    # sampled rows count the reply only: tokens [5, 6 | 7, 8] -> targets 6, 7, 8 with 7 and 8 counted
    sampled = next(b for b in first if "on_policy" in b)
    assert sampled["y"].tolist() == [[6, 7, 8]] and sampled["loss_mask"].tolist() == [[0.0, 1.0, 1.0]]
    assert first[0]["loss_mask"].tolist() == [[1.0, 1.0, 1.0]] or "on_policy" in first[0]  # windows: all count
    state = batches.state_dict()
    later = [next(batches) for _ in range(20)]
    again = MixedBatches(Counter(), FakeSamples(), 0.3, seed=1)
    again.load_state_dict(state)
    for a, b in zip(later, (next(again) for _ in range(20))):
        assert ("on_policy" in a) == ("on_policy" in b) and torch.equal(a["x"], b["x"])


def test_bad_recipes(world, tmp_path):
    cases = [
        (dict(model={"init_from": str(world["root"] / "student"), "config": {"vocab_size": 400}}), "exactly one"),
        (dict(qlora={}), "no lora section"),
        (dict(teacher={"init_from": str(world["root"] / "teacher"), "logits": "topk"}), "data.pack: false"),
        (dict(data={"train_bin": str(world["pre"] / "train.bin")}, onpolicy={"ratio": 0.5}), "prompts of SFT"),
        (dict(loss={"beta": 1.5}), "loss.beta"),
        (dict(model={"config": {"vocab_size": 400, "d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 32}}),
         "exceeds the student's max_seq_len"),
        (dict(teacher={"init_from": str(tmp_path / "nowhere")}), "nowhere"),
    ]
    for over, message in cases:
        with pytest.raises(UserError, match=message):
            recipe(world, tmp_path, **over)
    long = recipe(world, tmp_path, train__seq_len=200)
    with pytest.raises(UserError, match="context of 128"):
        run_distill(long)


def test_sequence_level_rows_are_the_teachers_greedy_answers_and_sft_data(world, tmp_path):
    from data_pipeline.processing.sft_cache import build_sft_cache
    from finetune.distill_sequences import main
    from inference.answers import chat_answers

    questions = ["Tom has 3 apples and buys 4 more. How many apples?", "What is 2 + 5?", "Tell me a story."]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"question": q}) + "\n" for q in questions))
    out = tmp_path / "answers.jsonl"
    counts = main(["--teacher", str(world["root"] / "teacher"), "--prompts", str(tmp_path / "prompts.jsonl"),
                   "--out", str(out), "--max_new_tokens", "12", "--keep_truncated", "--device", "cpu"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert counts["answers"] == len(rows) == 3
    model, tok = load_model(world["root"] / "teacher"), load_tokenizer(world["root"] / "teacher")
    expected = [tok.decode([t for t in o.token_ids if t not in (tok.im_end_id, tok.eos_id)])
                for o in chat_answers(model, tok, questions, 12)]
    assert [r["messages"][-1]["content"] for r in rows] == expected
    assert [r["messages"][0]["content"] for r in rows] == questions
    assert (build_sft_cache(str(out), str(out), tok, cache_root=str(tmp_path / "cache")) / "train.bin").is_file()
    with pytest.raises(UserError, match="temperature"):
        main(["--teacher", str(world["root"] / "teacher"), "--prompts", str(tmp_path / "prompts.jsonl"), "--n", "2"])
