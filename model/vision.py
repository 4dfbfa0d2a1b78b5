"""The vision part of a vision-language model (LLaVA): image -> tokens in the LM's embedding space.

Reading order: VisionTower (a SigLIP-style ViT: patch embedding + learned positions, then the
model zoo's own Blocks with every patch seeing every patch), Projector (LLaVA's linear -> GELU
-> linear, after optional k x k average pooling of the patch grid), VisionEncoder (both), and
``splice_images``, which puts the image tokens where the prompt holds placeholder ids.

The ViT's blocks are made of the model zoo's parts (``Attention``, ``make_norm``, ``MLP``) built
from a ModelConfig of the tower's sizes (LayerNorm, biases, GELU MLP, no positions inside
attention), so attention, norms and the MLP are the same code the language model runs; only the
mask differs (bidirectional).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.attention import Attention
from model.config import ModelConfig
from model.ffn import MLP
from model.norms import make_norm


def tower_config(cfg: ModelConfig) -> ModelConfig:
    """The ViT's blocks as a ModelConfig: pre-norm LayerNorm blocks with biased q/k/v/o and a
    two-layer MLP (SigLIP's encoder layer); positions are added once, at the patch embedding."""
    v = cfg.vision
    n_patches = (v["image_size"] // v["patch_size"]) ** 2
    return ModelConfig(vocab_size=1, d_model=v["d_model"], n_layers=v["n_layers"], n_heads=v["n_heads"], d_ff=v["d_ff"],
                       max_seq_len=n_patches, norm="layernorm", norm_eps=v["norm_eps"], ffn="gelu_mlp",
                       activation=v["activation"], pos_emb="none", qkv_bias=True, attn_out_bias=True, mlp_bias=True)


class FullMask:
    """The attention mask of an image: every patch attends to every patch (no causality), so
    ``Attention`` takes SDPA's unmasked path."""

    def get(self, window):
        return None, False


class EncoderBlock(nn.Module):
    """Pre-norm ViT block: x + attn(norm(x)), then x + mlp(norm(x)) (SigLIP's encoder layer)."""

    def __init__(self, tcfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(tcfg)
        self.attn = Attention(tcfg, layer)
        self.ffn_norm = make_norm(tcfg)
        self.ffn = MLP(tcfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), None, FullMask())
        return x + self.ffn(self.ffn_norm(x))


class VisionTower(nn.Module):
    """pixels (B, C, H, W), normalised to [-1, 1] -> patch features (B, n_patches, d_vision)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        v, tcfg = cfg.vision, tower_config(cfg)
        self.patch_size = v["patch_size"]
        self.patch_embed = nn.Conv2d(v["n_channels"], v["d_model"], v["patch_size"], stride=v["patch_size"])
        self.pos_embed = nn.Embedding(tcfg.max_seq_len, v["d_model"])
        self.layers = nn.ModuleList(EncoderBlock(tcfg, i) for i in range(v["n_layers"]))
        self.post_norm = nn.LayerNorm(v["d_model"], eps=v["norm_eps"]) if v["post_norm"] else None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # (B, n_patches, d), patches row by row
        x = x + self.pos_embed.weight[: x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.post_norm(x) if self.post_norm is not None else x


class Projector(nn.Module):
    """Patch features (B, side*side, d_vision) -> image tokens (B, (side/k)^2, d_model):
    k x k average pooling over the patch grid (k = vision.pool), then linear -> GELU -> linear."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pool = cfg.vision["pool"]
        self.linear_1 = nn.Linear(cfg.vision["d_model"], cfg.d_model)
        self.linear_2 = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if self.pool > 1:
            B, N, D = feats.shape
            side = int(N**0.5)
            grid = feats.transpose(1, 2).reshape(B, D, side, side)
            feats = F.avg_pool2d(grid, self.pool).flatten(2).transpose(1, 2)  # (B, N / k^2, D)
        return self.linear_2(F.gelu(self.linear_1(feats)))


class VisionEncoder(nn.Module):
    """The tower and the projector: pixels (n_images, C, H, W) -> (n_images, image_tokens, d_model)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.image_size, self.n_channels = cfg.vision["image_size"], cfg.vision["n_channels"]
        self.tower = VisionTower(cfg)
        self.projector = Projector(cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        want = (self.n_channels, self.image_size, self.image_size)
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != want:
            raise ValueError(f"pixels must be (n_images, {want[0]}, {want[1]}, {want[2]}), got {tuple(pixels.shape)}")
        dtype = self.patch_embed_dtype
        return self.projector(self.tower(pixels.to(dtype)))

    @property
    def patch_embed_dtype(self) -> torch.dtype:
        return self.tower.patch_embed.weight.dtype


def splice_images(x: torch.Tensor, mask: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    """Token embeddings x (B, T, d) with the positions where ``mask`` (B, T) is true replaced, in
    row-major order, by the rows of ``image_embeds`` (N, d), N = mask.sum() (LLaVA's masked scatter)."""
    n = int(mask.sum())
    if n != image_embeds.shape[0]:
        raise ValueError(f"{n} image placeholder tokens but {image_embeds.shape[0]} image embeddings")
    return x.masked_scatter(mask.unsqueeze(-1), image_embeds.to(x.dtype))
