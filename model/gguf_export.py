"""Export a checkpoint to one GGUF file that llama.cpp (and Ollama) runs: weights, architecture,
RoPE, tokenizer and chat template.

    python model/hf_convert.py gguf --checkpoint runs/x/final --out model.gguf --outtype q8_0

What can be exported is what llama.cpp's ``llama`` architecture computes: a model that exports
to the HF ``llama`` family exactly (model/hf_interop.py's strict check: RMSNorm, RoPE without
scaling, SwiGLU, GQA, tied or untied head), without biases, and a byte-level BPE tokenizer with
GPT-2's pre-tokenizer (the project's own tokenizers). Anything else is refused with a message;
for other HF families, llama.cpp's own ``convert_hf_to_gguf.py`` reads our HF export.

Two layout changes on the way, both llama.cpp's conventions:
- RoPE: our q/k rotate two halves of each head (the HF layout); llama.cpp's ``llama`` rotates
  adjacent pairs, so the rows of q_proj and k_proj are permuted within each head
  (row i of the first half -> 2i, of the second half -> 2i + 1), which gives the same attention scores.
- names: HF tensor names -> GGUF names through gguf's own tensor map (``blk.N.attn_q.weight``...).

Types (``--outtype``): f32, f16, bf16, q8_0 (blocks of 32 int8 with an f16 scale) and q4_0 (blocks
of 32 4-bit codes with an f16 scale); 1-D tensors (norms) stay f32 as llama.cpp expects.
The ``gguf`` package is needed by this command only and is imported when it runs.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.errors import UserError

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the gguf package: pip install gguf (it is in requirements.txt).") from None
    return gguf


def rope_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection (n_heads * head_dim, d) from the halves layout to adjacent pairs."""
    out_f = w.shape[0]
    return w.reshape(n_heads, 2, out_f // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``rope_pairs`` (for reading a GGUF back)."""
    out_f = w.shape[0]
    return w.reshape(n_heads, out_f // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _check_llama(hf_config: dict) -> None:
    if hf_config.get("model_type") != "llama":
        raise UserError(f"GGUF export writes llama.cpp's 'llama' architecture; this model exports to the HF family "
                        f"{hf_config.get('model_type')!r}. Export it with `python model/hf_convert.py export` and run "
                        "llama.cpp's convert_hf_to_gguf.py on that directory.")
    for key in ("attention_bias", "mlp_bias"):
        if hf_config.get(key):
            raise UserError(f"GGUF export: this model has {key}=true; the exporter writes bias-free llama models. "
                            "Use llama.cpp's convert_hf_to_gguf.py on the HF export.")
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"GGUF export: RoPE scaling {rope.get('rope_type')!r} is not written by this exporter; "
                        "use llama.cpp's convert_hf_to_gguf.py on the HF export.")


def _check_tokenizer(tok_dir: Path) -> dict:
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    gpt2_style = (model.get("type") == "BPE" and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                  and not spec.get("normalizer"))
    if not gpt2_style:
        raise UserError("GGUF export writes byte-level BPE tokenizers with GPT-2's pre-tokenizer (the ones this "
                        "project trains); this tokenizer is another kind. Use llama.cpp's convert_hf_to_gguf.py on "
                        "the HF export, which recognises published tokenizers.")
    return spec


def _vocab(spec: dict, vocab_size: int, gguf: Any) -> tuple[list[str], list[int]]:
    """Token strings in id order (padded to the model's vocab_size) and their GGUF token types."""
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    special = {}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        special[added["id"]] = added.get("special", False)
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if special.get(i) else
                         gguf.TokenType.USER_DEFINED if i in special else gguf.TokenType.NORMAL)
    return tokens, types


def _tensor_data(name: str, t: torch.Tensor, outtype: str, gguf: Any) -> tuple[np.ndarray, Any]:
    """(data to write, GGML type): 1-D tensors in f32, matrices in ``outtype``."""
    Q = gguf.GGMLQuantizationType
    arr = t.detach().float().cpu().numpy()
    if arr.ndim == 1 or outtype == "f32":
        return arr, Q.F32
    qtype = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[outtype]
    if qtype in (Q.Q8_0, Q.Q4_0) and arr.shape[-1] % 32:
        raise UserError(f"GGUF {outtype}: tensor {name} has rows of {arr.shape[-1]} values, not a multiple of the "
                        "32-value block; use f16 or bf16.")
    return gguf.quants.quantize(arr, qtype), qtype


def write_gguf(model: torch.nn.Module, tok: Any, out: str | os.PathLike, outtype: str = "f16", name: str = "model") -> Path:
    """Write ``model`` and its tokenizer ``tok`` as one GGUF file at ``out`` (written to a temporary
    file beside it and renamed). Returns the path."""
    from model.hf_interop import to_hf

    if outtype not in OUTTYPES:
        raise UserError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}.")
    gguf = _gguf()
    cfg = model.cfg
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    hf_state, hf_config = to_hf(state, cfg)
    _check_llama(hf_config)
    with tempfile.TemporaryDirectory() as tok_dir:
        tok.save_hf(tok_dir)
        spec = _check_tokenizer(Path(tok_dir))
        special = gguf.SpecialVocab(tok_dir, load_merges=True)
    tokens, types = _vocab(spec, cfg.vocab_size, gguf)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:  # on any failure the temporary file goes, nothing half-written is left
        writer.add_name(name)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[outtype])
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.d_model)
        writer.add_block_count(cfg.n_layers)
        writer.add_feed_forward_length(cfg.d_ff)
        writer.add_head_count(cfg.n_heads)
        writer.add_head_count_kv(cfg.n_kv_heads)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(float(cfg.rope_theta))
        writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")  # llama.cpp's name for GPT-2's pre-tokenizer regex
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special.add_to_gguf(writer, quiet=True)  # merges, bos/eos/pad ids, chat template
        writer.add_add_bos_token(False)  # the chat template writes BOS itself

        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layers)
        for hf_name, t in hf_state.items():
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            if hf_name.endswith("q_proj.weight"):
                t = rope_pairs(t, cfg.n_heads)
            elif hf_name.endswith("k_proj.weight"):
                t = rope_pairs(t, cfg.n_kv_heads)
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise UserError(f"GGUF export: no llama.cpp tensor for {hf_name}.")  # a bug in the mapping, said plainly
            data, qtype = _tensor_data(hf_name, t, outtype, gguf)
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)  # quantized: byte rows, shape recovered from the type
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def export_gguf(checkpoint: str, out: str, outtype: str = "f16") -> Path:
    """A checkpoint directory (full, or an adapter merged onto its base) -> one GGUF file."""
    from model.load import load

    model, tok = load(checkpoint, expect="lm")
    return write_gguf(model, tok, out, outtype, name=Path(checkpoint).resolve().name)
