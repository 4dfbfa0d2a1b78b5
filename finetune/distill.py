"""Knowledge distillation on the one training loop: a frozen teacher's next-token distributions
train a student (smaller, another architecture, LoRA/QLoRA adapters), on data and on its own samples.

    teacher (loader; bf16 or NF4) --online logits | top-k cache--+
    student (SFT's builder) --hidden--> distill_loss(chunked) <--+--> train(...)
    batches: SFT rows | pretraining windows | the student's own samples (GKD, onpolicy.ratio)

The divergences and the chunked loss are pure functions (finetune/distill_losses.py); the cache
is finetune/distill_cache.py, the on-policy batches finetune/distill_onpolicy.py. Teacher and
student must share the tokenizer (ids mean the same tokens); their vocab sizes may differ by
padding, and the loss compares the first min(V_teacher, V_student) logits.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn

from finetune.distill_cache import batch_teacher
from finetune.distill_losses import distill_loss
from finetune.distill_recipe import DistillLossConfig, DistillRecipe, TeacherConfig
from utils.errors import UserError

# ----------------------------------------------------------------------------- models


def load_teacher(cfg: TeacherConfig, device: torch.device) -> nn.Module:
    """The teacher through the one loader, frozen, in eval mode, in ``cfg.dtype`` or with its
    linear layers in NF4 (``quantize: nf4``; computing in that dtype)."""
    from model.load import load_model
    from utils.device import torch_dtype

    dtype = torch_dtype(cfg.dtype, device, "teacher.dtype")
    teacher = load_model(cfg.init_from, device=device, dtype=dtype, expect="lm")
    if cfg.quantize == "nf4":  # embeddings, norms and the head stay in dtype
        from model.quant import quantize_model

        quantize_model(teacher, "all-linear", dtype)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def same_tokens(a: Any, b: Any) -> bool:
    """Whether two tokenizers map every id to the same token (the same file, or an equal vocabulary)."""
    if a.hash == b.hash:
        return True
    return a.vocab_size == b.vocab_size and all(a.id_to_token(i) == b.id_to_token(i) for i in range(a.vocab_size))


def student_tokenizer(recipe: DistillRecipe) -> str:
    """The student's tokenizer file: data.tokenizer, else its checkpoint's, else the teacher's (a new
    student speaks the teacher's tokens). Written into data.tokenizer, where SFT's helpers look."""
    from model.load import tokenizer_path

    path = recipe.data.tokenizer or (recipe.model.init_from and tokenizer_path(recipe.model.init_from, required=False))
    recipe.data.tokenizer = str(path or tokenizer_path(recipe.teacher.init_from))
    return recipe.data.tokenizer


def check_pair(recipe: DistillRecipe, teacher_cfg: Any, student_cfg: Any, tokenizer: Any) -> int:
    """UserError unless teacher and student share the tokenizer and fit the rows; returns the
    vocabulary the loss compares (the smaller padded vocab, at least the tokenizer's)."""
    from model.load import load_tokenizer

    teacher_tok = load_tokenizer(recipe.teacher.init_from)
    if not same_tokens(teacher_tok, tokenizer):
        raise UserError(f"teacher {recipe.teacher.init_from} uses the tokenizer {teacher_tok.path} and the student "
                        f"{tokenizer.path}, which map ids to different tokens; distillation compares distributions "
                        "over the same ids, so both must use one tokenizer (train the student with the teacher's).")
    vocab = min(teacher_cfg.vocab_size, student_cfg.vocab_size)
    if tokenizer.vocab_size > vocab:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the smaller model's vocab_size is {vocab}.")
    longest = recipe.train.seq_len
    for who, cfg in (("teacher", teacher_cfg), ("student", student_cfg)):
        if cfg.max_seq_len < longest:
            raise UserError(f"train.seq_len={longest} exceeds the {who}'s context of {cfg.max_seq_len} tokens; "
                            "lower train.seq_len.")
    return vocab


def build_student(recipe: DistillRecipe, device: torch.device) -> tuple[nn.Module, dict]:
    """From a checkpoint: SFT's builder (long context, NF4 base, LoRA as the recipe says);
    new (model.config): a fresh Transformer of that shape, seeded by train.seed."""
    from finetune.sft import build_sft_model
    from model.transformer import Transformer
    from utils.flops import flops_per_token

    if recipe.model.init_from:
        return build_sft_model(recipe, device)  # reads the sections an SFT recipe has: model, train, lora, qlora
    torch.manual_seed(recipe.train.seed)
    model = Transformer(recipe.model.config).to(device).train()
    n = sum(p.numel() for p in model.parameters())
    return model, {"flops_per_token": flops_per_token(model, recipe.train.seq_len), "mode": "full", "trainable": n,
                   "total": n}


# ----------------------------------------------------------------------------- loss


def make_loss_fn(teacher: Optional[nn.Module], cfg: DistillLossConfig, vocab: int) -> Callable:
    """``loss_fn(model, batch) -> (loss, metrics)`` for the loop. ``batch`` is a dict {x, y,
    loss_mask} (+ the cached top-k, or ``on_policy``); the teacher runs on x unless the batch
    brings it cached. Sampled batches use the divergence alone. ``loss_weight`` is the count of
    counted tokens, so the loop averages over tokens, not micro-batches."""
    from utils.distributed import unwrap

    def loss_fn(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        x, y, mask = batch["x"], batch["y"], batch["loss_mask"].bool()
        targets = y.masked_fill(~mask, -100).flatten()
        on_policy = "on_policy" in batch
        kd_weight = 1.0 if on_policy else cfg.kd_weight
        student = unwrap(model)
        hidden = model(x, return_hidden=True).flatten(0, 1)  # (B*T, d)
        cached = batch_teacher(batch)
        if cached is not None:
            teacher_rows = cached.__getitem__
        elif kd_weight > 0:
            with torch.no_grad():
                teacher_hidden = teacher(x, return_hidden=True).flatten(0, 1)
            teacher_rows = lambda rows: teacher.logits(teacher_hidden[rows])[:, :vocab]  # noqa: E731
        else:
            teacher_rows = None
        loss, parts = distill_loss(hidden, lambda h: student.logits(h)[:, :vocab], targets, teacher_rows,
                                   kind=cfg.divergence, beta=cfg.beta, temperature=cfg.temperature, kd_weight=kd_weight,
                                   chunk_size=cfg.chunk_size, vocab_size=vocab)
        return loss, {"loss_weight": float(mask.sum()), "n_tokens": x.numel(), "kd": parts["kd"], "ce": parts["ce"],
                      "on_policy": float(on_policy)}

    return loss_fn


# ----------------------------------------------------------------------------- data


def data_loader(recipe: DistillRecipe, split: str, seed: int, rank: int, world_size: int, offsets: bool = False):
    """SFT rows (x, y, loss_mask[, offsets]) or pretraining windows (x, y) of one split."""
    from data_pipeline.loader import PretrainLoader, SFTLoader
    from data_pipeline.tokenizer.tokenizer import file_hash

    d, t = recipe.data, recipe.train
    tok_hash = file_hash(d.tokenizer)
    if d.kind == "pretrain":
        path = d.train_bin if split == "train" else d.val_bin
        return PretrainLoader(path, t.seq_len, t.batch_size, seed, rank, world_size, expect_tokenizer_hash=tok_hash)
    return SFTLoader(d.bin_dir, split, t.seq_len, t.batch_size, seed, rank, world_size, pack=d.pack,
                     expect_tokenizer_hash=tok_hash, drop_long=d.long_examples == "drop", return_offsets=offsets)


def topk_cache(recipe: DistillRecipe, teacher: nn.Module, vocab: int, device: torch.device, env) -> Path:
    """Build (rank 0) or find the teacher's top-k cache of the train and val splits."""
    from finetune.distill_cache import build_topk_cache
    from utils.distributed import barrier

    tc = recipe.teacher
    splits = ["train"] + ([recipe.data.val_split] if recipe.data.val_split else [])
    build = lambda log: build_topk_cache(  # noqa: E731
        teacher, tc.init_from, recipe.data.bin_dir, splits, k=min(tc.top_k, vocab), temperature=recipe.loss.temperature,
        vocab=vocab, seq_len=recipe.train.seq_len, settings={"dtype": tc.dtype, "quantize": tc.quantize},
        cache_root=tc.cache_dir, device=device, log=log)
    folder = build(print) if env.is_main else None
    barrier(env)
    return folder or build(lambda s: None)


def make_batches(recipe: DistillRecipe, env, student: nn.Module, tokenizer: Any, cache: Optional[Path],
                 split: str = "train", seed: Optional[int] = None) -> Iterator:
    """The micro-batches of a split: data rows (with the cached teacher when there is a cache),
    mixed with the student's own samples at onpolicy.ratio (training only)."""
    from finetune.distill_cache import CachedBatches, TopKFile
    from finetune.distill_onpolicy import MixedBatches, StudentSamples, example_prompts

    seed = recipe.train.seed if seed is None else seed
    data = data_loader(recipe, split, seed, env.rank, env.world_size, offsets=cache is not None)
    if cache is not None:
        data = CachedBatches(data, TopKFile(cache, split))
    op = recipe.onpolicy
    if split != "train" or op.ratio == 0:
        return MixedBatches(data, None, 0.0, seed)
    from data_pipeline.tokenizer.chat_template import chat_stop_ids
    from inference.sampling_params import SamplingParams

    longest = min(recipe.train.seq_len + 1, student.cfg.max_seq_len)
    prompts = example_prompts(data_loader(recipe, "train", seed, 0, 1), longest - op.max_new_tokens)
    sampling = SamplingParams(max_tokens=op.max_new_tokens, temperature=op.temperature, top_k=op.top_k, top_p=op.top_p)
    engine = {"block_size": op.block_size, "max_num_seqs": op.max_num_seqs, "max_model_len": longest}
    samples = StudentSamples(student, prompts, recipe.train.batch_size, sampling, chat_stop_ids(tokenizer), engine,
                             seed, env.rank, env.world_size)
    return MixedBatches(data, samples, op.ratio, seed)


def make_eval_fn(recipe: DistillRecipe, env, loss_fn: Callable, student: nn.Module, tokenizer: Any,
                 cache: Optional[Path]) -> Optional[Callable]:
    """val_loss / val_kd / val_ce on the first train.eval_batches of the validation split (the same
    batches each time), the data's rows only."""
    from utils.distributed import all_reduce_mean
    from utils.train_loop import to_device

    has_val = recipe.data.val_bin if recipe.data.kind == "pretrain" else recipe.data.val_split
    if not has_val or recipe.train.eval_batches <= 0:
        return None
    split = "val" if recipe.data.kind == "pretrain" else recipe.data.val_split
    make_batches(recipe, env, student, tokenizer, cache, split, seed=0)  # a missing split fails now, not at step 100

    def evaluate(model: nn.Module) -> dict:
        batches = make_batches(recipe, env, student, tokenizer, cache, split, seed=0)
        device = next(model.parameters()).device
        sums, weight = {"val_loss": 0.0, "val_kd": 0.0, "val_ce": 0.0}, 0.0
        for _ in range(recipe.train.eval_batches):
            loss, m = loss_fn(model, to_device(next(batches), device))
            w = m["loss_weight"]
            for key, value in (("val_loss", loss), ("val_kd", m["kd"]), ("val_ce", m["ce"])):
                sums[key] += float(value) * w
            weight += w
        return all_reduce_mean({k: v / max(weight, 1.0) for k, v in sums.items()}, env)

    return evaluate


# ----------------------------------------------------------------------------- run


def run_distill(recipe: DistillRecipe, batches: Optional[Iterator] = None, eval_fn: Optional[Callable] = None):
    """Build, (cache,) train and save the student; returns the loop's TrainResult. ``batches``
    overrides the data (tests)."""
    from finetune.sft import prepare_data
    from model.lora import adapter_meta, live_adapter_weights
    from data_pipeline.tokenizer.tokenizer import load_tokenizer
    from model.load import read_config
    from model.loss import with_aux_loss
    from utils.device import resolve_device
    from utils.distributed import setup
    from utils.train_loop import train

    if recipe.onpolicy.ratio > 0 and recipe.train.distributed == "fsdp":
        raise UserError("on-policy distillation generates with the whole student on each process; use "
                        "train.distributed=ddp (or onpolicy.ratio: 0) with fsdp.")
    env = setup(recipe.train.distributed, recipe.train.device)
    device = resolve_device(recipe.train.device, env.local_rank, "train.device")
    say = print if env.is_main else (lambda s: None)
    tokenizer = load_tokenizer(student_tokenizer(recipe))
    teacher_cfg = read_config(recipe.teacher.init_from)
    student_cfg = read_config(recipe.model.init_from) if recipe.model.init_from else recipe.model.config
    vocab = check_pair(recipe, teacher_cfg, student_cfg, tokenizer)
    if batches is None and recipe.data.kind == "sft":
        prepare_data(recipe, env)  # data.train_path: your chats -> cached bins in the student's chat format
    teacher = load_teacher(recipe.teacher, device) if recipe.loss.kd_weight > 0 or recipe.onpolicy.ratio > 0 else None
    cache = None
    if teacher is not None and recipe.teacher.logits == "topk" and batches is None:
        cache = topk_cache(recipe, teacher, vocab, device, env)
        if recipe.onpolicy.ratio == 0:
            teacher = None  # every batch brings its teacher: free the memory
    student, info = build_student(recipe, device)
    say(f"distill[{recipe.mode}]: teacher {recipe.teacher.init_from} ({teacher_cfg.n_layers} layers, "
        f"d_model {teacher_cfg.d_model}{', NF4' if recipe.teacher.quantize == 'nf4' else ''}; logits "
        f"{recipe.teacher.logits}) -> student {recipe.model.init_from or 'new'} ({student_cfg.n_layers} layers, "
        f"d_model {student_cfg.d_model}) | trainable {info['trainable']:,} of {info['total']:,} params | "
        f"{recipe.loss.divergence} T={recipe.loss.temperature} kd_weight={recipe.loss.kd_weight} "
        f"on-policy ratio {recipe.onpolicy.ratio}")
    if cache is not None and recipe.loss.divergence == "reverse_kl":
        say("distill: note: reverse KL against a top-k teacher underestimates the full divergence (it weighs the "
            "student's mass outside the teacher's top k, which the cache lumps together: -22% at k=64 for a "
            "fresh student in docs/BENCHMARKS.md); prefer teacher.logits: online for reverse_kl")
    loss_fn = make_loss_fn(teacher, recipe.loss, vocab)
    if batches is None:
        batches = make_batches(recipe, env, student, tokenizer, cache)
        eval_fn = eval_fn or make_eval_fn(recipe, env, loss_fn, student, tokenizer, cache)
    meta = {"stage": "distill", "teacher": recipe.teacher.init_from, "base_checkpoint": recipe.model.init_from}
    weights_fn = None
    if recipe.lora is not None:
        weights_fn = live_adapter_weights(recipe.lora.modules_to_save)
        meta = adapter_meta(student, recipe.lora, **meta, qlora=recipe.qlora is not None, quantized=info.get("quantized", []))
    return train(student, batches, with_aux_loss(loss_fn, recipe.train.aux_loss, say), recipe.train, recipe.optim,
                 eval_fn=eval_fn, recipe=recipe, weights_fn=weights_fn, checkpoint_meta=meta,
                 tokenizer_path=recipe.data.tokenizer, flops_per_token=info["flops_per_token"])


def answer_report(recipe: DistillRecipe, distilled: str, device: str | torch.device = "cpu") -> Optional[dict]:
    """Exact answers to the held-out arithmetic prompts (finetune/format_rate.py): the student
    before (when it started from a checkpoint) and after, and the teacher. None when switched off."""
    from data_pipeline.tokenizer.tokenizer import load_tokenizer
    from finetune.format_rate import format_rate, heldout_problems
    from model.load import load_model

    if recipe.format_eval_prompts <= 0:
        return None
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    problems = heldout_problems(recipe.format_eval_prompts)
    models = {"base": recipe.model.init_from, "distilled": distilled, "teacher": recipe.teacher.init_from}
    return {name: format_rate(load_model(path, device=device), tokenizer, problems)
            for name, path in models.items() if path}


def run_distill_and_report(recipe: DistillRecipe) -> None:
    """What the entry script runs: train, then say where the student is and how its answers compare."""
    from utils.distributed import setup
    from utils.fs import atomic_file

    result = run_distill(recipe)
    env = setup(recipe.train.distributed, recipe.train.device)
    if not env.is_main:
        return
    what = "adapter (LoRA weights only)" if recipe.lora is not None else "model"
    print(f"distill: {result.final_step} steps; student {what} saved to {result.checkpoint}")
    report = answer_report(recipe, str(result.checkpoint))
    if report:
        with atomic_file(Path(recipe.train.out_dir) / "format_eval.json") as f:  # read by the demo's report card
            json.dump(report, f, indent=2)
        line = ", ".join(f"{name} {r['accuracy']:.0%} correct ({r['format_rate']:.0%} in format)" for name, r in report.items())
        print(f"held-out arithmetic, {report['distilled']['n']} prompts: {line}")
