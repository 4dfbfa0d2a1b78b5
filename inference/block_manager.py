"""BlockManager: which physical KV blocks hold which sequence's tokens.

The cache is cut into ``num_blocks`` blocks of ``block_size`` token slots. Each sequence owns
a block table (list of block ids); token at position p lives in slot
``block_table[p // block_size] * block_size + p % block_size``.

Blocks are reference counted, so sequences can share them:
- prefix caching: a FULL block whose keys/values have been computed is registered under a
  hash chain of its contents, h_i = hash(h_{i-1}, tokens of block i). A new sequence whose
  prompt starts with the same tokens reuses those blocks instead of recomputing them.
  Freed blocks keep their hash and stay reusable until the block is handed out again
  (least recently freed first), so a finished request's prompt stays cached. A request for
  prompt log-probabilities takes no hit (it needs every position's hidden state) but still
  leaves its blocks for later requests.
- ``n > 1``: siblings fork from the sequence that computed the prompt and share all of its
  blocks; the first write into a shared block copies it (copy-on-write).

No tensors here: copies are returned as (src, dst) block pairs for the cache to perform.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from inference.sequence import Sequence

ROOT_HASH = 0x5EED  # hash of the empty prefix


def block_hash(prev_hash: int, tokens: tuple[int, ...]) -> int:
    """Content hash of a full block, chained with the hash of everything before it."""
    return hash((prev_hash, tokens))


def root_hash(seq: Sequence) -> int:
    """Where a sequence's hash chain starts: the empty prefix, or for a prompt with images a digest
    of their pixels (the placeholder ids are the same for every image; the cache must not be)."""
    return ROOT_HASH if seq.images is None else hash((ROOT_HASH, seq.images.digest))


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: Optional[int] = None  # set once the block is full and computed (prefix caching)
        self.token_ids: Optional[tuple[int, ...]] = None  # its contents, checked on a hash hit


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Unreferenced blocks in the order they were freed: the front is evicted first (LRU).
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.prefix_hit_tokens = 0  # statistics: prompt tokens served from the cache
        self.prefix_query_tokens = 0

    # ---- accounting -----------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take_free(self) -> Block:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its cached contents
            if self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash, block.token_ids = None, None
        block.ref_count = 1
        return block

    def _ref(self, block: Block) -> None:
        if block.ref_count == 0:
            del self.free[block.block_id]
        block.ref_count += 1

    def _unref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} freed twice"
        if block.ref_count == 0:
            self.free[block_id] = None

    # ---- admission: the prompt's blocks, reusing cached prefix blocks ------------------------
    def _match_prefix(self, seq: Sequence) -> tuple[list[Block], list[int]]:
        """Cached full blocks that equal the start of ``seq`` (never all of it: at least one
        token is left to compute, because the next token needs its logits). None for a sequence
        that wants its prompt's log-probabilities: they need the hidden state of every prompt
        position, and getting those for a cached prefix costs the same forward as computing it."""
        matched, hashes = [], []
        if not self.enable_prefix_caching or seq.needs_prompt_logprobs:
            return matched, hashes
        bs, h = self.block_size, root_hash(seq)
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = block_hash(h, tokens)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            matched.append(self.blocks[block_id])
            hashes.append(h)
        return matched, hashes

    def cached_prefix_len(self, seq: Sequence) -> int:
        """Tokens of ``seq`` that the prefix cache holds now (what ``allocate`` would skip)."""
        return len(self._match_prefix(seq)[0]) * self.block_size

    def can_allocate(self, seq: Sequence) -> bool:
        matched, _ = self._match_prefix(seq)
        revived = sum(1 for b in matched if b.ref_count == 0)  # cached but free: they leave the free list
        new = self.blocks_for(seq.num_tokens) - len(matched)
        return new + revived <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its tokens; cached prefix blocks count as computed."""
        assert not seq.block_table, f"{seq} already has blocks"
        matched, hashes = self._match_prefix(seq)
        for block in matched:
            self._ref(block)
        table = [b.block_id for b in matched]
        for _ in range(self.blocks_for(seq.num_tokens) - len(matched)):
            table.append(self._take_free().block_id)
        seq.block_table, seq.block_hashes = table, hashes
        seq.num_computed = seq.num_draft_computed = len(matched) * self.block_size
        seq.num_cached_prompt_tokens = min(seq.num_computed, seq.prompt_len)
        self.prefix_hit_tokens += seq.num_computed
        self.prefix_query_tokens += seq.num_tokens

    # ---- decode: room for new tokens, copy-on-write of shared blocks -------------------------
    def blocks_needed(self, seq: Sequence, upto: int) -> int:
        """Free blocks needed so positions [num_computed, upto) can be written."""
        new = max(0, self.blocks_for(upto) - len(seq.block_table))
        first = seq.num_computed // self.block_size
        shared = sum(1 for b in seq.block_table[first:] if self.blocks[b].ref_count > 1)
        return new + shared

    def can_append(self, seq: Sequence, upto: int) -> bool:
        return self.blocks_needed(seq, upto) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, upto: int) -> list[tuple[int, int]]:
        """Make positions [num_computed, upto) writable; returns (src, dst) block copies to do."""
        copies = []
        for i in range(seq.num_computed // self.block_size, len(seq.block_table)):
            src = seq.block_table[i]
            if self.blocks[src].ref_count > 1:  # shared with a sibling: copy before writing
                dst = self._take_free().block_id
                self._unref(src)
                seq.block_table[i] = dst
                copies.append((src, dst))
        while len(seq.block_table) < self.blocks_for(upto):
            seq.block_table.append(self._take_free().block_id)
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """``child`` shares every block of ``parent`` (n > 1 siblings after the prompt)."""
        for block_id in parent.block_table:
            self._ref(self.blocks[block_id])
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed, child.num_draft_computed = parent.num_computed, parent.num_draft_computed
        child.num_cached_prompt_tokens = parent.num_cached_prompt_tokens

    # ---- after a forward: register newly computed full blocks --------------------------------
    def commit(self, seq: Sequence, num_computed: Optional[int] = None) -> None:
        """Hash the full blocks whose K/V are now computed so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_computed = seq.num_computed if num_computed is None else num_computed
        for i in range(len(seq.block_hashes), num_computed // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = block_hash(seq.block_hashes[-1] if seq.block_hashes else root_hash(seq), tokens)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self.hash_to_block:
                block.hash, block.token_ids = h, tokens
                self.hash_to_block[h] = block.block_id

    def free_seq(self, seq: Sequence) -> None:
        """Drop the sequence's references; tail blocks first so they are evicted before the
        (more shareable) head blocks."""
        for block_id in reversed(seq.block_table):
            self._unref(block_id)
        seq.block_table, seq.block_hashes = [], []

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no running sequence holds."""
        for block_id in self.free:
            block = self.blocks[block_id]
            if block.hash is not None:
                self.hash_to_block.pop(block.hash, None)
                block.hash, block.token_ids = None, None
