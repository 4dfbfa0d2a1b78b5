"""No silent loss between our configs and HF's: each case either maps exactly (logits <= 1e-4
against transformers) or is refused with a UserError. First the losses found when the mapping
was checked independently (each test fails on the mapping before this file was written),
then the sweeps: every ModelConfig field on every family for export, every HF config key of
every family for import."""
from dataclasses import fields, replace

import pytest

transformers = pytest.importorskip("transformers")

from model import ModelConfig, architectures  # noqa: E402 (after the importorskip)
from model.config import MLA_DEFAULTS, MOE_DEFAULTS  # noqa: E402 (after the importorskip)
from tests.model.hf_check import FAMILY_CASES, TOL, base_config, export_outcome, import_outcome  # noqa: E402 (after the importorskip)
from tests.model.test_hf_parity import CONFIGS  # noqa: E402 (after the importorskip)
from utils.errors import UserError  # noqa: E402 (after the importorskip)

LLAMA = CONFIGS["llama3"]
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}
# The ramp's ends fall between whole dims here, so rounding them (truncate) or not changes the frequencies.
YARN_UNTRUNCATED = {**YARN, "original_max_position_embeddings": 4096, "truncate": False}


def test_every_family_has_a_case():
    from model.hf_interop import FAMILIES

    assert set(FAMILY_CASES) == set(FAMILIES)
    assert {architectures.architecture(n).hf_family for n in architectures.names()} <= set(FAMILIES)


# ----------------------------------------------------------------------------- the losses found


def test_import_yarn_without_truncation_is_exact():
    raw = base_config("llama")
    raw["rope_parameters"] = YARN_UNTRUNCATED
    raw.pop("rope_scaling", None)
    outcome, diff = import_outcome(raw)
    assert outcome == "mapped" and diff <= TOL, (outcome, diff)


@pytest.mark.parametrize("first_windowed", [0, 1])
def test_import_qwen2_sliding_window_is_exact_or_refused(first_windowed):
    raw = base_config("qwen2")
    raw.update(use_sliding_window=True, sliding_window=8, max_window_layers=first_windowed)
    raw.pop("layer_types")  # transformers derives them from max_window_layers
    outcome, diff = import_outcome(raw)
    assert outcome == ("mapped" if first_windowed == 0 else "refused") and diff <= TOL, (outcome, diff)


def test_import_gpt2_attention_scale_keys():
    raw = base_config("gpt2")
    assert import_outcome({**raw, "scale_attn_by_inverse_layer_idx": True})[0] == "refused"
    outcome, diff = import_outcome({**raw, "scale_attn_weights": False})
    assert outcome == "mapped" and diff <= TOL, (outcome, diff)
    outcome, diff = export_outcome(replace(FAMILY_CASES["gpt2"], query_pre_attn_scalar=1.0))  # and back out
    assert outcome == "exported" and diff <= TOL, (outcome, diff)


@pytest.mark.parametrize("change", [
    dict(qk_norm=True, sliding_window=8),  # Qwen3 with layer types
    dict(qkv_bias=True, sliding_window=8),  # Qwen2 with layer types
    dict(partial_rotary=0.5),  # Phi-3
])
def test_export_keeps_what_a_family_can_hold(change):
    outcome, diff = export_outcome(replace(LLAMA, **change))
    assert outcome == "exported" and diff <= TOL, (outcome, diff)


@pytest.mark.parametrize("change", [
    dict(attn_logit_softcap=50.0), dict(final_logit_softcap=30.0), dict(query_pre_attn_scalar=24),
    dict(attn_out_bias=True), dict(partial_rotary=0.5, qk_norm=True),
])
def test_export_refuses_what_no_family_holds(change):
    assert export_outcome(replace(LLAMA, **change))[0] == "refused"


def test_export_gpt2_without_biases_is_a_user_error():
    with pytest.raises(UserError, match="cannot express: qkv_bias"):
        from model.hf_interop import family_of

        family_of(replace(FAMILY_CASES["gpt2"], qkv_bias=False))


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}}, "LongRoPE"),
    ({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}}, "LongRoPE"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "LongRoPE"),  # Phi-3's legacy yarn is LongRoPE too
    ({"quantization_config": {"quant_method": "fp8"}}, "quantized"),
    ({"num_hidden_layers": None}, "num_hidden_layers"),
    ({"num_attention_heads": "eight"}, "cannot be read"),
    ({"hidden_act": "quick_gelu"}, "activation"),
])
def test_import_refusals_speak_to_the_user(change, message):
    from model.hf_interop import config_from_hf

    with pytest.raises(UserError, match=message):
        config_from_hf({**base_config("phi3"), **change})


def test_import_names_the_gemma3_text_model():
    from model.hf_interop import config_from_hf

    with pytest.raises(UserError, match="gemma3_text"):
        config_from_hf({"model_type": "gemma3", "text_config": base_config("gemma3_text")})


# ----------------------------------------------------------------------------- export, field by field

ROPE_SCALINGS = [None, {"type": "linear", "factor": 2.0},
                 {"type": "llama3", "factor": 8.0, "original_max_seq_len": 16, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
                 {"type": "yarn", "factor": 4.0, "original_max_seq_len": 16},
                 {"type": "yarn", "factor": 4.0, "original_max_seq_len": 4096, "truncate": False},
                 {"type": "yarn", "factor": 4.0, "original_max_seq_len": 16, "beta_fast": 16.0, "beta_slow": 2.0},
                 {"type": "yarn", "factor": 4.0, "original_max_seq_len": 16, "mscale": 0.8, "mscale_all_dim": 0.8}]
# Values to try for each ModelConfig field (the test below checks that every field is here).
FIELD_VALUES = {
    "vocab_size": [100], "d_model": [48], "n_layers": [3], "n_heads": [2, 8], "n_kv_heads": [1, 2],
    "head_dim": [8, 24], "d_ff": [80], "max_seq_len": [128], "norm": ["rmsnorm", "layernorm"], "norm_eps": [1e-3],
    "norm_unit_offset": [True, False], "ffn": ["swiglu", "geglu", "gelu_mlp"], "activation": ["silu", "gelu", "gelu_tanh", "relu"],
    "attention": ["standard", "linear"], "pos_emb": ["rope", "learned", "alibi", "none"], "rope_theta": [12345.0],
    "rope_scaling": ROPE_SCALINGS, "rope_local_theta": [None, 5000.0], "partial_rotary": [0.5, 1.0],
    "sliding_window": [None, 8, 5], "sliding_window_pattern": [1, 2, 3], "qk_norm": [True, False],
    "qk_norm_scope": ["head", "all"], "qkv_bias": [True, False], "attn_out_bias": [True, False], "mlp_bias": [True, False],
    "norm_bias": [True, False], "tie_embeddings": [True, False], "embed_scale": [True, False], "pre_norms": [True, False],
    "post_norms": [True, False], "attn_logit_softcap": [None, 20.0], "final_logit_softcap": [None, 15.0],
    "query_pre_attn_scalar": [None, 24.0], "dropout": [0.1], "kernels": [True], "init_std": [0.05],
    "moe": ["per key"], "mla": ["per key"], "hf_family": ["llama", "phi3", "gemma2"], "extra": [{"note": 1}],
    "vision": [{"image_size": 8, "patch_size": 4, "d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32,
                "image_token_id": 4}],  # exported as a LLaVA around the family (GPT-2, Gemma: refused)
}
MOE_VALUES = {"n_routed_experts": [16], "n_shared_experts": [0, 1, 2], "shared_expert_gate": [True, False],
              "n_experts_per_tok": [1, 3], "moe_d_ff": [24], "scoring": ["softmax", "sigmoid"], "norm_topk_prob": [True, False],
              "routed_scaling_factor": [2.0], "n_group": [1, 2], "topk_group": [1, 2], "first_k_dense": [0, 1],
              "aux_free_bias_update_rate": [0.01], "seq_aux_loss_coef": [0.01]}
MLA_VALUES = {"q_lora_rank": [None, 16], "kv_lora_rank": [24], "qk_nope_head_dim": [12], "qk_rope_head_dim": [4],
              "v_head_dim": [8]}


def test_the_tables_cover_every_field():
    assert set(FIELD_VALUES) == {f.name for f in fields(ModelConfig)}
    assert set(MOE_VALUES) == set(MOE_DEFAULTS) and set(MLA_VALUES) == set(MLA_DEFAULTS)


def variants(cfg: ModelConfig):
    """(change, config) for every value in the tables that makes a valid config; the moe and mla
    blocks change one key at a time."""
    blocks = {"moe": (cfg.moe, MOE_VALUES), "mla": (cfg.mla, MLA_VALUES)}
    for name, values in FIELD_VALUES.items():
        if name in blocks:
            block, table = blocks[name]
            changes = [{name: {**block, k: v}} for k, vs in table.items() for v in vs] if block else []
        else:
            changes = [{name: v} for v in values]
        for change in changes:
            try:
                yield change, replace(cfg, **change)
            except UserError:  # not a valid config: nothing to export
                pass


@pytest.mark.parametrize("family", sorted(FAMILY_CASES))
def test_export_field_by_field(family):
    base = FAMILY_CASES[family]
    exported = []
    for change, cfg in variants(base):
        outcome, diff = export_outcome(cfg)
        assert diff <= TOL, f"{family}: {change} exported with logit diff {diff}"
        exported.append(outcome == "exported")
    assert sum(exported) >= 10, f"{family}: only {sum(exported)} variants exported"  # the sweep exercised export


# ----------------------------------------------------------------------------- import, key by key

ROPE_PARAMETERS = [{"rope_type": "linear", "factor": 2.0},
                   {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16},
                   YARN, YARN_UNTRUNCATED, {**YARN, "attention_factor": 1.3, "beta_fast": 16, "beta_slow": 2},
                   {**YARN, "mscale": 0.8, "mscale_all_dim": 0.7}, {**YARN, "mscale": 0.8, "mscale_all_dim": 0},
                   {**YARN, "beta_fast": 0}, {"rope_type": "dynamic", "factor": 2.0}, "longrope",
                   {"rope_type": "default", "rope_theta": 5000.0}, {"rope_type": "default", "partial_rotary_factor": 0.5}]
# Keys transformers reads (via getattr or its RoPE helpers) that a config class need not declare.
EXTRA_KEYS = ("rope_scaling", "rope_theta", "partial_rotary_factor", "head_dim", "layer_types", "use_sliding_window",
              "sliding_window", "max_window_layers", "rope_local_base_freq", "sliding_window_pattern",
              "quantization_config", "attention_bias", "mlp_bias", "qkv_bias", "hidden_act", "hidden_activation",
              "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "use_bidirectional_attention",
              "pretraining_tp", "rope_interleave", "num_key_value_heads", "tie_word_embeddings")
NOT_READ = {"model_type", "architectures", "torch_dtype", "dtype", "transformers_version", "use_cache", "return_dict",
            "output_hidden_states", "output_attentions", "id2label", "label2id", "problem_type", "is_encoder_decoder",
            "chunk_size_feed_forward", "output_router_logits", "initializer_range"}
# A missing size makes transformers build its published default (billions of weights): not swept.
SIZES = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "n_embd", "n_layer",
         "n_head", "moe_intermediate_size", "num_experts", "num_local_experts", "n_routed_experts", "kv_lora_rank",
         "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "head_dim"}
ACTIVATIONS = ["silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "quick_gelu"]
NONE_VALUES = {"sliding_window": 8, "attn_logit_softcapping": 20.0, "final_logit_softcapping": 15.0, "q_lora_rank": 16,
               "head_dim": 8, "n_inner": 96, "rope_scaling": {**YARN, "type": "yarn"}, "partial_rotary_factor": 0.5,
               "mlp_only_layers": [0], "quantization_config": {"quant_method": "fp8"}, "rope_local_base_freq": 5000.0,
               "sliding_window_pattern": 2, "num_key_value_heads": 1, "use_bidirectional_attention": True,
               "layer_types": "alternate"}
_ABSENT = object()


def key_values(key: str, value, raw: dict) -> list:
    """The values to try for one key: the key left out, then changes by its type."""
    out = [] if key in SIZES or value is None or value is _ABSENT else [_ABSENT]
    if value is None or value is _ABSENT:
        value = NONE_VALUES.get(key)
        out += [] if value is None else [value]
    elif isinstance(value, bool):
        out.append(not value)
    elif isinstance(value, int):
        out += [value + 1, 2 * value] if value else [1, 2]
    elif isinstance(value, float):
        out.append(value * 2 + 1e-3)
    elif isinstance(value, str):
        out += [a for a in ACTIVATIONS if a != value] if "act" in key else []
    elif key in ("rope_parameters", "rope_scaling"):
        half = (raw.get("qk_rope_head_dim") or raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]) // 2
        longrope = {"rope_type": "longrope", "short_factor": [1.0] * half, "long_factor": [2.0] * half,
                    "original_max_position_embeddings": 16}
        params = [longrope if p == "longrope" else p for p in ROPE_PARAMETERS]
        if "full_attention" in value:  # Gemma-3: one per layer type
            out += [{**value, kind: {"rope_theta": value[kind]["rope_theta"], **p}} for kind in value for p in params]
        else:
            out += [{"rope_theta": value.get("rope_theta", 10000.0), **p} for p in params]
    if out and out[-1] == "alternate" or key == "layer_types" and isinstance(value, list):
        n = raw.get("num_hidden_layers", raw.get("n_layer"))
        out = [o for o in out if o != "alternate"] + [["sliding_attention" if i % 2 else "full_attention" for i in range(n)],
                                                       ["sliding_attention"] * n, ["full_attention"] * n]
    if key == "mlp_only_layers":
        out.append([1])
    return out


def hf_keys(raw: dict) -> list[str]:
    import dataclasses

    cls = type(transformers.AutoConfig.for_model(raw["model_type"]))
    declared = {f.name for f in dataclasses.fields(cls)} - {f.name for f in dataclasses.fields(transformers.PreTrainedConfig)}
    return sorted((declared | set(raw) | set(EXTRA_KEYS)) - NOT_READ)


@pytest.mark.parametrize("family", sorted(FAMILY_CASES))
def test_import_key_by_key(family):
    raw = base_config(family)
    assert import_outcome(raw) == ("mapped", pytest.approx(0.0, abs=TOL))
    counts = {"mapped": 0, "refused": 0, "skip": 0}
    for key in hf_keys(raw):
        for value in key_values(key, raw.get(key, _ABSENT), raw):
            changed = {k: v for k, v in raw.items() if k != key}
            if value is not _ABSENT:
                changed[key] = value
            outcome, diff = import_outcome(changed)
            assert diff <= TOL, f"{family}: {key}={'(absent)' if value is _ABSENT else value!r} imported with logit diff {diff}"
            counts[outcome] += 1
    assert counts["mapped"] >= 10 and counts["refused"] >= 1, counts  # the sweep exercised both answers


def test_export_refuses_a_learned_balance_bias_on_softmax_routing():
    from model import Transformer
    from model.hf_interop import to_hf

    cfg = FAMILY_CASES["mixtral"]
    model = Transformer(cfg)
    model.layers[0].ffn.expert_bias[0] = 0.1  # what aux-free balancing leaves after training
    with pytest.raises(UserError, match="balance bias"):
        to_hf(model.state_dict(), cfg)


@pytest.mark.parametrize("family", sorted(FAMILY_CASES))
def test_a_config_as_transformers_writes_it_imports(family):
    """The config.json transformers itself writes (its config class's to_dict: every default spelled out,
    some as null) imports to the same logits; a flag written as null is not a refusal (Gemma-2's
    use_bidirectional_attention under transformers 5 was)."""
    written = transformers.AutoConfig.for_model(**base_config(family)).to_dict()
    outcome, diff = import_outcome(written)
    assert outcome == "mapped" and diff <= TOL, (outcome, diff)
