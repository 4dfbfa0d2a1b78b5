"""Helpers of the strict-mapping tests: run an HF config dict in transformers and in our model,
and say whether import refused it or matched it exactly."""
import copy
import json

import pytest
import torch

from model import ModelConfig, Transformer
from model.hf_interop import forward_math, from_hf, to_hf
from tests.model.test_hf_parity import CASES, CONFIGS, hf_model, randomize
from utils.errors import UserError

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()  # the sweeps feed it configs it warns about

# One tiny config per HF family, exported to build the family's config.json.
FAMILY_CASES = {
    "llama": CASES["llama/llama3_nano"], "mistral": CONFIGS["mistral"], "qwen2": CONFIGS["qwen2"],
    "qwen3": CASES["qwen/qwen3_nano"], "phi3": CASES["phi/phi3_nano"], "olmo2": CASES["olmo/olmo2_nano"],
    "gemma": CASES["gemma/gemma1_nano"], "gemma2": CASES["gemma/gemma_nano"], "gemma3_text": CASES["gemma/gemma3_nano"],
    "mixtral": CASES["mixtral/mixtral_nano"], "qwen2_moe": CASES["qwen/qwen2_moe_nano"],
    "qwen3_moe": CASES["qwen/qwen3_moe_nano"], "deepseek_v3": CASES["deepseek/v3_nano"], "gpt2": CASES["gpt2/gpt2_small"],
}
IDX = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(5))  # past the 8-token windows
TOL = 1e-4


def hf_from_dict(raw: dict):
    """transformers' model for a config.json dict, weights random (norms near 1)."""
    cfg = transformers.AutoConfig.for_model(**copy.deepcopy(raw))
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            near_one = name.endswith("norm.weight") or "layernorm" in name or ".ln_" in name
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if near_one else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model


def import_outcome(raw: dict) -> tuple[str, float]:
    """("refused", 0) if our import refuses ``raw``; ("skip", 0) if transformers cannot build it;
    else ("mapped", max logit diff between transformers and our import of its weights)."""
    raw = json.loads(json.dumps(raw))  # as read from disk
    try:
        theirs = hf_from_dict(raw)
        with torch.no_grad():
            want = theirs(IDX).logits
    except Exception:  # noqa: BLE001  transformers cannot build or run this config: nothing to match
        return "skip", 0.0
    try:
        state, cfg = from_hf(theirs.state_dict(), raw)
    except UserError:
        return "refused", 0.0
    ours = Transformer(cfg).eval()
    ours.load_state_dict(state)  # strict: a missing or mis-shaped weight fails here
    with torch.no_grad():
        return "mapped", (ours(IDX) - want).abs().max().item()


def export_outcome(cfg: ModelConfig) -> tuple[str, float]:
    """("refused", 0) if export refuses cfg; else ("exported", max logit diff against the HF
    model loaded from the exported files), after checking the import reads the same math back."""
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    randomize(ours)
    try:
        hf_state, hf_config = to_hf(ours.state_dict(), cfg)
    except UserError:
        return "refused", 0.0
    back_state, back_cfg = from_hf(hf_state, json.loads(json.dumps(hf_config)))
    assert forward_math(back_cfg) == forward_math(cfg)
    assert all(torch.equal(v, back_state[k]) for k, v in ours.state_dict().items())
    theirs = hf_model(hf_state, hf_config)
    idx = IDX  # a vision-language model (a LLaVA) on text alone here; with images in tests/model/test_hf_llava.py
    if cfg.vision is not None:
        idx = IDX.masked_fill(IDX == cfg.vision["image_token_id"], cfg.vision["image_token_id"] + 1)
    with torch.no_grad():
        return "exported", (ours(idx) - theirs(idx).logits).abs().max().item()


def base_config(family: str) -> dict:
    return json.loads(json.dumps(to_hf(Transformer(FAMILY_CASES[family]).state_dict(), FAMILY_CASES[family])[1]))
