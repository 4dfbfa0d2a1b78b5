"""model/load.py, the one door from a checkpoint directory to a model and its tokenizer."""
import json

import pytest
import torch

from model import ModelConfig, Transformer
from model.heads import ScalarHeadModel, save_scalar_model
from model.load import checkpoint_kind, load, load_model, load_tokenizer, read_config, tokenizer_path
from model.lora import LoRAConfig, apply_lora, lora_layers, merge_and_unload, save_adapter
from tests.inference.test_server_helpers import train_tokenizer
from utils.checkpoint import save_checkpoint
from utils.errors import UserError

CFG = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
IDS = torch.tensor([[1, 7, 42, 9, 100, 3]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    tok = train_tokenizer(root / "tok.json", 300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=320, **CFG))
    return {"root": root, "tok": tok, "model": model.eval(), "dir": save_checkpoint(root / "base", model, tokenizer_path=tok)}


def adapter_over(base_dir, path, seed=1, **meta):
    model = load_model(base_dir, train=True)
    apply_lora(model, "all-linear", r=4, alpha=8)
    torch.manual_seed(seed)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    save_adapter(path, model, LoRAConfig(r=4, alpha=8), base_checkpoint=str(base_dir), **meta)
    return merge_and_unload(model).eval()


def test_full_checkpoint_round_trips_in_eval_mode_on_the_asked_dtype(base):
    model = load_model(base["dir"])
    assert not model.training and checkpoint_kind(base["dir"]) == "model"
    with torch.no_grad():
        assert torch.equal(model(IDS), base["model"](IDS))
    assert load_model(base["dir"], train=True).training
    assert next(load_model(base["dir"], dtype="bf16").parameters()).dtype == torch.bfloat16


def test_adapter_is_merged_and_an_adapter_over_an_adapter_too(base):
    root = base["root"]
    want = adapter_over(base["dir"], root / "a1")
    with torch.no_grad():
        torch.testing.assert_close(load_model(root / "a1")(IDS), want(IDS), atol=1e-5, rtol=0)
    kept = load_model(root / "a1", merge=False)
    assert lora_layers(kept)  # merge=False keeps the adapters (to train them further)
    # A policy trained with LoRA over an SFT adapter records that adapter as its base.
    want2 = adapter_over(root / "a1", root / "a2", seed=2)
    with torch.no_grad():
        torch.testing.assert_close(load_model(root / "a2")(IDS), want2(IDS), atol=1e-5, rtol=0)
    assert tokenizer_path(root / "a2") == base["dir"] / "tokenizer.json"  # found through both bases


def test_reward_model_needs_expect_and_language_models_refuse_it(base):
    torch.manual_seed(3)
    rm = ScalarHeadModel(Transformer(ModelConfig(vocab_size=320, **CFG)))
    save_scalar_model(base["root"] / "rm", rm)
    loaded = load_model(base["root"] / "rm", expect="scalar_head")
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), rm.eval()(IDS))
    with pytest.raises(UserError, match="not a language model"):
        load_model(base["root"] / "rm", expect="lm")
    with pytest.raises(UserError, match="not a reward model"):
        load_model(base["dir"], expect="scalar_head")


def test_config_override_must_fit_the_weights(base):
    longer = ModelConfig(vocab_size=320, **{**CFG, "max_seq_len": 128})
    assert load_model(base["dir"], config=longer).cfg.max_seq_len == 128
    with pytest.raises(UserError, match="do not fit this model"):
        load_model(base["dir"], config=ModelConfig(vocab_size=320, **{**CFG, "d_ff": 96}))


def test_tokenizer_rule_and_vocabulary_check(base, tmp_path):
    assert load_tokenizer(base["dir"]).path == base["dir"] / "tokenizer.json"
    assert tokenizer_path(base["dir"], override=base["tok"]) == base["tok"]
    with pytest.raises(UserError, match="does not exist"):
        tokenizer_path(base["dir"], override=tmp_path / "nope.json")
    bare = save_checkpoint(tmp_path / "bare", base["model"])
    with pytest.raises(UserError, match="no tokenizer.json"):
        load(bare)
    assert tokenizer_path(bare, required=False) is None
    small = save_checkpoint(tmp_path / "small", Transformer(ModelConfig(vocab_size=64, **CFG)), tokenizer_path=base["tok"])
    with pytest.raises(UserError, match="tokenizer .* has 300 tokens but the model's vocab_size is 64"):
        load(small)


@pytest.mark.parametrize("damage,fragment", [
    (lambda d: (d / "model_config.json").write_text('{"d_model": "big"}'), "invalid model config"),
    (lambda d: (d / "model_config.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "meta.json").write_text("[1, 2]"), "must hold a JSON object"),
    (lambda d: (d / "meta.json").write_text('{"kind": "mystery"}'), "kind='mystery'"),
    (lambda d: (d / "model.safetensors").unlink(), "has no model.safetensors"),
])
def test_damaged_checkpoints_are_one_clear_error(base, tmp_path, damage, fragment):
    ckpt = save_checkpoint(tmp_path / "c", base["model"], tokenizer_path=base["tok"])
    damage(ckpt)
    with pytest.raises(UserError, match=fragment):
        load_model(ckpt)


def test_adapter_base_missing_or_moved(base, tmp_path):
    adapter_over(base["dir"], tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    (tmp_path / "a" / "meta.json").write_text(json.dumps({**meta, "base_checkpoint": str(tmp_path / "gone")}))
    with pytest.raises(UserError, match="does not exist here; pass the base"):
        load_model(tmp_path / "a")
    assert load_model(tmp_path / "a", base=base["dir"]).cfg == read_config(base["dir"])  # base= overrides the record
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "missing")
