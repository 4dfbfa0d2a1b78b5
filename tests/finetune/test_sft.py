"""SFT: assistant-only loss, the three modes through the one loop, saved outputs, long context."""
import pytest
import torch

from finetune.recipe import SFTRecipe
from finetune.sft import long_context_config, run_sft, sft_loss
from model.load import load_model
from model import ModelConfig, Transformer
from utils.checkpoint import load_weights, read_meta, save_checkpoint
from utils.config import config_from_dict
from utils.errors import UserError

# init_std 0.15: a frozen head of std 0.02 would cap the logits near +-1, and LoRA could not move the loss.
CFG = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32, init_std=0.15)


class FixedBatches:
    """Stand-in for SFTLoader: cycles over a few (x, y, loss_mask) batches, resumable."""

    def __init__(self, n=2, B=4, T=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.batches = []
        for _ in range(n):
            prompt = torch.randint(4, 64, (B, T // 2), generator=g)
            answer = torch.arange(4, 4 + T // 2).expand(B, -1)  # a fixed reply, like a learned answer format
            seq = torch.cat([prompt, answer], 1)
            x, y = seq[:, :-1], seq[:, 1:]
            mask = torch.zeros_like(y, dtype=torch.bool)
            mask[:, T // 2 - 1:] = True  # loss only on answer tokens
            self.batches.append((x, y, mask))
        self.i = 0

    def __iter__(self):
        return self

    def __next__(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


@pytest.fixture
def base_dir(tmp_path):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "base", Transformer(ModelConfig(**CFG)))


def recipe(tmp_path, base_dir, mode, **extra):
    data = {
        "base_checkpoint": str(base_dir),
        "data": {"bin_dir": str(tmp_path)},
        "train": {"out_dir": str(tmp_path / f"run_{mode}"), "max_steps": 12, "batch_size": 4, "seq_len": 15,
                  "device": "cpu", "progress": False, "log_every": 100},
        "optim": {"lr": 1e-2, "warmup_steps": 0, "schedule": "constant"},
        "format_eval_prompts": 0,
    }
    if mode in ("lora", "qlora"):
        data["lora"] = {"r": 4, "alpha": 8, "targets": "all-linear"}
        data["optim"]["lr"] = 3e-2  # adapters start at zero and take a larger LR (as usual for LoRA)
    if mode == "qlora":
        data["qlora"] = {"compute_dtype": "fp32"}
    data.update(extra)
    return config_from_dict(SFTRecipe, data)


def test_loss_counts_assistant_tokens_only():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CFG))
    x, y, mask = FixedBatches(n=1).batches[0]
    loss, metrics = sft_loss(model, (x, y, mask))
    logits = model(x)
    ref = torch.nn.functional.cross_entropy(logits[mask], y[mask])
    assert abs(loss.item() - ref.item()) < 1e-5
    assert metrics["loss_weight"] == mask.sum().item()
    y2 = y.masked_fill(~mask, 0)  # changing prompt targets changes nothing
    assert sft_loss(model, (x, y2, mask))[0].item() == loss.item()
    loss.backward()  # the head runs on the counted rows only; the gradients are the full-logits loss's
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref.backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(ours, model.parameters()))


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_three_modes_train_and_save(tmp_path, base_dir, mode):
    if mode == "qlora":
        pytest.importorskip("bitsandbytes")
    r = recipe(tmp_path, base_dir, mode)
    result = run_sft(r, mode, batches=FixedBatches(), eval_fn=lambda m: {})
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.8 * losses[0], losses
    saved = load_weights(result.checkpoint)
    base = load_weights(base_dir)
    if mode == "full":
        assert set(saved) == set(base) and read_meta(result.checkpoint)["kind"] == "model"
    else:  # adapters only
        assert all(".lora_" in k for k in saved) and len(saved) == 2 * 2 * 7
        assert read_meta(result.checkpoint)["kind"] == "adapter"
    # The saved output rebuilds into a plain model that fits the data as the trained one did.
    model = load_model(result.checkpoint)
    x, y, mask = FixedBatches().batches[0]
    with torch.no_grad():
        assert sft_loss(model, (x, y, mask))[0].item() < 0.8 * losses[0]


def test_wrong_script_for_recipe(tmp_path, base_dir):
    with pytest.raises(UserError, match="sft_lora_train.py"):
        run_sft(recipe(tmp_path, base_dir, "lora"), "full", batches=FixedBatches())
    with pytest.raises(UserError, match="no lora section"):
        config_from_dict(SFTRecipe, {
            "base_checkpoint": str(base_dir), "data": {"bin_dir": str(tmp_path)},
            "train": {"out_dir": str(tmp_path), "max_steps": 1, "batch_size": 1, "seq_len": 8}, "qlora": {}})


def test_long_context_config():
    base = ModelConfig(**CFG)
    with pytest.raises(UserError, match="rope_scaling"):
        long_context_config(base, seq_len=64)
    cfg = long_context_config(base, 64, max_seq_len=64, rope_scaling={"type": "yarn", "factor": 2.0})
    assert cfg.max_seq_len == 64 and cfg.rope_scaling == {"type": "yarn", "factor": 2.0, "original_max_seq_len": 32}
    gpt2 = ModelConfig(**{**CFG, "pos_emb": "learned", "norm": "layernorm", "ffn": "gelu_mlp"})
    with pytest.raises(UserError, match="learned"):
        long_context_config(gpt2, 64, max_seq_len=64)


def test_long_context_lora_run(tmp_path, base_dir):
    r = recipe(tmp_path, base_dir, "lora", max_seq_len=64, rope_scaling={"type": "yarn", "factor": 2.0})
    r.train.seq_len = 47
    r.train.max_steps = 2
    result = run_sft(r, "lora", batches=FixedBatches(n=1, T=48), eval_fn=lambda m: {})
    model = load_model(result.checkpoint)
    assert model.cfg.max_seq_len == 64 and model.cfg.rope_scaling["original_max_seq_len"] == 32


@pytest.mark.parametrize("name,mode", [("sft_full_tiny", "full"), ("sft_lora_tiny", "lora"), ("sft_qlora_tiny", "qlora")])
def test_example_recipes_validate(tmp_path, base_dir, name, mode):
    from pathlib import Path

    from utils.config import load_config

    path = Path(__file__).resolve().parents[2] / "configs" / "examples" / f"{name}.yaml"
    # The data and base paths exist only after the pipeline ran; point them at test dirs.
    r = load_config(SFTRecipe, path, [f"model.init_from={base_dir}", f"data.bin_dir={tmp_path}", "data.tokenizer="])
    assert r.mode == mode
    r.expect_mode(mode)


def test_qlora_with_fsdp_is_refused(tmp_path, base_dir):
    with pytest.raises(UserError, match="ddp"):
        recipe(tmp_path, base_dir, "qlora", train={"out_dir": str(tmp_path), "max_steps": 1, "batch_size": 1,
                                                   "seq_len": 8, "distributed": "fsdp"})


def test_lora_with_modules_to_save(tmp_path, base_dir):
    r = recipe(tmp_path, base_dir, "lora", lora={"r": 2, "alpha": 4, "targets": ["q_proj"], "modules_to_save": ["embed", "lm_head"]})
    r.train.max_steps = 3
    result = run_sft(r, "lora", batches=FixedBatches(), eval_fn=lambda m: {})
    saved = load_weights(result.checkpoint)
    assert {"embed.weight", "lm_head.weight"} <= set(saved) and len(saved) == 2 + 2 * 2
    base = load_weights(base_dir)
    assert not torch.equal(saved["embed.weight"], base["embed.weight"])  # trained in full
    model = load_model(result.checkpoint)
    assert torch.equal(model.embed.weight, saved["embed.weight"])


def test_older_base_checkpoint_spelling_is_read_and_both_spellings_are_refused(tmp_path, base_dir):
    old = recipe(tmp_path, base_dir, "full")
    data = {"base_checkpoint": str(base_dir), "max_seq_len": 48, "data": {"bin_dir": str(tmp_path)},
            "train": {"out_dir": str(tmp_path / "r"), "max_steps": 1, "batch_size": 1, "seq_len": 8}}
    r = config_from_dict(SFTRecipe, data)
    assert r.model.init_from == str(base_dir) == old.model.init_from and r.model.max_seq_len == 48
    with pytest.raises(UserError, match="both base_checkpoint and model.init_from"):
        config_from_dict(SFTRecipe, {**data, "model": {"init_from": str(base_dir)}})
    with pytest.raises(UserError, match="needs model.init_from"):
        config_from_dict(SFTRecipe, {k: v for k, v in data.items() if k != "base_checkpoint"})
