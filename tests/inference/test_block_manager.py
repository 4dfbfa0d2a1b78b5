"""BlockManager: allocation, prefix-cache hits by content hash chain, LRU eviction, fork + copy-on-write."""
from inference.block_manager import BlockManager
from inference.sampling_params import SamplingParams
from inference.sequence import Sequence

_ids = iter(range(10**6))


def seq(tokens, n=1):
    return Sequence(next(_ids), "r", list(tokens), SamplingParams(n=n))


def finish_prefill(bm, s):
    s.num_computed = s.num_tokens
    bm.commit(s)


def test_allocate_and_free_counts_blocks():
    bm = BlockManager(num_blocks=10, block_size=4)
    s = seq(range(9))  # 9 tokens -> 3 blocks
    assert bm.can_allocate(s)
    bm.allocate(s)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 7 and s.num_computed == 0
    bm.free_seq(s)
    assert bm.num_free_blocks == 10 and s.block_table == []


def test_prefix_hit_reuses_full_blocks_only_and_leaves_a_token_to_compute():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq(range(10))
    bm.allocate(a)
    finish_prefill(bm, a)  # blocks [0..3], [4..7] full and hashed; [8, 9] partial
    b = seq(list(range(8)) + [50, 51, 52])  # shares the first two full blocks
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_computed == 8
    assert bm.blocks[a.block_table[0]].ref_count == 2
    c = seq(range(8))  # exactly two full blocks: the last one is recomputed so logits exist
    bm.allocate(c)
    assert c.num_computed == 4 and c.block_table[0] == a.block_table[0] and c.block_table[1] != a.block_table[1]
    d = seq([0, 1, 2, 99] + list(range(4, 8)) + [7])  # differs inside block 0: chain breaks at once
    bm.allocate(d)
    assert d.num_computed == 0


def test_hash_chain_depends_on_the_prefix():
    bm = BlockManager(num_blocks=10, block_size=2)
    a = seq([1, 2, 3, 4, 5])
    bm.allocate(a)
    finish_prefill(bm, a)
    b = seq([9, 9, 3, 4, 5])  # block 1 has the same tokens but a different prefix
    bm.allocate(b)
    assert b.num_computed == 0


def test_freed_blocks_stay_cached_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3, 4, 5])  # 3 blocks
    bm.allocate(a)
    finish_prefill(bm, a)
    bm.free_seq(a)
    assert bm.num_free_blocks == 4
    again = seq([1, 2, 3, 4, 6])
    assert bm.can_allocate(again)
    bm.allocate(again)
    assert again.num_computed == 4  # both full blocks revived from the free list
    bm.free_seq(again)
    # A sequence needing every block evicts the cached ones.
    big = seq(range(100, 108))
    bm.allocate(big)
    assert bm.num_free_blocks == 0 and not bm.hash_to_block
    bm.free_seq(big)
    late = seq([1, 2, 3, 4, 5])
    bm.allocate(late)
    assert late.num_computed == 0


def test_unhashed_when_prefix_caching_off():
    bm = BlockManager(num_blocks=10, block_size=2, enable_prefix_caching=False)
    a = seq([1, 2, 3, 4, 5])
    bm.allocate(a)
    finish_prefill(bm, a)
    b = seq([1, 2, 3, 4, 5])
    bm.allocate(b)
    assert b.num_computed == 0 and not set(a.block_table) & set(b.block_table)


def test_fork_shares_blocks_and_copies_on_write():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    parent = seq(range(6), n=2)  # blocks: [0..3] full, [4, 5] partial
    bm.allocate(parent)
    finish_prefill(bm, parent)
    child = seq(range(6))
    bm.fork(parent, child)
    assert child.block_table == parent.block_table and bm.num_free_blocks == 8
    # each appends its own token at position 6, inside the shared partial block
    for s in (parent, child):
        s.token_ids.append(7)
    copies = bm.append_slots(parent, 7)
    assert copies == [(child.block_table[1], parent.block_table[1])]
    assert parent.block_table[0] == child.block_table[0]  # the full block stays shared
    assert bm.append_slots(child, 7) == []  # the other holder is now alone: no copy
    assert bm.num_free_blocks == 7
    bm.free_seq(parent)
    bm.free_seq(child)
    assert bm.num_free_blocks == 10


def test_blocks_needed_counts_growth_and_cow():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    s = seq(range(4))
    bm.allocate(s)
    s.num_computed = 4
    s.token_ids.append(9)
    assert bm.blocks_needed(s, 5) == 1  # position 4 opens a second block
    assert bm.blocks_needed(s, 9) == 2  # with 4 lookahead slots: positions up to 8
    bm.append_slots(s, 9)
    assert len(s.block_table) == 3 and bm.blocks_needed(s, 9) == 0
