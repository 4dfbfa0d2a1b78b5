"""Pretrain a Transformer on token bins with the shared training loop.

    python pretrain/train.py --config_path configs/examples/pretrain_tiny.yaml [--compile] [train.max_steps=100 ...]
    torchrun --nproc_per_node 8 pretrain/train.py --config_path ...   # DDP / FSDP2 (train.distributed)
    torchrun --nproc_per_node 4 pretrain/train.py --config_path ... train.distributed=fsdp train.parallel.tp=2

Reads the recipe (pretrain/recipe.py), builds the model and the rank-sharded data loader,
and hands both to ``utils.train_loop.train`` with next-token cross-entropy. Writes
``{out_dir}/step_*`` (resumable), ``{out_dir}/final`` (weights + config + tokenizer),
``metrics.jsonl`` and ``loss.png``.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import json
import math
from typing import Callable, Optional

import torch

from data_pipeline.loader import PretrainLoader
from data_pipeline.tokenizer.tokenizer import file_hash
from model.attention import document_ids
from model.loss import lm_loss as next_token_loss
from model.loss import with_aux_loss
from pretrain.recipe import PretrainDataConfig, PretrainRecipe  # noqa: F401  (re-exported for recipe generators)
from utils import distributed as D
from utils.cli import main_guard
from utils.config import parse_args
from utils.errors import UserError
from utils.train_loop import grad_accum_steps, train


def lm_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy: batch = (x, y[, positions]) int64 (B, T); mean over the B*T
    targets (model/loss.py: the chunked head + loss, no (B*T, V) logits). With positions
    (``data.document_mask``) each document of a window attends only to itself. An MoE model's
    balance loss is added by ``model.loss.with_aux_loss``, as in every stage."""
    x, y = batch[:2]
    positions = batch[2] if len(batch) > 2 else None
    documents = document_ids(positions) if positions is not None else None
    return next_token_loss(model, x, y, positions, documents), {"n_tokens": y.numel()}


def make_loader(bin_path: str, recipe: PretrainRecipe, env: D.DistEnv, seed: int) -> PretrainLoader:
    """Random (x, y) windows of a bin, different on every data-parallel rank (the same on the ranks
    of one tensor-parallel group and on every pipeline stage); checks the bins were made by the
    recipe's tokenizer (hash in the bins' meta.json)."""
    tok_hash = file_hash(recipe.data.tokenizer) if recipe.data.tokenizer else None
    return PretrainLoader(bin_path, recipe.train.seq_len, recipe.train.batch_size, seed=seed, rank=env.dp_rank,
                          world_size=env.dp_size, expect_tokenizer_hash=tok_hash,
                          document_mask=recipe.data.document_mask)


def make_eval_fn(recipe: PretrainRecipe, env: D.DistEnv) -> Optional[Callable]:
    """Mean val loss over ``eval_batches`` micro-batches per rank (the same batches every
    time: a fresh loader with a fixed seed), averaged over ranks; perplexity = exp(loss)."""
    if not recipe.data.val_bin:
        return None

    def eval_fn(model) -> dict:
        loader = make_loader(recipe.data.val_bin, recipe, env, seed=0)
        total = 0.0
        for _ in range(recipe.train.eval_batches):
            total += float(lm_loss(model, [t.to(env.device) for t in next(loader)])[0])
        loss = D.all_reduce_mean({"val_loss": total / recipe.train.eval_batches}, env)["val_loss"]
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    return eval_fn


def build_model(recipe: PretrainRecipe) -> torch.nn.Module:
    """A fresh Transformer of ``recipe.model`` (the same init on every rank), or, with
    ``init_from``, the weights of that checkpoint (continued pretraining) through model/load.py."""
    if recipe.init_from:
        from model.load import load_model

        return load_model(recipe.init_from, train=True, expect="lm")
    from model.transformer import Transformer

    torch.manual_seed(recipe.train.seed)
    return Transformer(recipe.model)


def check_vocab(loader: PretrainLoader, recipe: PretrainRecipe) -> None:
    """The bins' vocabulary (meta.json) must fit in the model's embedding."""
    vocab = loader.meta.get("vocab_size")
    if isinstance(vocab, int) and vocab > recipe.model.vocab_size:
        raise UserError(f"{recipe.data.train_bin} holds token ids up to {vocab - 1} but model.vocab_size="
                        f"{recipe.model.vocab_size}; set model.vocab_size >= {vocab} (the tokenizer's size).")


def main(argv=None) -> None:
    recipe, args = parse_args(PretrainRecipe, "Pretrain a Transformer on token bins.", argv,
                              add_args=lambda p: p.add_argument("--compile", action="store_true", help="torch.compile the model"))
    if args.compile:
        recipe.train.compile = True
    env = D.setup(recipe.train.distributed, recipe.train.device, recipe.train.parallel)
    accum = grad_accum_steps(recipe.train, env.dp_size)  # fail on a bad batch before building anything
    loader = make_loader(recipe.data.train_bin, recipe, env, seed=recipe.train.seed)
    check_vocab(loader, recipe)
    model = build_model(recipe)
    if env.is_main:
        n, n_body = model.num_params(), model.num_params(exclude_embeddings=True)
        tokens_step = recipe.train.batch_size * recipe.train.seq_len * accum * env.dp_size
        print(f"pretrain: {n:,} params ({n_body:,} non-embedding) | {tokens_step:,} tokens/step | "
              f"{tokens_step * recipe.train.max_steps:,} tokens over {recipe.train.max_steps} steps", file=sys.stderr)
    loss_fn = with_aux_loss(lm_loss, recipe.train.aux_loss, print if env.is_main else (lambda _: None))
    result = train(model, loader, loss_fn, recipe.train, recipe.optim, eval_fn=make_eval_fn(recipe, env), recipe=recipe,
                   tokenizer_path=recipe.data.tokenizer, checkpoint_meta={"stage": "pretrain"})
    if env.is_main:
        last = result.history[-1] if result.history else {}
        summary = {"final_step": result.final_step, "loss": last.get("loss"), **result.final_eval}
        print(f"pretrain: done {json.dumps(summary)} -> {result.checkpoint}", file=sys.stderr)
    D.cleanup()


if __name__ == "__main__":
    main_guard(main)
