"""Incompatible options are rejected when the config is built, with a message naming the fix."""
import pytest

from model import ModelConfig
from utils.errors import UserError

MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
MOE = dict(n_routed_experts=8, n_experts_per_tok=2, moe_d_ff=16)


@pytest.mark.parametrize(
    "kw,words",
    [
        (dict(n_heads=8, n_kv_heads=3), "not divisible by n_kv_heads"),
        (dict(d_model=50, n_heads=4), "not divisible by n_heads"),
        (dict(attention="mla", mla=MLA, pos_emb="alibi"), "alibi"),
        (dict(attention="mla"), "needs an 'mla' block"),
        (dict(attention="mla", mla={**MLA, "kv_rank": 3}), "unknown keys ['kv_rank']"),
        (dict(attention="mla", mla={"kv_lora_rank": 8}), "needs values for"),
        (dict(attention="mla", mla=MLA, n_kv_heads=2), "n_kv_heads"),
        (dict(attention="mla", mla=MLA, head_dim=16), "head_dim"),
        (dict(attention="mla", mla={**MLA, "qk_rope_head_dim": 3}), "must be even"),
        (dict(ffn="moe", moe={**MOE, "n_experts_per_tok": 9}), "top-k n_experts_per_tok=9"),
        (dict(ffn="moe"), "needs a 'moe' block"),
        (dict(ffn="moe", moe={**MOE, "n_group": 3}), "must divide n_routed_experts"),
        (dict(ffn="moe", moe={**MOE, "n_group": 4, "topk_group": 5}), "topk_group=5"),
        (dict(ffn="moe", moe={**MOE, "n_experts_per_tok": 4, "n_group": 4, "topk_group": 1}), "cannot be chosen"),
        (dict(ffn="moe", moe={**MOE, "scoring": "relu"}), "scoring"),
        (dict(ffn="moe", moe={**MOE, "first_k_dense": 9}), "first_k_dense"),
        (dict(attention="linear", pos_emb="alibi"), "linear"),
        (dict(attention="linear", sliding_window=8), "sliding_window"),
        (dict(attention="flash"), "attention='flash'"),
        (dict(rope_scaling={"type": "ntk", "factor": 2}), "rope_scaling.type"),
        (dict(rope_scaling={"type": "yarn", "factor": 4}), "original_max_seq_len"),
        (dict(rope_scaling={"type": "linear"}), "rope_scaling.factor"),
        (dict(moe=MOE), "set ffn: moe"),
        (dict(mla=MLA), "set attention: mla"),
        (dict(sliding_window=8, sliding_window_pattern=0), "sliding_window_pattern"),
    ],
)
def test_bad_combination_rejected(kw, words):
    with pytest.raises(UserError) as err:
        ModelConfig(**{"d_model": 64, "n_heads": 4, **kw})
    assert words in str(err.value)


def test_from_dict_names_unknown_key():
    with pytest.raises(UserError, match="unknown keys"):
        ModelConfig.from_dict({"d_model": 64, "n_head": 4})


def test_blocks_are_filled_with_defaults():
    cfg = ModelConfig(d_model=64, n_heads=4, ffn="moe", moe=MOE, attention="mla", mla=MLA)
    assert cfg.moe["scoring"] == "softmax" and cfg.moe["first_k_dense"] == 0 and cfg.head_dim == 12
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
