"""The MoE balance loss is one decision (model/loss.py::with_aux_loss), taken by every stage:
added to the stage's own loss and logged, off only when the recipe says so."""
import pytest
import torch

from model import ModelConfig, Transformer
from model.loss import with_aux_loss

MOE = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48, ffn="moe", max_seq_len=32,
                  moe=dict(n_routed_experts=4, n_shared_experts=1, n_experts_per_tok=2, moe_d_ff=16, first_k_dense=1,
                           seq_aux_loss_coef=0.05))
X = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def mean_logit_loss(model, batch):
    return model(batch).mean(), {"n_tokens": batch.numel()}


def test_aux_loss_is_added_logged_and_consumed():
    torch.manual_seed(0)
    model = Transformer(MOE).train()
    loss, metrics = with_aux_loss(mean_logit_loss)(model, X)
    assert metrics["aux_loss"] > 0 and metrics["n_tokens"] == X.numel()
    assert loss.item() == pytest.approx(metrics["ce_loss"].item() + metrics["aux_loss"].item(), rel=1e-6)
    loss.backward()  # the balance loss is part of the graph: the router gets its gradient
    assert model.layers[1].ffn.router.weight.grad.abs().sum() > 0
    assert model.aux_loss() is None  # read once: a stale loss (freed graph) is never added again


def test_dense_models_and_the_recipe_switch_leave_the_loss_alone():
    torch.manual_seed(0)
    dense = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_seq_len=32))
    loss, metrics = with_aux_loss(mean_logit_loss)(dense, X)
    assert set(metrics) == {"n_tokens"}
    said = []
    assert with_aux_loss(mean_logit_loss, enabled=False, log=said.append) is mean_logit_loss
    assert "train.aux_loss=false" in said[0]


def test_sft_on_an_moe_base_includes_it(tmp_path):
    from finetune.recipe import SFTRecipe
    from finetune.sft import run_sft
    from tests.finetune.test_sft import FixedBatches
    from utils.checkpoint import save_checkpoint
    from utils.config import config_from_dict

    torch.manual_seed(0)
    base = save_checkpoint(tmp_path / "base", Transformer(MOE))
    recipe = config_from_dict(SFTRecipe, {
        "base_checkpoint": str(base), "data": {"bin_dir": str(tmp_path)}, "format_eval_prompts": 0,
        "train": {"out_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 4, "seq_len": 15, "device": "cpu",
                  "progress": False, "log_every": 1}})
    history = run_sft(recipe, "full", batches=FixedBatches(), eval_fn=lambda m: {}).history
    assert all(h["aux_loss"] > 0 and h["loss"] > h["ce_loss"] for h in history)
