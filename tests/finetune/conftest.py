"""Shared by the distillation tests: real (tiny) SFT and pretraining bins, a teacher and a smaller student."""
import json
import random

import numpy as np
import pytest
import torch

from model import ModelConfig, Transformer
from utils.checkpoint import save_checkpoint


def tiny_tokenizer(path, texts, vocab):
    from data_pipeline.tokenizer.train_tokenizer import train_hf

    path.mkdir(parents=True)
    train_hf(texts, vocab, False).save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """SFT bins (the pipeline's cache builder), pretraining bins, a teacher and a smaller student."""
    from data_pipeline.processing.sft_cache import build_sft_cache
    from data_pipeline.synthetic.sft import generate_conversations
    from data_pipeline.tokenizer.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("distill")
    rng = random.Random(0)
    for split, bucket, n in (("train", "sft", 40), ("val", "val", 8)):
        rows = generate_conversations(rng, n, bucket)
        (root / f"sft_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [m["content"] for line in (root / "sft_train.jsonl").read_text().splitlines()
             for m in json.loads(line)["messages"]]
    tok_path = tiny_tokenizer(root / "tok", texts, 400)
    tok = Tokenizer.from_file(tok_path)
    bins = build_sft_cache(str(root / "sft_train.jsonl"), str(root / "sft_val.jsonl"), tok, cache_root=str(root / "cache"))
    pre = root / "pre"
    pre.mkdir()
    stream = np.array([t for text in texts for t in tok.encode(text) + [tok.eos_id]], dtype=np.uint16)
    parts = {"train": stream[: len(stream) * 9 // 10], "val": stream[len(stream) * 9 // 10:]}
    for split, arr in parts.items():
        arr.tofile(pre / f"{split}.bin")
    (pre / "meta.json").write_text(json.dumps({"format": "pretrain", "dtype": "uint16", "vocab_size": tok.vocab_size,
                                               "tokenizer_hash": tok.hash,
                                               "n_tokens": {k: len(v) for k, v in parts.items()}}))
    torch.manual_seed(0)
    # The teacher's vocab is padded past the tokenizer's (as big models' are): the loss compares the shared ids.
    teacher = Transformer(ModelConfig(vocab_size=tok.vocab_size + 8, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2,
                                      d_ff=96, max_seq_len=128, init_std=0.1))
    save_checkpoint(root / "teacher", teacher, tokenizer_path=tok_path)
    student = Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                                      max_seq_len=128, init_std=0.1))
    save_checkpoint(root / "student", student, tokenizer_path=tok_path)
    return {"root": root, "bins": str(bins), "pre": pre, "tok": tok_path, "vocab": tok.vocab_size}
