"""Scheduler: which sequences run in the next forward, and how many tokens each computes.

Continuous batching: every step either
- prefills: admits waiting sequences (new, preempted, or mid-way through a chunked prefill)
  while there is room under ``max_num_seqs``, ``max_num_batched_tokens`` (counted as
  rows x longest row, since rows are padded) and free KV blocks; a prompt longer than
  the token budget is computed in chunks over several steps; or
- decodes: every running sequence computes its newest token (``lookahead`` more slots
  are reserved for speculative decoding). When blocks run out, the most recently admitted
  sequence is preempted: its blocks are freed and it goes back to the front of the queue,
  to be recomputed later (recompute beats swapping on CPU and keeps the code small).

Prefill goes first so new requests start quickly. No tensor math here.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from inference.block_manager import BlockManager
from inference.sequence import Sequence, Status


@dataclass
class Batch:
    """One forward's work: row i computes ``seqs[i].token_ids[starts[i] : starts[i] + q_lens[i]]``."""

    seqs: list[Sequence]
    q_lens: list[int]
    is_prefill: bool
    starts: list[int] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) block copies before the forward
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        lookahead: int = 0,
    ):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.lookahead = lookahead
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def num_seqs(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- the decision ------------------------------------------------------------------------
    def schedule(self) -> Optional[Batch]:
        batch = self._schedule_prefill()
        if batch is None:
            batch = self._schedule_decode()
        if batch is not None:
            batch.starts = [s.num_computed for s in batch.seqs]
        return batch

    def _schedule_prefill(self) -> Optional[Batch]:
        seqs, q_lens = [], []
        budget = self.max_num_batched_tokens
        num_active = len(self.running)
        longest = 0
        for seq in self.waiting:
            width = seq.params.n if seq.pending_forks else 1  # siblings will need rows too
            if num_active + width > self.max_num_seqs:
                break
            if seq.block_table:  # already admitted: part-way through a chunked prefill
                remaining = seq.num_tokens - seq.num_computed
            elif self.bm.can_allocate(seq):
                remaining = seq.num_tokens - self.bm.cached_prefix_len(seq)
            else:
                break
            if seqs:
                # rows are padded to the longest: stop when the padded batch would not fit
                take = min(remaining, budget // (len(seqs) + 1))
                if take < remaining or (len(seqs) + 1) * max(longest, take) > budget:
                    break
            else:
                take = min(remaining, budget)  # a long prompt is computed in chunks
            if not seq.block_table:
                self.bm.allocate(seq)
            seqs.append(seq)
            q_lens.append(take)
            longest = max(longest, take)
            num_active += width
        if not seqs:
            return None
        return Batch(seqs, q_lens, is_prefill=True)

    def _schedule_decode(self) -> Optional[Batch]:
        seqs, copies, preempted = [], [], []
        running = list(self.running)
        while running:
            seq = running.pop(0)
            upto = seq.num_tokens + self.lookahead
            while not self.bm.can_append(seq, upto):
                # Out of blocks: preempt the most recently admitted sequence (maybe this one).
                victim = running.pop() if running else seq
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                copies += self.bm.append_slots(seq, upto)
                seqs.append(seq)
        if not seqs:
            return None
        q_lens = [s.num_tokens - s.num_computed for s in seqs]
        return Batch(seqs, q_lens, is_prefill=False, copies=copies, preempted=preempted)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free_seq(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ---- bookkeeping the engine calls after a forward -----------------------------------------
    def started(self, seq: Sequence) -> None:
        """A prefill completed: the sequence moves from the queue to the running batch."""
        self.waiting.remove(seq)
        seq.status = Status.RUNNING
        self.running.append(seq)

    def add_running(self, seq: Sequence) -> None:
        seq.status = Status.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """A finished or aborted sequence leaves the scheduler and frees its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free_seq(seq)
