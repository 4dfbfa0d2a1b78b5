"""LoRA wrapper: zero-init identity, exact merge/unmerge, targets, freezing, adapter save/load."""
import math

import pytest
import torch

from model import ModelConfig, Transformer
from model.lora import (
    LoRAConfig, adapter_tensors, apply_lora, base_fingerprint, load_lora, lora_layers, lora_state_dict, match_linears,
    merge_and_unload, merge_lora, save_adapter, trainable_parameters, unmerge_lora,
)
from utils.errors import UserError

TINY = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**TINY, **kw})).eval()


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for name, t in adapter_tensors(layer).items():  # routed experts: lora_B.gate_proj, ...
                if name.startswith("lora_B"):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.2)


IDX = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))


def test_fresh_adapter_is_identity_and_only_adapters_train():
    model = tiny_model()
    with torch.no_grad():
        ref = model(IDX)
    names = apply_lora(model, "all-linear", r=4, alpha=8)
    assert len(names) == 2 * 7 and "lm_head" not in names
    with torch.no_grad():
        assert torch.equal(model(IDX), ref)  # B = 0 at init
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in names for ab in "AB"}


def test_one_step_moves_adapters_and_nothing_else():
    model = tiny_model()
    apply_lora(model, ["q_proj", "v_proj"], r=2, alpha=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.5)
    for _ in range(2):  # step 1 moves B (A's gradient is 0 while B = 0), step 2 moves A too
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(IDX).flatten(0, 1), IDX.flatten()).backward()
        opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == ("lora_" in n), n


def test_scaling_and_rslora():
    model = tiny_model()
    apply_lora(model, "q_proj", r=4, alpha=8)
    assert all(l.scaling == 2.0 for l in lora_layers(model).values())
    model = tiny_model()
    apply_lora(model, "q_proj", r=4, alpha=8, rslora=True)
    assert all(l.scaling == 8 / math.sqrt(4) for l in lora_layers(model).values())


def test_merge_unmerge_exact():
    model = tiny_model()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, "all-linear", r=4, alpha=8)
    randomize_adapters(model)
    with torch.no_grad():
        adapted = model(IDX)
        merge_lora(model)
        merged = model(IDX)
        unmerge_lora(model)
        again = model(IDX)
    assert (merged - adapted).abs().max().item() <= 1e-5
    assert (again - adapted).abs().max().item() <= 1e-5
    for name, layer in lora_layers(model).items():
        assert torch.allclose(layer.base.weight, original[name + ".weight"], atol=1e-6, rtol=0)


def test_dropout_only_in_training():
    model = tiny_model()
    apply_lora(model, "all-linear", r=4, alpha=8, dropout=0.5)
    randomize_adapters(model)
    with torch.no_grad():
        assert torch.equal(model(IDX), model(IDX))
        model.train()
        assert not torch.equal(model(IDX), model(IDX))


@pytest.mark.parametrize("targets,count", [("q_proj", 2), (["layers.0.*"], 7), (["attn.*"], 8), (["*.ffn.down_proj", "k_proj"], 4)])
def test_target_patterns(targets, count):
    assert len(match_linears(tiny_model(), targets)) == count


def test_bad_input():
    with pytest.raises(UserError, match="matches no linear layer"):
        apply_lora(tiny_model(), ["qproj"], r=4)
    with pytest.raises(UserError, match="positive"):
        apply_lora(tiny_model(), "all-linear", r=0)
    with pytest.raises(UserError, match="does not fit"):
        apply_lora(tiny_model(), "k_proj", r=17)  # k_proj is 32 -> 16
    with pytest.raises(UserError, match="tie_embeddings"):
        apply_lora(tiny_model(tie_embeddings=True), ["lm_head"], r=2)
    with pytest.raises(UserError):
        LoRAConfig(r=0)


def test_adapter_save_load_round_trip(tmp_path):
    model = tiny_model()
    cfg = LoRAConfig(r=4, alpha=8, targets=["q_proj", "down_proj"])
    apply_lora(model, cfg.targets, cfg.r, cfg.alpha)
    randomize_adapters(model)
    path = save_adapter(tmp_path / "adapter", model, cfg)
    files = {p.name for p in path.iterdir()}
    assert "model.safetensors" in files and "meta.json" in files
    from safetensors.torch import load_file

    assert set(load_file(str(path / "model.safetensors"))) == set(lora_state_dict(model))  # adapters only

    fresh = tiny_model()  # same seed: same base weights
    load_lora(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(IDX), model(IDX))
    assert base_fingerprint(fresh) == base_fingerprint(tiny_model())


def test_adapter_on_wrong_base_is_refused(tmp_path):
    model = tiny_model()
    apply_lora(model, "all-linear", r=2, alpha=4)
    path = save_adapter(tmp_path / "adapter", model, LoRAConfig(r=2, alpha=4))
    with pytest.raises(UserError, match="different base"):
        load_lora(tiny_model(d_ff=64), path)
    with pytest.raises(UserError, match="not a LoRA adapter"):
        from utils.checkpoint import save_checkpoint

        load_lora(tiny_model(), save_checkpoint(tmp_path / "full", tiny_model()))


def test_merge_and_unload_exports_to_hf(tmp_path):
    transformers = pytest.importorskip("transformers")
    from model.hf_interop import export_hf

    model = tiny_model()
    apply_lora(model, "all-linear", r=4, alpha=8)
    randomize_adapters(model)
    with torch.no_grad():
        adapted = model(IDX)
    merge_and_unload(model)
    assert not lora_layers(model) and set(model.state_dict()) == set(tiny_model().state_dict())
    export_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(IDX).logits - adapted).abs().max().item() <= 1e-4


def test_mla_moe_model_decode_with_adapters():
    """DeepSeek-style parts: routers stay out of all-linear, routed experts are in it; MLA's absorbed
    decode path reads ``kv_b_proj.weight`` directly and must see the adapted weight."""
    from model.cache import KVCache

    mla = dict(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    moe = dict(n_routed_experts=8, n_experts_per_tok=2, moe_d_ff=16)
    model = tiny_model(attention="mla", mla=mla, ffn="moe", moe=moe, n_kv_heads=None)
    names = apply_lora(model, "all-linear", r=2, alpha=4)
    assert "layers.0.attn.kv_b_proj" in names and not any("router" in n for n in names)
    assert "layers.1.ffn.experts" in names
    randomize_adapters(model)
    with torch.no_grad():
        full = model(IDX)
        cache = KVCache(16)
        model(IDX[:, :-1], cache=cache)
        last = model(IDX[:, -1:], cache=cache)  # one query over a longer cache: the absorbed path
    assert (last[:, -1] - full[:, -1]).abs().max().item() <= 1e-5


def test_modules_to_save_train_in_full_and_travel_with_the_adapter(tmp_path):
    model = tiny_model(tie_embeddings=True)
    cfg = LoRAConfig(r=2, alpha=4, targets=["q_proj"], modules_to_save=["embed", "lm_head"])
    apply_lora(model, cfg.targets, cfg.r, cfg.alpha, modules_to_save=cfg.modules_to_save)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"embed.weight"} | {f"layers.{i}.attn.q_proj.lora_{ab}" for i in range(2) for ab in "AB"}
    randomize_adapters(model)
    with torch.no_grad():
        model.embed.weight.mul_(1.5)  # stands for a trained embedding (tied: the head changes too)
        want = model(IDX)
    state = lora_state_dict(model, cfg.modules_to_save)
    assert "embed.weight" in state and "lm_head.weight" not in state  # the tied tensor is stored once
    path = save_adapter(tmp_path / "adapter", model, cfg)
    fresh = tiny_model(tie_embeddings=True)
    load_lora(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(IDX), want)
    from model.peft_export import export_peft_adapter

    with pytest.raises(UserError, match="merged"):
        export_peft_adapter(model, cfg, tmp_path / "peft")


def test_modules_to_save_bad_input():
    with pytest.raises(UserError, match="matches no module"):
        apply_lora(tiny_model(), "q_proj", r=2, modules_to_save=["embedding"])
    with pytest.raises(UserError, match="both a LoRA target"):
        apply_lora(tiny_model(), "q_proj", r=2, modules_to_save=["layers.0.attn"])
