"""Batches for every stage, read from the token bins through read-only memmaps.

    PretrainLoader    random (x, y) windows of the pretraining stream
    SFTLoader         (x, y, loss_mask[, position_ids]) rows packed with whole conversations
    PreferenceLoader  dicts of padded chosen/rejected sequences with response masks
    load_jsonl        rows of a JSON-lines file (RL prompts, eval sets)

All loaders are infinite iterators, deterministic given (seed, rank), and
resumable: ``state_dict()`` is a small dict of ints to store in a checkpoint,
and ``load_state_dict(state)`` makes the next batch the one that would have
come next. No loader reads a whole file into memory; meta.json sizes and the
tokenizer hash (``expect_tokenizer_hash``) are checked up front (UserError).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from data_pipeline.jsonl import load_jsonl  # noqa: F401  (re-exported for other stages)
from data_pipeline.processing.binfile import check_tokenizer_hash, open_array, read_meta
from utils.errors import UserError

PRETRAIN_HINT = "python data_pipeline/processing/build_pretrain_bins.py"
SFT_HINT = "python data_pipeline/processing/build_sft_bins.py"
PREFERENCE_HINT = "python data_pipeline/processing/build_preference_bins.py"


def _open_meta(folder: Path, fmt: str, split: str, hint: str, expect_hash: str | None) -> dict:
    meta = read_meta(folder, hint)
    if meta.get("format") != fmt:
        raise UserError(f"{folder}/meta.json has format {meta.get('format')!r}, expected {fmt!r}; "
                        f"point the loader at the {fmt} bins (built by {hint})")
    if split not in meta.get("n_tokens", {}):
        raise UserError(f"{folder} has no split {split!r} (has {sorted(meta.get('n_tokens', {}))})")
    check_tokenizer_hash(meta, expect_hash, str(folder), hint)
    return meta


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is not in [0, world_size={world_size})")


def restart_positions(starts: np.ndarray) -> np.ndarray:
    """Positions that restart at 0 at every document start: starts (B, T) bool -> (B, T) int64.
    Tokens before a row's first start count from the row's beginning."""
    t = np.arange(starts.shape[1])
    last_start = np.maximum.accumulate(np.where(starts, t, 0), axis=1)
    return t - last_start


class PretrainLoader:
    """Random windows of a pretraining ``.bin``.

    Each batch draws ``batch_size`` start offsets uniformly from the stream with
    an RNG seeded by (seed, rank, step), so batch k is a pure function of those
    three numbers: ranks see different windows, and resume only needs ``step``.
    Yields (x, y): int64 tensors (B, T) with y[:, t] = x[:, t + 1] (next token), or with
    ``document_mask=True`` (x, y, positions): positions (B, T) restart at 0 at each document,
    which opens with the EOS separating it from the one before (as the tokenizer's documents
    start: ``eos_after_each_doc`` bins), so the model can keep the documents of a window apart.
    """

    def __init__(self, bin_path: str | os.PathLike, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, expect_tokenizer_hash: str | None = None,
                 document_mask: bool = False):
        _check_rank(rank, world_size)
        bin_path = Path(bin_path)
        self.meta = _open_meta(bin_path.parent, "pretrain", bin_path.stem, PRETRAIN_HINT, expect_tokenizer_hash)
        self.document_mask = document_mask
        if document_mask and not isinstance(self.meta.get("eos_id"), int):
            raise UserError(f"{bin_path.parent}/meta.json names no eos_id, so documents cannot be told apart; rebuild "
                            f"the bins with {PRETRAIN_HINT} or set data.document_mask: false.")
        self.tokens = open_array(bin_path, self.meta["dtype"], self.meta["n_tokens"][bin_path.stem], PRETRAIN_HINT)
        if self.tokens.size < seq_len + 1:
            raise UserError(f"{bin_path} has {self.tokens.size} tokens, fewer than seq_len + 1 = "
                            f"{seq_len + 1}; use a smaller seq_len or more data")
        self.seq_len, self.batch_size = seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.step = 0

    def __iter__(self) -> PretrainLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, self.step])
        starts = rng.integers(0, self.tokens.size - self.seq_len, size=self.batch_size)
        window = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        self.step += 1
        x, y = torch.from_numpy(window[:, :-1]), torch.from_numpy(window[:, 1:])  # (B, T), (B, T)
        if self.document_mask:
            return x, y, torch.from_numpy(restart_positions(window[:, :-1] == self.meta["eos_id"]))
        return x, y

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.seed = int(state["step"]), int(state["seed"])


class _EpochOrder:
    """Shuffled example order per epoch, sharded by rank; position = (epoch, cursor)."""

    def __init__(self, candidates: np.ndarray, seed: int, rank: int, world_size: int, shuffle: bool):
        self.candidates, self.seed, self.rank, self.world_size, self.shuffle = candidates, seed, rank, world_size, shuffle
        if len(candidates) < world_size:
            raise UserError(f"only {len(candidates)} examples for world_size={world_size} ranks")
        self.epoch, self.cursor, self._cached = 0, 0, (-1, None)

    def _order(self) -> np.ndarray:
        if self._cached[0] != self.epoch:
            perm = (np.random.default_rng([self.seed, self.epoch]).permutation(len(self.candidates))
                    if self.shuffle else np.arange(len(self.candidates)))
            self._cached = (self.epoch, self.candidates[perm[self.rank::self.world_size]])
        return self._cached[1]

    def peek(self) -> int:
        order = self._order()
        if self.cursor >= len(order):
            self.epoch, self.cursor = self.epoch + 1, 0
            order = self._order()
        return int(order[self.cursor])

    def advance(self) -> None:
        self.cursor += 1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self.seed = int(state["epoch"]), int(state["cursor"]), int(state["seed"])


class SFTLoader:
    """Rows of whole chat examples with the assistant loss mask.

    Examples are visited in a shuffled order per epoch (seed, epoch), split
    across ranks. With ``pack=True`` a row of T + 1 tokens takes examples until
    the next one does not fit (then the rest is padding); with ``pack=False``
    each row holds one example. An example longer than T + 1 is truncated, or left out with
    ``drop_long=True`` (``n_long`` counts them either way).
    Each example starts with <|bos|>; the position ids let the model keep packed examples
    apart (``model.attention.document_ids``: block-diagonal causal attention).

    Yields (x, y, loss_mask), then position_ids with ``return_position_ids=True``, then
    offsets with ``return_offsets=True``:
      x, y          int64 (B, T), y[:, t] = next token after x[:, t]; padding = pad_id
      loss_mask     float32 (B, T), 1.0 where y is an assistant token (content or
                    its closing <|im_end|>), 0.0 elsewhere (prompts, template, padding)
      position_ids  int64 (B, T), restarting at 0 at each packed example (0 on padding)
      offsets       int64 (B, T), where x[:, t] sits in the split's token file (-1 on padding),
                    so data kept per token beside the bins (a teacher's top-k) can be looked up
    """

    def __init__(self, bin_dir: str | os.PathLike, split: str, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, pack: bool = True, expect_tokenizer_hash: str | None = None,
                 return_position_ids: bool = False, shuffle: bool = True, drop_long: bool = False,
                 return_offsets: bool = False):
        _check_rank(rank, world_size)
        folder = Path(bin_dir)
        self.meta = meta = _open_meta(folder, "sft", split, SFT_HINT, expect_tokenizer_hash)
        n_tok, n_ex = meta["n_tokens"][split], meta["n_examples"][split]
        self.tokens = open_array(folder / f"{split}.bin", meta["dtype"], n_tok, SFT_HINT)
        self.mask = open_array(folder / f"{split}.mask.bin", "uint8", n_tok, SFT_HINT)
        self.starts = np.load(folder / f"{split}.idx.npy")
        if self.starts.shape != (n_ex,) or (n_ex and (self.starts[0] != 0 or self.starts[-1] >= n_tok)):
            raise UserError(f"{folder / f'{split}.idx.npy'} does not match meta.json (corrupted?); "
                            f"rebuild with {SFT_HINT}")
        self.ends = np.append(self.starts[1:], n_tok)
        self.seq_len, self.batch_size, self.pack = seq_len, batch_size, pack
        self.pad_id, self.return_position_ids, self.return_offsets = meta["pad_id"], return_position_ids, return_offsets
        # Examples longer than a row (seq_len + 1 tokens) are cut at the end, or with drop_long left out.
        long = (self.ends - self.starts) > seq_len + 1
        self.n_long = int(long.sum())
        kept = np.flatnonzero(~long) if drop_long else np.arange(n_ex)
        if not kept.size:
            raise UserError(f"every {split} example in {folder} is longer than train.seq_len + 1 = {seq_len + 1} tokens; "
                            "raise train.seq_len or keep long examples (data.long_examples: truncate).")
        self.order = _EpochOrder(kept, seed, rank, world_size, shuffle)

    def __iter__(self) -> SFTLoader:
        return self

    def __next__(self):
        B, L = self.batch_size, self.seq_len + 1
        ids = np.full((B, L), self.pad_id, dtype=np.int64)
        mask = np.zeros((B, L), dtype=np.float32)
        pos = np.zeros((B, L), dtype=np.int64)
        offsets = np.full((B, L), -1, dtype=np.int64)
        for b in range(B):
            filled = 0
            while True:
                i = self.order.peek()
                n = min(int(self.ends[i] - self.starts[i]), L)
                if filled and (not self.pack or filled + n > L):
                    break  # this example opens the next row
                s = int(self.starts[i])
                ids[b, filled:filled + n] = self.tokens[s:s + n]
                mask[b, filled:filled + n] = self.mask[s:s + n]
                pos[b, filled:filled + n] = np.arange(n)
                offsets[b, filled:filled + n] = np.arange(s, s + n)
                filled += n
                self.order.advance()
                if not self.pack or filled == L:
                    break
        x, y = torch.from_numpy(ids[:, :-1]), torch.from_numpy(ids[:, 1:])
        loss_mask = torch.from_numpy(mask[:, 1:])  # mask of the target token
        out = (x, y, loss_mask)
        if self.return_position_ids:
            out += (torch.from_numpy(pos[:, :-1]),)
        if self.return_offsets:
            out += (torch.from_numpy(offsets[:, :-1]),)
        return out

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)


class PreferenceLoader:
    """Batches of (chosen, rejected) pairs, each sequence = prompt + response, right-padded.

    Yields a dict of tensors, T = seq_len:
      chosen_ids, rejected_ids            int64 (B, T): the rendered chat (prompt with
                                          its <|im_start|>assistant header, then the
                                          response and <|im_end|>\\n), truncated to T,
                                          padded with pad_id
      chosen_mask, rejected_mask          float32 (B, T), aligned to TARGETS:
                                          mask[b, t] = 1.0 iff ids[b, t + 1] is a response
                                          token (content or its <|im_end|>); last column 0.
                                          So the sequence log-prob is
                                          (log_softmax(model(ids))[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
                                           * mask[:, :-1]).sum(-1)
      chosen_attention_mask, rejected_attention_mask  int64 (B, T): 1 on real tokens
      prompt_len, chosen_len, rejected_len int64 (B,): lengths before truncation
    Pairs whose prompt alone does not leave room for a response token are skipped.
    """

    def __init__(self, bin_dir: str | os.PathLike, split: str, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, expect_tokenizer_hash: str | None = None,
                 shuffle: bool = True):
        _check_rank(rank, world_size)
        folder = Path(bin_dir)
        self.meta = meta = _open_meta(folder, "preference", split, PREFERENCE_HINT, expect_tokenizer_hash)
        n_tok, n_pairs = meta["n_tokens"][split], meta["n_pairs"][split]
        self.tokens = open_array(folder / f"{split}.bin", meta["dtype"], n_tok, PREFERENCE_HINT)
        self.mask = open_array(folder / f"{split}.mask.bin", "uint8", n_tok, PREFERENCE_HINT)
        self.index = np.load(folder / f"{split}.idx.npy")  # (N, 5)
        if self.index.shape != (n_pairs, 5) or (n_pairs and (self.index[:, [0, 2]] + self.index[:, [1, 3]]).max() > n_tok):
            raise UserError(f"{folder / f'{split}.idx.npy'} does not match meta.json (corrupted?); "
                            f"rebuild with {PREFERENCE_HINT}")
        fits = np.flatnonzero(self.index[:, 4] < seq_len)
        if fits.size == 0:
            raise UserError(f"no preference pair in {folder} ({split}) has a prompt shorter than "
                            f"seq_len={seq_len}; raise seq_len")
        self.seq_len, self.batch_size, self.pad_id = seq_len, batch_size, meta["pad_id"]
        self.order = _EpochOrder(fits, seed, rank, world_size, shuffle)

    def __iter__(self) -> PreferenceLoader:
        return self

    def _side(self, rows: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        B, T = len(rows), self.seq_len
        ids = np.full((B, T), self.pad_id, dtype=np.int64)
        target_mask = np.zeros((B, T), dtype=np.float32)
        attention = np.zeros((B, T), dtype=np.int64)
        for b, (start, length) in enumerate(rows):
            n = min(length, T)
            ids[b, :n] = self.tokens[start:start + n]
            attention[b, :n] = 1
            target_mask[b, :n - 1] = self.mask[start + 1:start + n]  # mask of token t+1 at column t
        return ids, target_mask, attention

    def __next__(self) -> dict[str, torch.Tensor]:
        picked = []
        for _ in range(self.batch_size):
            picked.append(self.index[self.order.peek()])
            self.order.advance()
        picked = np.stack(picked)
        out = {}
        for name, (s, l) in (("chosen", (0, 1)), ("rejected", (2, 3))):
            ids, mask, attention = self._side([(int(r[s]), int(r[l])) for r in picked])
            out[f"{name}_ids"], out[f"{name}_mask"] = torch.from_numpy(ids), torch.from_numpy(mask)
            out[f"{name}_attention_mask"] = torch.from_numpy(attention)
            out[f"{name}_len"] = torch.from_numpy(picked[:, l].astype(np.int64))
        out["prompt_len"] = torch.from_numpy(picked[:, 4].astype(np.int64))
        return out

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)
