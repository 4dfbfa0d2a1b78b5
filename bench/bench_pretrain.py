"""Training throughput: our Transformer in the shared loop vs HF LlamaForCausalLM, one run.

    python bench/bench_pretrain.py [--steps 6] [--rounds 3] [--batch 8] [--seq 256] [--compile]
    python bench/bench_pretrain.py --gpu_mfu [--batch 16] [--seq 1024]   # CUDA: GPT-2-124M, bf16, compiled

A ~10M-parameter Llama-style config (d 256, 10 layers, 8 heads / 4 KV heads, SwiGLU 704,
vocab 4096, untied head) is built twice with the same weights: ours (model/transformer.py)
and transformers' LlamaForCausalLM (SDPA attention). Each optimizer step is forward +
backward + grad clip + AdamW step (the same optimizer: utils.optim.build_optimizer, fused
AdamW) on the same random batch, fp32.

Rows, interleaved over ``rounds`` so machine load drifts hit every row alike:
  ours/loop : our model through utils.train_loop.train (the real pretraining path, with its
              bookkeeping: all-reduce of stats, finiteness checks, JSONL logging)
  ours/bare : our model in the same minimal loop as hf/bare (isolates the loop's overhead)
  hf/bare   : LlamaForCausalLM in a minimal hand-written loop (the reference)
  hf/loop   : LlamaForCausalLM through utils.train_loop.train (isolates the model code)
Tokens/s = batch*seq / median step time (first step of each round dropped as warm-up);
CPU-time ratios are printed too, since wall time on a shared box swings with others' load.
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.transformer import Transformer
from pretrain.train import lm_loss as ours_loss  # the pretraining loss itself (chunked head + CE)
from utils.cli import main_guard
from utils.optim import OptimConfig, build_optimizer
from utils.train_loop import TrainConfig, train

CFG = ModelConfig(vocab_size=4096, d_model=256, n_layers=10, n_heads=8, n_kv_heads=4, d_ff=704, max_seq_len=1024,
                  rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False)
OPTIM = OptimConfig(lr=3e-4, warmup_steps=0, schedule="constant")


def hf_llama(cfg: ModelConfig, ours: Transformer):
    """LlamaForCausalLM with the same config and weights as ``ours``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.hf_interop import to_hf

    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len,
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
                         attention_bias=False, mlp_bias=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(hf_cfg)
    state, _ = to_hf(ours.state_dict(), cfg)
    model.load_state_dict(state, strict=False)
    model.cfg = cfg  # the loop's checkpoints record a ModelConfig
    return model


class Repeat:
    """The same (x, y) batch forever (data loading is not what is measured). Each fetch
    starts a step, so it stamps the wall clock and this process's CPU time: consecutive
    stamps bracket one whole step (forward, backward, optimizer, loop bookkeeping)."""

    def __init__(self, x, y):
        self.batch, self.i, self.stamps = (x, y), 0, []

    def __iter__(self):
        return self

    def __next__(self):
        self.stamps.append((time.perf_counter(), time.process_time()))
        self.i += 1
        return self.batch

    def step_times(self) -> tuple[list[float], list[float]]:
        """(wall, cpu) seconds of every step but the first (warm-up) and the last (unbracketed)."""
        wall = [b[0] - a[0] for a, b in zip(self.stamps, self.stamps[1:])][1:]
        cpu = [b[1] - a[1] for a, b in zip(self.stamps, self.stamps[1:])][1:]
        return wall, cpu

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


def hf_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(input_ids=x).logits.flatten(0, 1).float(), y.flatten()), {}


def in_loop(model, loss_fn, batch, steps: int, compile_: bool) -> tuple[list[float], list[float]]:
    """(wall, cpu) seconds per optimizer step through the shared training loop."""
    data = Repeat(*batch)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(out_dir=out, max_steps=steps + 1, batch_size=batch[0].shape[0], seq_len=batch[0].shape[1],
                          device="cpu", dtype="fp32", resume="never", progress=False, log_every=10**6,
                          compile=compile_, save_every=0)
        cfg.spike.enabled = False
        train(model, data, loss_fn, cfg, OPTIM)
    return data.step_times()


def bare(model, loss_fn, batch, steps: int) -> tuple[list[float], list[float]]:
    """(wall, cpu) seconds per step of a minimal reference loop: fwd + bwd + clip + AdamW."""
    opt = build_optimizer(model, None, OPTIM, torch.device("cpu"))
    data = Repeat(*batch)
    for _ in range(steps + 1):
        loss, _ = loss_fn(model, next(data))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # wait for the step, as the loop's logging does
    return data.step_times()


GPT2_124M = ModelConfig(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024, norm="layernorm",
                        ffn="gelu_mlp", activation="gelu_tanh", pos_emb="learned", tie_embeddings=True, qkv_bias=True,
                        attn_out_bias=True, mlp_bias=True)


def gpu_mfu(batch: int, seq: int, steps: int) -> None:
    """MFU of GPT-2-124M (vocab padded to 50304, as llm.c/nanoGPT) through the shared loop:
    bf16 autocast, torch.compile, fused AdamW, on one CUDA device; peak from utils.flops."""
    if not torch.cuda.is_available():
        raise SystemExit("--gpu_mfu needs a CUDA device")
    torch.manual_seed(0)
    model = Transformer(GPT2_124M)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50257, (batch, seq), generator=g)
    data = Repeat(x, torch.roll(x, -1, dims=1))
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(out_dir=out, max_steps=steps, batch_size=batch, seq_len=seq, device="cuda", dtype="bf16",
                          compile=True, resume="never", progress=False, log_every=10)
        cfg.spike.enabled = False
        res = train(model, data, ours_loss, cfg, OptimConfig(lr=6e-4, warmup_steps=10))
    steady = res.history[steps // 2:]
    tps = statistics.median(h["tok_per_s"] for h in steady)
    mfu = statistics.median(h["mfu"] for h in steady if h["mfu"] is not None) if steady[0]["mfu"] else None
    print(f"GPT-2-124M on {torch.cuda.get_device_name()}: {tps:,.0f} tokens/s, MFU "
          f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'} (median of steps {steps // 2 + 1}..{steps})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6, help="steps per round (the first is warm-up)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--compile", action="store_true", help="also time ours with torch.compile")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 is steadier on a busy box")
    p.add_argument("--gpu_mfu", action="store_true", help="instead: MFU of GPT-2-124M on CUDA (bf16, compiled)")
    args = p.parse_args()
    if args.gpu_mfu:
        return gpu_mfu(args.batch if args.batch != 8 else 16, args.seq if args.seq != 256 else 1024, max(args.steps, 40))

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = Transformer(CFG)
    hf = hf_llama(CFG, ours)
    x = torch.randint(0, CFG.vocab_size, (args.batch, args.seq))
    y = torch.randint(0, CFG.vocab_size, (args.batch, args.seq))
    with torch.no_grad():  # same weights, same function
        diff = (ours(x[:1]) - hf(input_ids=x[:1]).logits).abs().max().item()
    n_params = ours.num_params()
    print(f"model: {n_params / 1e6:.2f}M params | batch {args.batch} x seq {args.seq} | fp32 | torch {torch.__version__} | "
          f"{os.cpu_count()} CPU(s) {platform.processor() or platform.machine()} | threads {torch.get_num_threads()} | "
          f"logits max |ours - hf| {diff:.1e}")

    rows = {"ours/loop": [], "ours/bare": [], "hf/bare": [], "hf/loop": []}
    if args.compile:
        rows["ours/loop+compile"] = []
    cpu = {k: [] for k in rows}
    for r in range(args.rounds):
        # Each row starts from its own copy of the same weights.
        runs = {"ours/loop": lambda: in_loop(_fresh(ours), ours_loss, (x, y), args.steps, False),
                "ours/bare": lambda: bare(_fresh(ours), ours_loss, (x, y), args.steps),
                "hf/bare": lambda: bare(hf_llama(CFG, ours), hf_loss, (x, y), args.steps),
                "hf/loop": lambda: in_loop(hf_llama(CFG, ours), hf_loss, (x, y), args.steps, False)}
        if args.compile:
            runs["ours/loop+compile"] = lambda: in_loop(_fresh(ours), ours_loss, (x, y), args.steps + 2, True)
        for name, fn in runs.items():
            wall, used = fn()
            rows[name] += wall[2:] if name.endswith("compile") else wall  # compile warms up over more steps
            cpu[name] += used[2:] if name.endswith("compile") else used
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {statistics.median(v) * 1000:.0f} ms" for k, v in rows.items()),
              flush=True)

    tokens = args.batch * args.seq
    ref_wall, ref_cpu = statistics.median(rows["hf/bare"]), statistics.median(cpu["hf/bare"])
    print(f"\nmedian over {len(rows['hf/bare'])} steps per row; CPU time = this process's, robust to other load on the box")
    print(f"{'row':<20}{'wall ms':>9}{'tokens/s':>10}{'vs hf/bare':>12}{'cpu ms':>9}{'vs hf/bare':>12}")
    for k in rows:
        w, c = statistics.median(rows[k]), statistics.median(cpu[k])
        print(f"{k:<20}{w * 1000:>9.0f}{tokens / w:>10,.0f}{ref_wall / w:>11.2f}x{c * 1000:>9.0f}{ref_cpu / c:>11.2f}x")


def _fresh(model: Transformer) -> Transformer:
    m = Transformer(model.cfg)
    m.load_state_dict(model.state_dict())
    return m


if __name__ == "__main__":
    main_guard(main)
