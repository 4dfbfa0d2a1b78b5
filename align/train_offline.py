"""Offline alignment: reward model, DPO, ORPO, KTO, SimPO on preference pairs.

    python align/train_offline.py --config_path configs/examples/align_dpo.yaml [key=value ...]

Reads the starting checkpoint (SFT output) and preference JSONL, then hands the one
training loop (utils/train_loop.py) a batch iterator and the algorithm's loss:

  reward  LM backbone + scalar head, Bradley-Terry loss; final/ is a reward-model checkpoint
  dpo     frozen reference: its log-probs are computed once, before training, and cached
  kto     unpaired: every pair gives a desirable (chosen) and an undesirable (rejected) example
  orpo, simpo   reference-free

Held-out preference accuracy is measured before training, during (train.eval_every) and at
the end, and written to {out_dir}/preference_eval.json.
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import json  # noqa: E402
import time  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

import torch  # noqa: E402

from align.policy import load_policy, load_tokenizer, make_trainable, quantize_base  # noqa: E402
from align.preference import (  # noqa: E402
    PairBatches, ReferenceLogps, compute_reference_logps, make_preference_loss, preference_accuracy,
)
from align.preference_data import load_preference_bins, load_preference_pairs  # noqa: E402
from align.recipe import OfflineRecipe  # noqa: E402
from model.heads import KIND, ScalarHeadModel  # noqa: E402
from model.loss import with_aux_loss  # noqa: E402
from utils.cli import main_guard  # noqa: E402
from utils.config import parse_args  # noqa: E402
from utils.distributed import setup  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.fs import atomic_file  # noqa: E402
from utils.train_loop import TrainResult, grad_accum_steps, train  # noqa: E402


def run(cfg: OfflineRecipe) -> dict:
    """Train as the recipe says; returns {"before": ..., "after": ..., "train": TrainResult}."""
    if cfg.algorithm == "reward" and cfg.model.lora is not None:
        raise UserError("algorithm=reward trains the backbone and scalar head full-parameter; remove the model.lora section.")
    env = setup(cfg.train.distributed, cfg.train.device)
    tokenizer, tokenizer_path = load_tokenizer(cfg.model)
    seq_len = cfg.train.seq_len
    d = cfg.data
    if d.source == "jsonl":
        train_pairs, dropped = load_preference_pairs(d.train_path, tokenizer, seq_len, d.max_train_pairs, d.fields, d.on_bad_row)
        val_pairs, _ = load_preference_pairs(d.val_path, tokenizer, seq_len, d.max_val_pairs, d.fields, d.on_bad_row,
                                             split="validation" if d.val_path.startswith("hf:") else "train")
    else:
        tok_hash = getattr(tokenizer, "hash", None)
        train_pairs, dropped = load_preference_bins(d.bin_dir, "train", tok_hash, seq_len, d.max_train_pairs)
        val_pairs, _ = load_preference_bins(d.bin_dir, "val", tok_hash, seq_len, d.max_val_pairs)
    if env.is_main:
        print(f"{cfg.algorithm}: {len(train_pairs)} train pairs ({dropped} dropped: prompt beyond seq_len {seq_len}), "
              f"{len(val_pairs)} held-out pairs")

    policy = load_policy(cfg.model, env.device)
    if seq_len > policy.cfg.max_seq_len:
        raise UserError(f"train.seq_len={seq_len} exceeds the model's context of {policy.cfg.max_seq_len}; lower it.")
    quantized = quantize_base(policy, cfg.model)
    bs = cfg.train.batch_size
    needs_ref = cfg.algorithm in ("dpo", "kto")
    # The reference is the starting policy. Its log-probs are computed now, once: for the
    # training pairs (dpo/kto losses) and for the held-out pairs (the log-ratio accuracy).
    batches = PairBatches(train_pairs, bs, seed=cfg.train.seed, rank=env.rank, world_size=env.world_size)
    t0 = time.perf_counter()
    train_ref: Optional[ReferenceLogps] = None
    if needs_ref:
        # Only the pairs this run's max_steps will reach (a short run skips most of a big file);
        # a spike rollback replays steps on fresh data, so then every pair is computed.
        n_batches = cfg.train.max_steps * grad_accum_steps(cfg.train, env.world_size)
        rollback = cfg.train.spike.enabled and cfg.train.spike.policy == "rollback"
        used = list(range(len(train_pairs))) if rollback else batches.upcoming(n_batches)
        train_ref = compute_reference_logps(policy, train_pairs, bs, env.device, cfg.algorithm == "kto", used)
    val_ref = compute_reference_logps(policy, val_pairs, bs, env.device) if cfg.algorithm != "reward" else None
    if env.is_main and val_ref is not None:
        print(f"reference log-probs cached in {time.perf_counter() - t0:.1f}s "
              f"({len(used) if needs_ref else 0} train + {len(val_pairs)} held-out pairs)")

    if cfg.algorithm == "reward":
        model = ScalarHeadModel(policy).to(env.device)
        trainable_params, weights_fn, meta = None, lambda m: m.weights(live=True), {"kind": KIND}
    else:
        model = policy
        trainable = make_trainable(model, cfg.model, quantized)  # LoRA adapters start at B = 0: still the reference
        trainable_params, weights_fn, meta = trainable.params, trainable.weights_fn, trainable.meta
    meta = {**meta, "stage": f"align_{cfg.algorithm}"}

    is_rm = cfg.algorithm == "reward"

    def eval_fn(m: torch.nn.Module) -> dict:
        out = preference_accuracy(m, val_pairs, val_ref, bs, env.device, reward_model=is_rm)
        return {f"val_{k}": v for k, v in out.items() if k != "n_pairs"}

    before = eval_fn(model)
    if env.is_main:
        print(f"before: {json.dumps(before)}")
    loss_fn = make_preference_loss(
        cfg.algorithm, beta=cfg.loss.beta, ref=train_ref, pairs=train_pairs, label_smoothing=cfg.loss.label_smoothing,
        dpo_loss_type=cfg.loss.dpo_loss_type, orpo_lambda=cfg.loss.orpo_lambda, simpo_gamma=cfg.loss.simpo_gamma,
        kto_desirable_weight=cfg.loss.kto_desirable_weight, kto_undesirable_weight=cfg.loss.kto_undesirable_weight)
    loss_fn = with_aux_loss(loss_fn, cfg.train.aux_loss, print if env.is_main else (lambda s: None))
    result: TrainResult = train(model, batches, loss_fn, cfg.train, cfg.optim, eval_fn=eval_fn, recipe=cfg,
                                params=trainable_params, weights_fn=weights_fn, checkpoint_meta=meta,
                                tokenizer_path=tokenizer_path)
    after = result.final_eval
    summary = {"algorithm": cfg.algorithm, "n_val_pairs": len(val_pairs), "before": before, "after": after,
               "steps": result.final_step, "checkpoint": str(result.checkpoint)}
    if env.is_main:
        print(f"after:  {json.dumps(after)}")
        with atomic_file(pathlib.Path(cfg.train.out_dir) / "preference_eval.json") as f:
            json.dump(summary, f, indent=2)
    return {**summary, "train": result}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cfg, _ = parse_args(OfflineRecipe, "Reward model / DPO / ORPO / KTO / SimPO on preference pairs.", argv)
    return run(cfg)


if __name__ == "__main__":
    main_guard(main)
