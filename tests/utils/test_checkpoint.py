import multiprocessing as mp
import os

import pytest
import torch

from model import ModelConfig, Transformer
from model.load import load_model
from utils.checkpoint import CheckpointManager, load_train_state, save_checkpoint
from utils.errors import UserError

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=True)


def test_round_trip_with_train_state(tmp_path):
    model = Transformer(CFG)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 64, (1, 8))).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "c", model, train_state={"optim": opt.state_dict(), "step": 3, "rng": torch.get_rng_state()})
    again = load_model(tmp_path / "c")
    x = torch.randint(0, 64, (2, 8))
    assert torch.equal(model(x), again(x))
    assert again.lm_head.weight is again.embed.weight  # tie survives the round trip
    state = load_train_state(tmp_path / "c")
    assert state["step"] == 3 and "state" in state["optim"]


def test_truncated_weights_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path / "c", Transformer(CFG))
    f = tmp_path / "c" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or damaged"):
        load_model(tmp_path / "c")


def test_wrong_architecture_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path / "c", Transformer(CFG))
    other = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4)
    (tmp_path / "c" / "model_config.json").write_text(__import__("json").dumps(other.to_dict()))
    with pytest.raises(UserError, match="different architecture"):
        load_model(tmp_path / "c")


def _write_then_die(path):
    # Simulate a crash in the middle of writing: the process dies inside the atomic block.
    import utils.checkpoint as ck

    real = ck.torch.save

    def dying_save(obj, f, *a, **k):
        real(obj, f, *a, **k)
        os._exit(1)

    ck.torch.save = dying_save
    ck.save_checkpoint(path, Transformer(CFG), train_state={"step": 2})


def test_killed_writer_leaves_previous_checkpoint_loadable(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    model = Transformer(CFG)
    manager.save(1, model)
    proc = mp.get_context("spawn").Process(target=_write_then_die, args=(manager.path_for(2),))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 1
    assert not manager.path_for(2).exists()  # only a hidden temp dir may remain
    assert manager.latest() == manager.path_for(1)
    x = torch.randint(0, 64, (1, 4))
    assert torch.equal(load_model(manager.latest())(x), model(x))


def test_keep_last(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    model = Transformer(CFG)
    for step in (1, 2, 3):
        manager.save(step, model)
    assert manager.steps() == [2, 3] and manager.latest().name == "step_00000003"
