"""model/peft_export.py: a PEFT adapter that PEFT loads, and a merged QLoRA model that transformers loads,
both giving our adapted logits (fp32, <= 1e-4)."""
import pytest
import torch

from model.peft_export import export_merged_hf, export_peft_adapter
from model.lora import LoRAConfig, apply_lora, lora_layers
from utils.errors import UserError

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


# Every family's adapter through PEFT onto its exported base. DeepSeek-V3 adapts attention only: PEFT
# reads its gate/up/down_proj targets as the fused experts (test_deepseek_mlp_adapters_are_refused).
# The other MoE families adapt every linear layer but the routed experts, which have no PEFT form
# (test_routed_expert_adapters_are_refused); "all-linear" includes them.
TARGETS = {"deepseek_v3": ["q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj", "o_proj"],
           "mixtral": ["attn"], "qwen2_moe": ["attn", "shared_experts"], "qwen3_moe": ["attn"]}
RSLORA = {"phi3", "gpt2"}  # fused q|k|v (and gate|up): rank 3r with alpha scaled, checked with rsLoRA's sqrt too


def peft_outcome(tmp_path, cfg, lora_cfg):
    """(our adapted logits - PEFT's, our adapted logits - the base's) on an exported base + adapter."""
    peft = pytest.importorskip("peft")
    from model import Transformer
    from model.hf_interop import export_hf
    from tests.model.hf_check import IDX
    from tests.model.test_hf_parity import randomize
    from tests.model.test_peft_parity import random_adapters

    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    randomize(ours)
    export_hf(ours, tmp_path / "base")
    apply_lora(ours, lora_cfg.targets, lora_cfg.r, lora_cfg.alpha, rslora=lora_cfg.rslora)
    random_adapters(ours, seed=2)
    export_peft_adapter(ours, lora_cfg, tmp_path / "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        adapted = ours(IDX)
        with loaded.disable_adapter():
            plain = loaded(input_ids=IDX).logits
        return (adapted - loaded(input_ids=IDX).logits).abs().max().item(), (adapted - plain).abs().max().item()


@pytest.mark.parametrize("family", sorted(__import__("tests.model.hf_check", fromlist=["x"]).FAMILY_CASES))
def test_peft_adapter_of_every_family(tmp_path, family):
    from tests.model.hf_check import FAMILY_CASES

    lora_cfg = LoRAConfig(r=2, alpha=4, targets=TARGETS.get(family, "all-linear"), rslora=family in RSLORA)
    diff, effect = peft_outcome(tmp_path, FAMILY_CASES[family], lora_cfg)
    assert diff <= 1e-4 and effect > 1e-2, (diff, effect)  # equal, and the adapters do change the output


@pytest.mark.parametrize("targets", [["q_proj"], ["v_proj", "up_proj"]])
def test_peft_adapter_on_part_of_a_fused_weight(tmp_path, targets):
    from tests.model.hf_check import FAMILY_CASES

    diff, effect = peft_outcome(tmp_path, FAMILY_CASES["phi3"], LoRAConfig(r=2, alpha=4, targets=targets))
    assert diff <= 1e-4 and effect > 1e-2, (diff, effect)


def test_deepseek_rope_rows_reach_lora_b(tmp_path):
    """DeepSeek's export permutes the RoPE rows of q_b_proj / q_proj / kv_a_proj_with_mqa; lora_B's
    rows are those rows (measured 1.15-1.5 off before they were permuted too)."""
    from tests.model.hf_check import FAMILY_CASES
    from tests.model.test_hf_parity import CONFIGS

    for name, cfg, targets in (("q_lora", FAMILY_CASES["deepseek_v3"], ["q_b_proj", "kv_a_proj"]),
                               ("no_q_lora", CONFIGS["deepseek_v3_mla_dense"], ["q_proj", "kv_a_proj"])):
        diff, effect = peft_outcome(tmp_path / name, cfg, LoRAConfig(r=2, alpha=4, targets=targets))
        assert diff <= 1e-4 and effect > 1e-2, (name, diff, effect)


def test_deepseek_mlp_adapters_are_refused(tmp_path):
    """PEFT on transformers 5 moves gate/up/down_proj adapters of deepseek_v3 onto the fused experts and
    drops the dense and shared-expert ones: refused, pointing at the merged export."""
    from model import Transformer
    from tests.model.hf_check import FAMILY_CASES

    model = Transformer(FAMILY_CASES["deepseek_v3"])
    lora_cfg = LoRAConfig(r=2, alpha=4, targets="all-linear")
    apply_lora(model, lora_cfg.targets, lora_cfg.r, lora_cfg.alpha)
    with pytest.raises(UserError, match="hf_convert.py export"):
        export_peft_adapter(model, lora_cfg, tmp_path / "adapter")


def test_routed_expert_adapters_are_refused(tmp_path):
    from model import Transformer
    from tests.model.hf_check import FAMILY_CASES

    model = Transformer(FAMILY_CASES["mixtral"])
    lora_cfg = LoRAConfig(r=2, alpha=4, targets=["q_proj", "experts"])
    apply_lora(model, lora_cfg.targets, lora_cfg.r, lora_cfg.alpha)
    with pytest.raises(UserError, match="routed experts.*hf_convert.py export"):
        export_peft_adapter(model, lora_cfg, tmp_path / "adapter")


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
