"""MoE models in the loop: aux loss, bias updates, load logging."""
import pytest
import torch

from model import Transformer
from model.loss import with_aux_loss
from pretrain.train import lm_loss
from tests.utils.helpers import MOE, SEQ, StreamLoader
from utils.optim import OptimConfig
from utils.train_loop import TrainConfig, train


def test_moe_model_trains_with_aux_loss_bias_updates_and_load_metrics(tmp_path):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Transformer(MOE)
    moe = model.layers[1].ffn
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=3, batch_size=2, seq_len=SEQ, device="cpu", progress=False,
                      log_every=1)
    res = train(model, StreamLoader(2), with_aux_loss(lm_loss), cfg, OptimConfig(lr=1e-2, warmup_steps=0))
    rec = res.history[-1]
    assert rec["aux_loss"] > 0 and rec["loss"] == pytest.approx(rec["ce_loss"] + rec["aux_loss"], rel=1e-5)
    load = moe.last_load.float()  # the last forward's tokens per expert, as logged for the last step
    assert rec["expert_load_max_over_mean"] == pytest.approx(float(load.max() / load.mean()), rel=1e-6)
    assert moe.expert_bias.abs().sum() > 0  # update_bias() ran after the optimizer steps

