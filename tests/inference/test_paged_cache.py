"""PagedKVCache and PagedView: each token lands in the slot its block table names, rows gather their
own keys in position order, padding is neither written nor visible, and copy-on-write copies
whole blocks in every pool."""
import torch

from inference.paged_cache import PagedKVCache

BS, H, D, C = 4, 2, 3, 5  # block size, kv heads, head dim, an MLA-style latent width
PAD = -7.0  # written into padding columns: it must never reach a pool


def distinct(*shape, start=0.0):
    """A tensor whose every entry differs, so a wrong slot cannot go unnoticed."""
    n = torch.tensor(shape).prod().item()
    return (torch.arange(n, dtype=torch.float32) + start).view(*shape)


def slot(table: list[int], pos: int) -> int:
    return table[pos // BS] * BS + pos % BS


def test_block_slots_are_block_times_size_plus_offset():
    cache = PagedKVCache(num_blocks=5, block_size=BS)
    assert cache.block_slots(torch.tensor([2, 0])).tolist() == [[8, 9, 10, 11], [0, 1, 2, 3]]


def test_pools_fold_the_batch_into_the_slot_axis_for_any_cached_tensor():
    cache = PagedKVCache(num_blocks=3, block_size=BS)
    k, latent = distinct(1, H, 2, D), distinct(1, 2, C)  # (B, Hkv, T, D) and (B, T, C)
    cache.view([[1]], [0], [2]).update(0, k, latent)
    k_pool, latent_pool = cache.pools[0]
    assert k_pool.shape == (H, 3 * BS, D) and latent_pool.shape == (3 * BS, C)
    assert torch.equal(k_pool[:, 4:6], k[0]) and torch.equal(latent_pool[4:6], latent[0])
    assert cache.nbytes() == (H * 3 * BS * D + 3 * BS * C) * 4


def test_mixed_rows_write_their_slots_and_gather_their_keys_in_order():
    """Row 0 has 5 tokens cached in blocks [3, 1] and decodes one; row 1 prefills 3 tokens into
    block [0]. Row 0's two padding columns must not be written anywhere."""
    cache = PagedKVCache(num_blocks=5, block_size=BS)
    tables = [[3, 1], [0]]
    cached = distinct(1, H, 5, D, start=100)
    cache.view(tables[:1], [0], [5]).update(0, cached)

    new = distinct(2, H, 3, D, start=1000)
    new[0, :, 1:] = PAD
    view = cache.view(tables, [5, 0], [1, 3])
    (keys,) = view.update(0, new)  # (B, Hkv, Tk, D)

    assert keys.shape == (2, H, 6, D)
    assert torch.equal(keys[0], torch.cat([cached[0], new[0, :, :1]], 1))
    assert torch.equal(keys[1, :, :3], new[1])
    pool = cache.pools[0][0]
    for p in range(6):
        assert torch.equal(pool[:, slot(tables[0], p)], keys[0, :, p])
    for p in range(3):
        assert torch.equal(pool[:, slot(tables[1], p)], new[1, :, p])
    assert not (pool == PAD).any()


def test_key_mask_hides_each_rows_padding_keys():
    cache = PagedKVCache(num_blocks=5, block_size=BS)
    view = cache.view([[3, 1], [0]], [5, 0], [1, 3])  # 6 and 3 keys
    k_pos, k_valid = view.key_positions(torch.zeros(2, 3, dtype=torch.long))
    assert k_pos.tolist() == [list(range(6))] * 2
    assert k_valid.tolist() == [[True] * 6, [True] * 3 + [False] * 3]
    # recurrent layers cache no keys: padding is still dropped from writes but nothing is masked
    no_mask = cache.view([[3, 1], [0]], [5, 0], [1, 3], key_mask=False)
    assert no_mask.key_positions(torch.zeros(2, 3, dtype=torch.long))[1] is None
    assert no_mask.real.tolist() == [True, False, False, True, True, True]


def test_uniform_rows_need_no_mask():
    view = PagedKVCache(num_blocks=4, block_size=BS).view([[2], [0]], [3, 3], [1, 1])
    assert view.key_positions(torch.zeros(2, 1, dtype=torch.long))[1] is None and view.real is None


def test_copy_blocks_copies_every_slot_of_every_pool_and_nothing_else():
    cache = PagedKVCache(num_blocks=5, block_size=BS)
    for layer in range(2):  # fill all 20 slots of two layers, each with a k and a latent pool
        cache.view([[0, 1, 2, 3, 4]], [0], [5 * BS]).update(
            layer, distinct(1, H, 5 * BS, D, start=1000 * layer), distinct(1, 5 * BS, C, start=-1000 * layer)
        )
    before = [[p.clone() for p in pools] for pools in cache.pools.values()]
    cache.copy_blocks([(1, 4), (2, 0)])
    moved = {4: 1, 0: 2}  # destination block -> source block
    for old, pools in zip(before, cache.pools.values()):
        for was, pool in zip(old, pools):
            for block in range(5):
                src = moved.get(block, block)
                assert torch.equal(pool[..., block * BS : (block + 1) * BS, :], was[..., src * BS : (src + 1) * BS, :])
