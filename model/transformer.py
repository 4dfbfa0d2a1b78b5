"""The one decoder-only Transformer. Every architecture is a ModelConfig.

Reading order: Block (norm -> attention -> residual, norm -> FFN -> residual), then
Transformer (embed -> blocks -> norm -> head).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from model.attention import Attention, AttnMask
from model.config import ModelConfig
from model.ffn import MLP, GatedMLP
from model.norms import make_norm
from model.positions import Rotary


def make_attention(cfg: ModelConfig, layer: int) -> nn.Module:
    if cfg.attention == "mla":
        from model.mla import MLAttention

        return MLAttention(cfg, layer)
    if cfg.attention == "linear":
        from model.linear_attention import LinearAttention

        return LinearAttention(cfg, layer)
    return Attention(cfg, layer)


def make_ffn(cfg: ModelConfig, layer: int) -> nn.Module:
    if cfg.ffn == "moe":
        from model.moe import MoE

        # DeepSeek keeps the first ``first_k_dense`` layers dense (a gated MLP of width d_ff).
        return GatedMLP(cfg) if layer < cfg.moe["first_k_dense"] else MoE(cfg)
    if cfg.ffn in ("swiglu", "geglu"):
        return GatedMLP(cfg)
    return MLP(cfg)


class Block(nn.Module):
    """Pre-norm residual block; with ``post_norms`` (Gemma-2/3) each sublayer's output is
    normalised again before it joins the residual stream; without ``pre_norms`` (OLMo-2) only
    that output norm remains: x + norm(attn(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(cfg) if cfg.pre_norms else nn.Identity()
        self.attn = make_attention(cfg, layer)
        self.ffn_norm = make_norm(cfg) if cfg.pre_norms else nn.Identity()
        self.ffn = make_ffn(cfg, layer)
        if cfg.post_norms:
            self.attn_post_norm, self.ffn_post_norm = make_norm(cfg), make_norm(cfg)
        else:
            self.attn_post_norm = self.ffn_post_norm = None
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask: AttnMask, cache=None) -> torch.Tensor:
        h = self.attn(self.attn_norm(x), rope, mask, cache)
        if self.attn_post_norm is not None:
            h = self.attn_post_norm(h)
        x = x + self.drop(h)
        h = self.ffn(self.ffn_norm(x))
        if self.ffn_post_norm is not None:
            h = self.ffn_post_norm(h)
        return x + self.drop(h)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos_emb == "learned" else None
        self.rotary = Rotary(cfg) if cfg.pos_emb == "rope" or cfg.attention == "mla" else None
        # Gemma-3: the sliding-window layers turn at their own RoPE base.
        self.rotary_local = Rotary(cfg, local=True) if cfg.rope_local_theta is not None else None
        self.local_layers = {i for i in range(cfg.n_layers) if cfg.layer_window(i) is not None}
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # a vision-language model: image -> tokens spliced in at placeholder ids (model/vision.py)
        self.vision = None
        if cfg.vision is not None:
            from model.vision import VisionEncoder

            self.vision = VisionEncoder(cfg)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                # GPT-2: residual projections scaled by 1/sqrt(2 * n_layers) so the stream's
                # variance does not grow with depth.
                scale = 1 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
                nn.init.normal_(p, mean=0.0, std=std * scale)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        for m in self.modules():
            if hasattr(m, "reset_extra_parameters"):
                m.reset_extra_parameters()

    def forward(
        self,
        idx: torch.Tensor,
        positions: Optional[torch.Tensor] = None,
        cache=None,
        return_hidden: bool = False,
        documents: Optional[torch.Tensor] = None,
        image_embeds: Optional[torch.Tensor] = None,
        image_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab) (or final hidden states (B, T, d_model)).

        ``positions`` (B, T) defaults to 0..T-1 after whatever the cache already holds.
        With a cache, the new keys/values are appended and the cache advances by T.
        ``documents`` (B, T) (training on packed rows, no cache): a token attends only to earlier
        tokens of its own document (``model.attention.document_ids`` of the restarting positions).
        ``image_embeds`` (N, d_model) (a vision-language model; ``encode_images``) replace, in order,
        the token embeddings where ``image_mask`` (B, T) is true (default: idx == vision.image_token_id).
        """
        B, T = idx.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=idx.device).expand(B, T)
        if cache is not None:
            k_pos, k_valid = cache.key_positions(positions)
        else:
            k_pos, k_valid = positions, None
        mask = AttnMask(positions, k_pos, k_valid, documents)
        x = self.run_blocks(self.embed_tokens(idx, positions, image_embeds, image_mask), positions, mask, cache)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        if return_hidden:
            return x
        return self.logits(x)

    def embed_tokens(self, idx: torch.Tensor, positions: torch.Tensor, image_embeds: Optional[torch.Tensor] = None,
                     image_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token (and learned position) embeddings: idx (B, T) -> (B, T, d_model), image tokens spliced in."""
        x = self.embed(idx)
        if self.cfg.embed_scale:  # Gemma scales by sqrt(d) in the activation dtype
            x = x * torch.tensor(self.cfg.d_model**0.5, dtype=x.dtype)
        if image_embeds is not None:
            from model.vision import splice_images

            if image_mask is None:
                image_mask = idx == self.cfg.vision["image_token_id"]
            x = splice_images(x, image_mask, image_embeds)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        return self.drop(x)

    def run_blocks(self, x: torch.Tensor, positions: torch.Tensor, mask: AttnMask, cache=None,
                   layers: Optional[range] = None) -> torch.Tensor:
        """The blocks ``layers`` (default: all) over x (B, T, d_model); a pipeline stage runs its own range."""
        rope = self.rotary(positions, x.dtype) if self.rotary is not None else None
        rope_local = self.rotary_local(positions, x.dtype) if self.rotary_local is not None else rope
        for i in layers if layers is not None else range(len(self.layers)):
            x = self.layers[i](x, rope_local if i in self.local_layers else rope, mask, cache)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = self.cfg.final_logit_softcap
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits

    # ---- what the stages and the engine ask of a model, so none of them branches on its parts

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (n_images, C, H, W) in [-1, 1] -> image tokens (n_images * cfg.image_tokens, d_model),
        in the order ``forward``'s ``image_embeds`` takes them."""
        if self.vision is None:
            raise ValueError("this model has no vision encoder (model.vision is not set)")
        return self.vision(pixels).flatten(0, 1)

    @property
    def cache_kind(self) -> str:
        """``kv``: keys/values (or MLA latents) per token, so blocks can be shared and rolled back;
        ``recurrent``: one running state per sequence (linear attention)."""
        return "recurrent" if self.cfg.attention == "linear" else "kv"

    def aux_loss(self) -> Optional[torch.Tensor]:
        """Auxiliary training loss of the last training forward (MoE sequence-wise balance loss,
        already scaled by its coefficient, summed over layers); None when there is none.
        Reading it clears it, so a loss whose graph was freed is never added a second time."""
        if self.cfg.ffn != "moe":
            return None
        from model.moe import moe_aux_loss, moe_layers

        aux = moe_aux_loss(self)
        for layer in moe_layers(self):
            layer.aux_loss = None
        return aux

    def parallelize_tensors(self, tp_mesh) -> None:
        """Tensor parallelism over ``tp_mesh`` in place (model/tensor_parallel.py's plan)."""
        from model.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(self, tp_mesh)

    def pipeline_stage(self, index: int, n_stages: int) -> nn.Module:
        """This model pruned in place to pipeline stage ``index`` of ``n_stages`` (model/pipeline.py)."""
        from model.pipeline import PipelineStageModule

        return PipelineStageModule(self, index, n_stages)

    @property
    def tied_weights(self) -> dict[str, str]:
        """State-dict keys that alias another tensor, each with the key it is stored under
        (the head tied to the embedding)."""
        return {"lm_head.weight": "embed.weight"} if self.cfg.tie_embeddings else {}

    def weights(self, live: bool = False) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: the state dict with tied tensors once (safetensors refuses
        aliases). ``live=True`` returns the tensors themselves (the training loop copies resumed
        values back into them), else detached, contiguous CPU copies."""
        state = self.state_dict(keep_vars=live)
        for alias in self.tied_weights:
            state.pop(alias, None)
        return dict(state) if live else {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
            if self.pos_embed is not None:
                n -= self.pos_embed.weight.numel()
        return n
