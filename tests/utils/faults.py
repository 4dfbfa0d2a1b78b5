"""Faults the reliability tests inject: flipped bytes in a file, a save killed half-way."""
from __future__ import annotations

import os
import random
import struct

from model import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=True)


def flip_bytes(file, n: int, seed: int, start: int = 0) -> list[int]:
    """Flip one bit in each of ``n`` distinct bytes of ``file`` at or after ``start``; returns the offsets."""
    data = bytearray(file.read_bytes())
    offsets = random.Random(seed).sample(range(start, len(data)), n)
    for i in offsets:
        data[i] ^= 1 << random.Random(seed + i).randrange(8)
    file.write_bytes(bytes(data))
    return offsets


def safetensors_data_start(file) -> int:
    """Offset of the tensor bytes: 8-byte little-endian header length, then the JSON header."""
    return 8 + struct.unpack("<Q", file.read_bytes()[:8])[0]


def write_then_die(path) -> None:
    """Start saving a checkpoint at ``path`` and die (os._exit) in the middle of writing it, inside
    the atomic block: what SIGKILL or a power cut does to a save. Run it in a spawned process."""
    import utils.checkpoint as ck

    real = ck.torch.save

    def dying_save(obj, f, *a, **k):
        real(obj, f, *a, **k)
        os._exit(1)

    ck.torch.save = dying_save
    ck.save_checkpoint(path, Transformer(CFG), train_state={"step": 2})
