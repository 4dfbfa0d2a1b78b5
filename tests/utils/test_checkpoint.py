import hashlib
import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch

from model import ModelConfig, Transformer
from model.load import load_model
from utils.checkpoint import CheckpointManager, load_train_state, load_weights, read_meta, save_checkpoint
from tests.utils.faults import flip_bytes, safetensors_data_start, write_then_die
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


def test_truncated_weights_is_a_clear_error(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "c", Transformer(CFG))
    f = tmp_path / "c" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(UserError, match="model.safetensors does not match the checksum"):
        load_model(tmp_path / "c")
    monkeypatch.setenv("LLM_VERIFY_CHECKSUMS", "0")  # unchecked, the parse still fails clearly
    with pytest.raises(UserError, match="truncated or damaged"):
        load_model(tmp_path / "c")


@pytest.mark.parametrize("n_bytes", [1, 16])
def test_flipped_bytes_in_the_weights_data_are_caught_at_load(tmp_path, monkeypatch, n_bytes):
    """Flips in the data region parse fine (they loaded silently before); the checksum stops them."""
    model = Transformer(CFG)
    save_checkpoint(tmp_path / "c", model, train_state={"step": 1})
    f = tmp_path / "c" / "model.safetensors"
    assert len(load_weights(tmp_path / "c")) > 0
    flip_bytes(f, n_bytes, seed=n_bytes, start=safetensors_data_start(f))
    for load in (load_weights, load_model):
        with pytest.raises(UserError, match=r"c/model.safetensors does not match the checksum .*damaged"):
            load(tmp_path / "c")
    monkeypatch.setenv("LLM_VERIFY_CHECKSUMS", "0")  # the way out for huge checkpoints: not verified
    changed = load_weights(tmp_path / "c")
    assert any(not torch.equal(changed[k], v) for k, v in model.weights().items())


def test_flipped_bytes_in_the_train_state_are_caught(tmp_path):
    save_checkpoint(tmp_path / "c", Transformer(CFG), train_state={"step": 1, "x": torch.randn(1000)})
    flip_bytes(tmp_path / "c" / "train_state.pt", 1, seed=0, start=(tmp_path / "c" / "train_state.pt").stat().st_size // 2)
    with pytest.raises(UserError, match="train_state.pt does not match the checksum"):
        load_train_state(tmp_path / "c")


def test_checksums_are_sha256sum_of_the_files(tmp_path):
    save_checkpoint(tmp_path / "c", Transformer(CFG), train_state={"step": 1})
    sums = read_meta(tmp_path / "c")["checksums"]
    assert set(sums) == {"model.safetensors", "train_state.pt"}
    for name, value in sums.items():
        assert value == "sha256:" + hashlib.sha256((tmp_path / "c" / name).read_bytes()).hexdigest()


def test_save_fsyncs_the_files_and_the_directory_after_the_rename(tmp_path, monkeypatch):
    """Durability: the data and the rename are both on disk before save returns."""
    import utils.fs as fs

    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(fs.os, "fsync", lambda fd: (calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(fs.os, "replace", lambda a, b: (calls.append(("replace", str(b))), real_replace(a, b))[1])
    final = tmp_path / "c"
    save_checkpoint(final, Transformer(CFG), train_state={"step": 1})
    renamed = calls.index(("replace", str(final)))
    synced_before = [p for op, p in calls[:renamed] if op == "fsync"]
    for name in ("model.safetensors", "train_state.pt", "meta.json", "model_config.json"):
        assert any(p.endswith("/" + name) for p in synced_before), f"{name} not fsynced before the rename"
    assert any(Path(p).name.startswith(".c.tmp-") for p in synced_before), "the temp directory's entries are not fsynced"
    assert ("fsync", str(tmp_path)) in calls[renamed + 1:], "the parent directory is not fsynced after the rename"


def test_wrong_architecture_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path / "c", Transformer(CFG))
    other = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4)
    (tmp_path / "c" / "model_config.json").write_text(__import__("json").dumps(other.to_dict()))
    with pytest.raises(UserError, match="different architecture"):
        load_model(tmp_path / "c")


def test_killed_writer_leaves_previous_checkpoint_loadable(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    model = Transformer(CFG)
    manager.save(1, model)
    proc = mp.get_context("spawn").Process(target=write_then_die, args=(manager.path_for(2),))
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
