"""LoRA adapters as PEFT writes them (``PeftModel.save_pretrained``: adapter_config.json +
adapter_model.safetensors) load through the one loader, merged onto their base: the same logits as
the PEFT model in transformers (<= 1e-4) for plain, rsLoRA, per-module rank/alpha, embedding,
modules_to_save and GPT-2's fan_in_fan_out adapters; what the merge cannot express is refused."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from model.load import checkpoint_kind, load, load_model  # noqa: E402
from utils.errors import UserError  # noqa: E402

IDX = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
SIZES = dict(vocab_size=320, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)


def base(tmp_path, family: str = "llama", tie: bool = False):
    """A random transformers model saved as an HF directory, and reloaded from it (so PEFT records the path)."""
    if family == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=320, n_positions=64)
    else:
        cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family]
        config = cls(hidden_size=32, intermediate_size=64, num_key_value_heads=2, tie_word_embeddings=tie, **SIZES)
    torch.manual_seed(0)
    kind = transformers.AutoModelForCausalLM
    kind.from_config(config).save_pretrained(tmp_path / "base")
    return kind.from_pretrained(tmp_path / "base").eval()


def adapt(model, tmp_path, **lora):
    """PEFT's LoRA on ``model``, its B matrices made non-zero (as after training), saved; the PEFT model."""
    pm = peft.get_peft_model(model, peft.LoraConfig(**lora))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(tmp_path / "adapter")
    return pm.eval()


def same_logits(pm, tmp_path, **kw):
    ours = load_model(tmp_path / "adapter", **kw)
    with torch.no_grad():
        diff = (ours(IDX) - pm(IDX).logits).abs().max().item()
    assert diff <= 1e-4, diff
    return ours


@pytest.mark.parametrize("family, lora", [
    ("llama", {"r": 4, "lora_alpha": 16, "target_modules": "all-linear"}),
    ("qwen2", {"r": 8, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj", "v_proj", "down_proj"],
               "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"layers.1.self_attn.q_proj": 32}}),
    ("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "embed_tokens"], "modules_to_save": ["lm_head"]}),
    ("gpt2", {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True}),
])
def test_a_peft_adapter_loads_merged_with_the_same_logits(tmp_path, family, lora):
    pm = adapt(base(tmp_path, family), tmp_path, **lora)
    assert checkpoint_kind(tmp_path / "adapter") == "peft"
    same_logits(pm, tmp_path)


def test_a_tied_base_whose_head_the_adapter_trained_comes_apart(tmp_path):
    """modules_to_save=[lm_head] on a tied model: PEFT trains a copy of the head, so the merged model
    has its own head beside the (adapted) embeddings."""
    pm = adapt(base(tmp_path, "qwen2", tie=True), tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"],
               modules_to_save=["lm_head"])
    ours = same_logits(pm, tmp_path)
    assert not ours.cfg.tie_embeddings


def test_the_base_and_the_tokenizer_come_from_where_they_are_named(tmp_path):
    """The base: ``base`` when given, else the config's base_model_name_or_path; a base that is not here
    is a clear error naming base_checkpoint. The tokenizer comes from the base when the adapter has none."""
    from tests.data_pipeline.hf_style import save_hf_tokenizer

    pm = adapt(base(tmp_path), tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    save_hf_tokenizer(tmp_path / "base", "chatml", vocab_size=300)
    config_file = tmp_path / "adapter/adapter_config.json"
    config = json.loads(config_file.read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": "someone/Llama-3-8B"}))
    with pytest.raises(UserError, match="goes on 'someone/Llama-3-8B', which is not a directory here.*base_checkpoint"):
        load_model(tmp_path / "adapter")
    same_logits(pm, tmp_path, base=tmp_path / "base")
    model, tok = load(tmp_path / "adapter", base=tmp_path / "base")
    assert tok.vocab_size <= model.cfg.vocab_size


@pytest.mark.parametrize("change, match", [
    ({"use_dora": True}, "use_dora=True \\(DoRA's magnitude vectors\\) is not implemented"),
    ({"bias": "all"}, "bias='all' \\(trained bias terms\\)"),
    ({"init_lora_weights": "pissa"}, "relative to a base that initialisation changed"),
    ({"peft_type": "IA3"}, "holds a PEFT 'IA3' adapter"),
    ({"rank_pattern": {"q_proj(": 2}}, "not a valid pattern"),
    ({"lora_alpha": "16"}, "lora_alpha a number"),
    ({"alpha_pattern": {"q_proj": "x"}}, "map module names to numbers"),
])
def test_what_the_merge_cannot_express_is_refused(tmp_path, change, match):
    adapt(base(tmp_path), tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    config_file = tmp_path / "adapter/adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    with pytest.raises(UserError, match=match):
        load_model(tmp_path / "adapter")


def test_a_pickled_adapter_and_a_foreign_base_are_refused(tmp_path):
    adapt(base(tmp_path), tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    (tmp_path / "adapter/adapter_model.safetensors").rename(tmp_path / "adapter/adapter_model.bin")
    with pytest.raises(UserError, match="no adapter_model.safetensors"):
        load_model(tmp_path / "adapter")
    (tmp_path / "adapter/adapter_model.bin").rename(tmp_path / "adapter/adapter_model.safetensors")
    other = tmp_path / "other"
    config = transformers.LlamaConfig(hidden_size=48, intermediate_size=64, num_key_value_heads=2, **SIZES)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(other)
    with pytest.raises(UserError, match="update is .* but its weight is"):
        load_model(tmp_path / "adapter", base=other)


def test_hf_convert_import_merges_a_peft_adapter_into_a_checkpoint(tmp_path):
    """`python model/hf_convert.py import --hf_dir <adapter> --out <dir> [--base_checkpoint <base>]`."""
    from model.hf_convert import main

    pm = adapt(base(tmp_path), tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    main(["import", "--hf_dir", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"),
          "--base_checkpoint", str(tmp_path / "base")])
    assert checkpoint_kind(tmp_path / "merged") == "model"
    with torch.no_grad():
        assert (load_model(tmp_path / "merged")(IDX) - pm(IDX).logits).abs().max().item() <= 1e-4
