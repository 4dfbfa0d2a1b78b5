"""ModelConfig.kernels selects the fused kernels; off CUDA they fall back to the same math."""
import dataclasses

import torch

from model import ModelConfig, Transformer


def test_kernels_flag_same_loss_and_grads():
    cfg = ModelConfig(vocab_size=97, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm=True, max_seq_len=32)
    torch.manual_seed(0)
    plain = Transformer(cfg)
    fused = Transformer(dataclasses.replace(cfg, kernels=True))
    fused.load_state_dict(plain.state_dict())
    assert fused.layers[0].ffn.fused and fused.layers[0].attn_norm.fused and fused.layers[0].attn.fused_rope
    idx = torch.randint(0, 97, (2, 17))
    losses = []
    for m in (plain, fused):
        logits = m(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-6
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5), name
