"""model/peft_export.py: a PEFT adapter that PEFT loads, and a merged QLoRA model that transformers loads,
both giving our adapted logits (fp32, <= 1e-4)."""
import pytest
import torch

from model.peft_export import export_merged_hf, export_peft_adapter
from model.lora import LoRAConfig, apply_lora, lora_layers

transformers = pytest.importorskip("transformers")


def test_exported_peft_adapter_loads_with_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from tests.model.test_peft_parity import IDX, base_pair, random_adapters

    ours, theirs = base_pair()
    lora_cfg = LoRAConfig(r=2, alpha=4, targets="all-linear")
    apply_lora(ours, lora_cfg.targets, lora_cfg.r, lora_cfg.alpha)
    random_adapters(ours, seed=2)
    export_peft_adapter(ours, lora_cfg, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(theirs, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        diff = (ours(IDX) - loaded(input_ids=IDX).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_qlora_merged_export_loads_in_transformers(tmp_path):
    pytest.importorskip("bitsandbytes")
    from tests.model.test_quant import IDX, qlora_and_reference

    qmodel, _ = qlora_and_reference()
    with torch.no_grad():
        adapted = qmodel(IDX)
    export_merged_hf(qmodel, tmp_path / "hf")  # merges a copy: the QLoRA model stays as it was
    assert type(lora_layers(qmodel)["layers.0.attn.q_proj"].base).__name__ == "Linear4bit"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(IDX).logits - adapted).abs().max().item() <= 1e-4
