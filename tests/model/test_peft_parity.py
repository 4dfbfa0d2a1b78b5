"""Our LoRA == HuggingFace PEFT's LoRA on the HF-exported model, same A/B weights (fp32, <= 1e-4)."""
import pytest
import torch

from model import ModelConfig, Transformer
from model.hf_interop import to_hf
from model.lora import apply_lora, lora_layers

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TINY = dict(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=32)
IDX = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))


def base_pair():
    """Our randomized base model and LlamaForCausalLM holding the same weights."""
    torch.manual_seed(0)
    ours = Transformer(ModelConfig(**TINY)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    hf_state, hf_config = to_hf(ours.state_dict(), ours.cfg)
    cfg = transformers.AutoConfig.for_model(**hf_config)
    cfg._attn_implementation = "eager"
    theirs = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    theirs.load_state_dict(hf_state, strict=False)
    return ours, theirs


def random_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.1)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_logits_match_peft(rslora):
    ours, theirs = base_pair()
    names = apply_lora(ours, ["q_proj", "v_proj", "o_proj", "down_proj"], r=4, alpha=12, rslora=rslora)
    random_adapters(ours)
    config = peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, use_rslora=rslora,
                             target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights=False)
    theirs = peft.get_peft_model(theirs, config).eval()
    from model.peft_export import hf_module_name

    with torch.no_grad():
        for name in names:
            layer = lora_layers(ours)[name]
            target = theirs.base_model.model.get_submodule(hf_module_name(name, ours.cfg))
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)
        diff = (ours(IDX) - theirs(input_ids=IDX).logits).abs().max().item()
        with theirs.disable_adapter():
            base_diff = (ours(IDX) - theirs(input_ids=IDX).logits).abs().max().item()
    assert diff <= 1e-4, diff
    assert base_diff > 1e-2  # the adapters really change the output, so the match above means something

