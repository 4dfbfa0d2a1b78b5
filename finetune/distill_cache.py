"""The teacher's top-k, computed once per (teacher, data, k, temperature) and kept on disk.

    folder = build_topk_cache(teacher, teacher_dir, bin_dir, ("train", "val"), k=64, temperature=1.0, ...)
    batches = CachedBatches(SFTLoader(bin_dir, "train", ..., pack=False, return_offsets=True), TopKFile(folder, "train"))

With the cache, training never runs the teacher: each batch brings the teacher's k most likely
next tokens, their log-probs and the log of the rest's mass (finetune/distill_losses.py's TopK)
for every counted position. The folder's name hashes everything the numbers depend on (the
teacher's files, the bins, k, the temperature, the row length, dtype and quantization), so a
changed input never reuses stale values. Layout, per split:

    {split}.positions.npy   int64 (n,)     token offsets o in {split}.bin whose next token o + 1 is an assistant token
    {split}.index.bin       int32 (n, k)   the teacher's k most likely next tokens at o, most likely first
    {split}.logp.bin        float32 (n, k) their log-probs at the temperature
    {split}.tail.bin        float32 (n,)   log of the mass of every other token

Position o holds the teacher's distribution given its example alone, from the example's start to
o, cut at seq_len + 1 tokens as the SFT loader cuts it: so the rows must be single examples
(data.pack: false) for the student to see what the teacher saw.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from finetune.distill_losses import top_k
from utils.errors import UserError
from utils.fs import atomic_dir

CACHE_VERSION = 1
HINT = "delete the folder and run again to rebuild it"


def teacher_fingerprint(path: str) -> list:
    """What identifies a teacher's weights without reading them: the name, size and modification
    time of its files (and of its adapter base's, recursively)."""
    from model.load import adapter_base, checkpoint_kind

    folder = Path(path)
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file())
    out = [[str(folder.resolve()), [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]]]
    if checkpoint_kind(folder) == "adapter":
        out += teacher_fingerprint(str(adapter_base(folder)))
    return out


def cache_key(teacher_dir: str, bin_dir: str, splits: Sequence[str], **settings) -> str:
    bins = Path(bin_dir)
    data = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(bins.iterdir()) if p.is_file()]
    parts = {"v": CACHE_VERSION, "teacher": teacher_fingerprint(teacher_dir), "data": data, "splits": list(splits),
             **settings}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def counted_positions(loader) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Offsets o (ascending) whose next token is an assistant token, within each example cut at
    seq_len + 1 tokens; and each example's (start, kept length). ``loader`` is an SFTLoader."""
    spans, found = [], []
    for s, e in zip(loader.starts.tolist(), loader.ends.tolist()):
        n = min(e - s, loader.seq_len + 1)
        spans.append((s, n))
        found.append(s + np.flatnonzero(loader.mask[s + 1:s + n]))
    return (np.concatenate(found).astype(np.int64) if found else np.zeros(0, np.int64)), spans


@torch.no_grad()
def write_split(folder: Path, split: str, loader, teacher: nn.Module, k: int, temperature: float, vocab: int,
                batch_rows: int, device: torch.device) -> dict:
    """Run the teacher over every example of one split (in file order, so offsets ascend) and
    write its top-k at the counted positions; returns {entries, mean_tail_mass}."""
    positions, spans = counted_positions(loader)
    n = len(positions)
    np.save(folder / f"{split}.positions.npy", positions)
    index = np.memmap(folder / f"{split}.index.bin", np.int32, "w+", shape=(max(n, 1), k))
    logp = np.memmap(folder / f"{split}.logp.bin", np.float32, "w+", shape=(max(n, 1), k))
    tail = np.memmap(folder / f"{split}.tail.bin", np.float32, "w+", shape=(max(n, 1),))
    filled, tail_mass = 0, 0.0
    for b in range(0, len(spans), batch_rows):
        group = spans[b:b + batch_rows]
        width = max(length for _, length in group)
        ids = np.full((len(group), width), loader.pad_id, np.int64)
        want = np.zeros((len(group), width), bool)
        for r, (s, length) in enumerate(group):
            ids[r, :length] = loader.tokens[s:s + length]
            want[r, :length - 1] = loader.mask[s + 1:s + length] > 0
        if not want.any():
            continue
        x = torch.from_numpy(ids[:, :-1]).to(device)
        hidden = teacher(x, return_hidden=True)[torch.from_numpy(want[:, :-1]).to(device)]  # (m, d) in row order
        for c in range(0, hidden.shape[0], 1024):
            top = top_k(teacher.logits(hidden[c:c + 1024])[:, :vocab], k, temperature)
            m = top.index.shape[0]
            index[filled:filled + m] = top.index.cpu().numpy()
            logp[filled:filled + m] = top.logp.cpu().numpy()
            tail[filled:filled + m] = top.tail.cpu().numpy()
            tail_mass += float(top.tail.exp().sum())
            filled += m
    if filled != n:
        raise RuntimeError(f"top-k cache: wrote {filled} entries for {n} counted positions")
    for array in (index, logp, tail):
        array.flush()
    return {"entries": n, "mean_tail_mass": tail_mass / max(n, 1)}


def build_topk_cache(teacher: nn.Module, teacher_dir: str, bin_dir: str, splits: Sequence[str], *, k: int,
                     temperature: float, vocab: int, seq_len: int, settings: dict, cache_root: str,
                     device: torch.device, batch_rows: int = 16, log=print) -> Path:
    """The cache folder for these inputs: reused when it exists, else built (atomically)."""
    from data_pipeline.loader import SFTLoader

    key = cache_key(teacher_dir, bin_dir, splits, k=k, temperature=temperature, vocab=vocab, seq_len=seq_len, **settings)
    out = Path(cache_root) / f"topk-{key}"
    if (out / "meta.json").is_file():
        log(f"distill: reusing the teacher's top-{k} cache {out}")
        return out
    meta = {"version": CACHE_VERSION, "teacher": teacher_dir, "bin_dir": bin_dir, "k": k, "temperature": temperature,
            "vocab": vocab, "seq_len": seq_len, **settings, "splits": {}}
    with atomic_dir(out) as tmp:
        for split in splits:
            loader = SFTLoader(bin_dir, split, seq_len, 1, shuffle=False)
            meta["splits"][split] = write_split(tmp, split, loader, teacher, k, temperature, vocab, batch_rows, device)
        per_token = k * 8 + 4
        meta["bytes_per_entry"] = per_token
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    for split, info in meta["splits"].items():
        log(f"distill: teacher top-{k} of {info['entries']:,} {split} positions -> {out} "
            f"({info['entries'] * per_token / 1e6:.1f} MB; mean tail mass outside the top {k}: {info['mean_tail_mass']:.2e})")
    return out


class TopKFile:
    """One split of a cache folder, read through memmaps; ``lookup`` finds the entries of offsets."""

    def __init__(self, folder: str | Path, split: str):
        folder = Path(folder)
        try:
            meta = json.loads((folder / "meta.json").read_text())
            self.k, n = meta["k"], meta["splits"][split]["entries"]
            self.positions = np.load(folder / f"{split}.positions.npy")
            rows = max(n, 1)
            self.index = np.memmap(folder / f"{split}.index.bin", np.int32, "r", shape=(rows, self.k))
            self.logp = np.memmap(folder / f"{split}.logp.bin", np.float32, "r", shape=(rows, self.k))
            self.tail = np.memmap(folder / f"{split}.tail.bin", np.float32, "r", shape=(rows,))
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"the top-k cache {folder} is incomplete or damaged ({err}); {HINT}.") from None
        if len(self.positions) != n:
            raise UserError(f"the top-k cache {folder} does not match its meta.json; {HINT}.")
        self.folder = folder

    def lookup(self, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(index (m, k) int64, logp (m, k), tail (m,)) for m token offsets that must be in the cache."""
        at = np.searchsorted(self.positions, offsets)
        if len(offsets) and (at.max() >= len(self.positions) or not np.array_equal(self.positions[at], offsets)):
            raise UserError(f"the top-k cache {self.folder} has no entry for some counted positions of this data; {HINT}.")
        return self.index[at].astype(np.int64), np.asarray(self.logp[at]), np.asarray(self.tail[at])


class CachedBatches:
    """SFT batches (single examples per row) with the cached teacher for every counted position:
    dicts {x, y, loss_mask, topk_index (B, T, k), topk_logp (B, T, k), topk_tail (B, T)}; zeros
    where a position does not count. Resumes as its loader does."""

    def __init__(self, loader, cache: TopKFile):
        if loader.pack or not loader.return_offsets:
            raise ValueError("CachedBatches needs an SFTLoader with pack=False and return_offsets=True")
        self.loader, self.cache = loader, cache

    def __iter__(self) -> "CachedBatches":
        return self

    def __next__(self) -> dict:
        x, y, mask, offsets = next(self.loader)
        B, T, k = x.shape[0], x.shape[1], self.cache.k
        counted = mask.bool()
        index, logp, tail = self.cache.lookup(offsets[counted].numpy())
        out = {"x": x, "y": y, "loss_mask": mask, "topk_index": torch.zeros(B, T, k, dtype=torch.long),
               "topk_logp": torch.zeros(B, T, k), "topk_tail": torch.zeros(B, T)}
        out["topk_index"][counted] = torch.from_numpy(index)
        out["topk_logp"][counted] = torch.from_numpy(logp)
        out["topk_tail"][counted] = torch.from_numpy(tail)
        return out

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def batch_teacher(batch: dict) -> Optional[object]:
    """The cached teacher of a batch as a TopK over its flattened rows, or None (no cache)."""
    from finetune.distill_losses import TopK

    if "topk_index" not in batch:
        return None
    return TopK(batch["topk_logp"].flatten(0, 1), batch["topk_index"].flatten(0, 1), batch["topk_tail"].flatten(0, 1))
