"""GGUF export (model/gguf_export.py): gguf's own reader gets back the tensors, the architecture,
RoPE, the tokenizer and the chat template; the RoPE row permutation keeps attention scores; the
refusals say what to use instead. llama.cpp itself runs the file in bench/bench_llamacpp.py."""
import random

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from model import ModelConfig, Transformer  # noqa: E402
from model.gguf_export import rope_halves, rope_pairs, write_gguf  # noqa: E402
from utils.errors import UserError  # noqa: E402


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from data_pipeline.synthetic.stories import generate_story
    from data_pipeline.tokenizer.tokenizer import load_tokenizer
    from data_pipeline.tokenizer.train_tokenizer import train_hf

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_hf([generate_story(rng)[0] for _ in range(200)], 320, show_progress=False).save(str(path))
    return load_tokenizer(path)


def _model(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=96, rope_theta=5e4, tie_embeddings=True)
    model = Transformer(ModelConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():  # norms away from 1, so a mis-mapped norm cannot hide
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def _field(reader, key):
    return reader.fields[key].contents()


def _tensors(reader) -> dict:
    return {t.name: (t, gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}


@pytest.mark.parametrize("outtype,tol", [("f32", 0.0), ("f16", 1e-3), ("q8_0", 0.01), ("q4_0", 0.15)])
def test_reader_round_trips_tensors_and_metadata(tmp_path, tok, outtype, tol):
    from data_pipeline.tokenizer.chat_template import HF_CHAT_TEMPLATE

    model = _model()
    path = write_gguf(model, tok, tmp_path / "m.gguf", outtype)
    reader = gguf.GGUFReader(path)
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(5e4)
    assert _field(reader, "llama.rope.dimension_count") == 16
    assert (_field(reader, "llama.attention.head_count"), _field(reader, "llama.attention.head_count_kv")) == (4, 2)
    assert _field(reader, "llama.context_length") == 96 and _field(reader, "llama.block_count") == 2
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(model.cfg.norm_eps)
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 320 and all(tokens[i] == tok.id_to_token(i) for i in range(tok.vocab_size))
    assert _field(reader, "tokenizer.chat_template") == HF_CHAT_TEMPLATE
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_id
    assert len(_field(reader, "tokenizer.ggml.merges")) > 0

    got = _tensors(reader)
    assert "output.weight" not in got  # tied head: llama.cpp reads token_embd
    ours = {"token_embd.weight": model.embed.weight, "output_norm.weight": model.norm.weight,
            "blk.1.attn_q.weight": rope_pairs(model.layers[1].attn.q_proj.weight, 4),
            "blk.1.attn_k.weight": rope_pairs(model.layers[1].attn.k_proj.weight, 2),
            "blk.1.attn_v.weight": model.layers[1].attn.v_proj.weight,
            "blk.0.ffn_down.weight": model.layers[0].ffn.down_proj.weight,
            "blk.0.attn_norm.weight": model.layers[0].attn_norm.weight}
    for name, ref in ours.items():
        t, data = got[name]
        ref = ref.detach().numpy()
        assert data.reshape(ref.shape).shape == ref.shape, name
        err = np.abs(data.reshape(ref.shape) - ref).max() / np.abs(ref).max()
        assert err <= tol if ref.ndim == 2 else err == 0, (name, err)
    assert len(got) == 1 + 1 + 2 * 9  # embed, final norm, 9 tensors per block


def _rope_pairs_apply(x, pos, theta):  # llama.cpp's "normal" RoPE: adjacent pairs (2i, 2i+1) rotate
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2).float() / d)
    ang = pos[:, None] * inv[None]
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()
    return out


def test_rope_permutation_keeps_attention_scores():
    from model.positions import apply_rotary

    model = _model()
    attn, x = model.layers[0].attn, torch.randn(1, 7, 64)
    pos = torch.arange(7)
    cos, sin = model.rotary(pos[None], torch.float32)
    q = (x @ attn.q_proj.weight.T).view(1, 7, 4, 16).transpose(1, 2)
    k = (x @ attn.k_proj.weight.T).view(1, 7, 2, 16).transpose(1, 2)
    ours = apply_rotary(q, cos, sin)[:, ::2] @ apply_rotary(k, cos, sin).transpose(-1, -2)  # heads 0, 2 with kv 0, 1
    qp = (x @ rope_pairs(attn.q_proj.weight, 4).T).view(1, 7, 4, 16).transpose(1, 2)
    kp = (x @ rope_pairs(attn.k_proj.weight, 2).T).view(1, 7, 2, 16).transpose(1, 2)
    theirs = _rope_pairs_apply(qp, pos, 5e4)[:, ::2] @ _rope_pairs_apply(kp, pos, 5e4).transpose(-1, -2)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert torch.equal(rope_halves(rope_pairs(attn.q_proj.weight, 4), 4), attn.q_proj.weight)


def test_refusals_leave_nothing_behind(tmp_path, tok):
    with pytest.raises(UserError, match="convert_hf_to_gguf"):  # qk-norm: the HF family is qwen3, not llama
        write_gguf(_model(qk_norm=True, hf_family="qwen3"), tok, tmp_path / "q.gguf", "f16")
    with pytest.raises(UserError, match="multiple of the 32-value block"):
        write_gguf(_model(d_model=48, n_heads=3, n_kv_heads=1), tok, tmp_path / "w.gguf", "q8_0")
    with pytest.raises(UserError, match="outtype"):
        write_gguf(_model(), tok, tmp_path / "x.gguf", "q2_k")
    assert list(tmp_path.iterdir()) == []


def test_command_exports_a_checkpoint(tmp_path, tok):
    from model.hf_convert import main
    from utils.checkpoint import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "ckpt", _model(), tokenizer_path=tok.path)
    main(["gguf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out" / "m.gguf"), "--outtype", "q8_0"])
    reader = gguf.GGUFReader(tmp_path / "out" / "m.gguf")
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
