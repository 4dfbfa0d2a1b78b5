"""The vision part (model/vision.py): the ViT against transformers' SigLIP vision tower, the whole
vision-language model against transformers' LLaVA (SigLIP tower + 2-layer GELU projector +
Llama), both on random weights in fp32 (<= 1e-4); splicing and config validation."""
from __future__ import annotations

import pytest
import torch

from model import ModelConfig, Transformer
from model.hf_interop import to_hf
from model.hf_vision import tower_from_siglip, tower_to_siglip
from utils.errors import UserError

transformers = pytest.importorskip("transformers")

VISION = {"image_size": 16, "patch_size": 4, "d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 48,
          "image_token_id": 4}


def vlm_config(**vision) -> ModelConfig:
    return ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
                       vision={**VISION, **vision})


def randomize(model: torch.nn.Module) -> None:
    # norms away from 1, biases away from 0: a mis-mapped weight cannot hide behind a default
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            one = name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layernorm.weight"))
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if one else 0.0))


def siglip_config(v: dict):
    return transformers.SiglipVisionConfig(
        hidden_size=v["d_model"], intermediate_size=v["d_ff"], num_hidden_layers=v["n_layers"],
        num_attention_heads=v["n_heads"], image_size=v["image_size"], patch_size=v["patch_size"],
        layer_norm_eps=v["norm_eps"], hidden_act="gelu_pytorch_tanh", vision_use_head=False)


def test_tower_matches_siglip():
    cfg = vlm_config(post_norm=True)
    ours = Transformer(cfg).vision.tower.eval()
    randomize(ours)
    hf = transformers.SiglipVisionModel(siglip_config(cfg.vision)).eval()
    tower = getattr(hf, "vision_model", hf)  # transformers 5 flattened the wrapper
    tower.load_state_dict(tower_to_siglip(ours.state_dict()), strict=True)
    pixels = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        want = hf(pixel_values=pixels).last_hidden_state
        got = ours(pixels)
    assert got.shape == (3, 16, 32)
    assert (got - want).abs().max() <= 1e-4
    back = tower_from_siglip(tower.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items()) and set(back) == set(ours.state_dict())


def test_a_size_that_is_not_a_multiple_of_the_patch_reads_as_siglip_does():
    """SigLIP so400m reads 384-pixel images in 14-pixel patches: 27 per side, the last 6 pixels unread.
    Here 18 pixels in 4-pixel patches: 4 x 4 patches, and the same features as transformers."""
    cfg = vlm_config(image_size=18, post_norm=True)
    ours = Transformer(cfg).vision.tower.eval()
    randomize(ours)
    hf = transformers.SiglipVisionModel(siglip_config(cfg.vision)).eval()
    getattr(hf, "vision_model", hf).load_state_dict(tower_to_siglip(ours.state_dict()), strict=True)
    pixels = torch.rand(2, 3, 18, 18) * 2 - 1
    with torch.no_grad():
        want = hf(pixel_values=pixels).last_hidden_state
        got = ours(pixels)
    assert got.shape == (2, 16, 32) and cfg.image_tokens == 16
    assert (got - want).abs().max() <= 1e-4


def llava_from_ours(model: Transformer):
    """transformers' LLaVA holding our model's weights: SigLIP tower, projector, Llama."""
    cfg = model.cfg
    text_cfg = ModelConfig.from_dict({**cfg.to_dict(), "vision": None})
    text_state = {k: v for k, v in model.weights().items() if not k.startswith("vision.")}
    hf_state, hf_text = to_hf(text_state, text_cfg)
    llava_cfg = transformers.LlavaConfig(
        vision_config=siglip_config(cfg.vision), text_config=transformers.LlamaConfig(**hf_text),
        image_token_index=cfg.vision["image_token_id"], vision_feature_select_strategy="full",
        vision_feature_layer=-1, projector_hidden_act="gelu", image_seq_length=cfg.image_tokens)
    hf = transformers.LlavaForConditionalGeneration(llava_cfg).eval()
    hf.model.vision_tower.load_state_dict(tower_to_siglip(model.vision.tower.state_dict()), strict=False)
    hf.model.multi_modal_projector.load_state_dict(model.vision.projector.state_dict(), strict=True)
    hf.model.language_model.load_state_dict({k.removeprefix("model."): v for k, v in hf_state.items()
                                             if k.startswith("model.")}, strict=True)
    hf.lm_head.load_state_dict({"weight": hf_state["lm_head.weight"]})
    return hf


def test_vlm_matches_llava():
    # LLaVA reads the tower's last layer before SigLIP's post_layernorm (vision_feature_layer=-1,
    # strategy "full": no CLS token to drop), which is our post_norm=False.
    model = Transformer(vlm_config()).eval()
    randomize(model)
    hf = llava_from_ours(model)
    n = model.cfg.image_tokens  # 16 patches, no pooling
    img = [4] * n
    ids = torch.tensor([[1, 7, *img, 9, 10, *img, 11], [2, *img, 5, 6, 7, *img, 8]])
    pixels = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=pixels).logits
        got = model(ids, image_embeds=model.encode_images(pixels))
    assert (got - want).abs().max() <= 1e-4
    # the images matter: other pixels change the logits after the first image
    with torch.no_grad():
        other = model(ids, image_embeds=model.encode_images(pixels.flip(0)))
    assert (other - got)[:, n + 2:].abs().max() > 1e-3


def test_pooling_reduces_the_image_tokens():
    model = Transformer(vlm_config(pool=2)).eval()
    assert model.cfg.image_tokens == 4
    feats = torch.randn(1, 16, 32)
    grid = feats.reshape(1, 4, 4, 32)
    pooled = grid.reshape(1, 2, 2, 2, 2, 32).mean((2, 4)).reshape(1, 4, 32)  # 2x2 blocks of the patch grid
    proj = model.vision.projector
    want = proj.linear_2(torch.nn.functional.gelu(proj.linear_1(pooled)))
    assert torch.allclose(proj(feats), want, atol=1e-6)
    assert model.encode_images(torch.zeros(2, 3, 16, 16)).shape == (8, 32)


def test_splice_counts_must_agree():
    model = Transformer(vlm_config()).eval()
    ids = torch.tensor([[1, *[4] * 16, 2]])
    with pytest.raises(ValueError, match="16 image placeholder tokens but 32"):
        model(ids, image_embeds=torch.zeros(32, 32))


@pytest.mark.parametrize("change, match", [
    ({"image_size": 3}, "smaller than vision.patch_size"), ({"pool": 3}, "does not divide"), ({"image_token_id": 100}, "below vocab_size"),
    ({"activation": "swish"}, "activation"), ({"n_heads": 5}, "divisible"), ({"colour": 1}, "unknown keys"),
])
def test_bad_vision_configs(change, match):
    with pytest.raises(UserError, match=match):
        vlm_config(**change)


def test_vision_config_needs_its_sizes():
    with pytest.raises(UserError, match="needs values"):
        ModelConfig(vocab_size=100, d_model=32, n_layers=1, n_heads=4, vision={"image_size": 16})
