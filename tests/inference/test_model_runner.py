"""ModelRunner: the logits of a padded batch that mixes prefill, chunked-prefill and decode rows
over scattered KV blocks equal a plain full forward of each row's whole sequence; copy-on-write
blocks and recurrent (linear attention) state behave like a fresh sequence."""
import pytest
import torch

from inference.model_runner import ModelRunner
from tests.inference.test_engine import ALL, tiny_model

BS = 4
NAMES = ["llama3", "gemma2", "deepseek_v3", "alibi", "linear_attention"]


@torch.no_grad()
def plain(model, ids: list[int]) -> torch.Tensor:
    """Logits of every position (T, V) from one forward without a cache."""
    return model(torch.tensor([ids]))[0].float()


def sequences(vocab: int) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(2)
    return {name: torch.randint(0, vocab, (n,), generator=g).tolist() for name, n in (("a", 7), ("b", 12), ("c", 5))}


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    # Rows are padded and batched differently from the reference, so float sums may round apart
    # in the last bit; anything beyond that is a wrong key, position or mask.
    assert (got - want).abs().max().item() <= 1e-5, (got - want).abs().max().item()


@pytest.mark.parametrize("name", NAMES)
def test_mixed_prefill_and_decode_batch_equals_plain_forward(name):
    model = tiny_model(ALL[name])
    seq = sequences(model.cfg.vocab_size)
    tables = {"a": [5, 2], "b": [0, 7, 3], "c": [8, 1]}  # scattered, out-of-order blocks
    ids = {"a": 0, "b": 1, "c": 2}
    runner = ModelRunner(model, num_blocks=10, block_size=BS, device="cpu")

    # step 1: prefill a[:6] and the first chunk b[:9]
    got = runner.run([seq["a"][:6], seq["b"][:9]], [tables["a"], tables["b"]], [0, 0], seq_ids=[0, 1])
    assert_close(got, torch.stack([plain(model, seq["a"][:6])[-1], plain(model, seq["b"][:9])[-1]]))

    # step 2: a decodes one token, b prefills its last chunk, c prefills from scratch (rows of 1, 3, 5)
    rows = [("a", 6, 7), ("b", 9, 12), ("c", 0, 5)]
    got = runner.run([seq[r][s:e] for r, s, e in rows], [tables[r] for r, _, _ in rows], [s for _, s, _ in rows],
                     all_positions=True, seq_ids=[ids[r] for r, _, _ in rows])
    assert got.shape == (3, 5, model.cfg.vocab_size)
    for i, (r, s, e) in enumerate(rows):
        assert_close(got[i, : e - s], plain(model, seq[r][:e])[s:e])


def test_copied_block_serves_a_forked_sequence():
    """Copy-on-write: a fork shares a's full block and gets a copy of its half-full last block;
    parent and fork then decode different tokens into their own blocks."""
    model = tiny_model(ALL["llama3"])
    a = sequences(model.cfg.vocab_size)["a"][:6]
    runner = ModelRunner(model, num_blocks=6, block_size=BS, device="cpu")
    runner.run([a], [[5, 2]], [0])
    got = runner.run([[11], [13]], [[5, 2], [5, 4]], [6, 6], copies=[(2, 4)])
    assert_close(got, torch.stack([plain(model, a + [11])[-1], plain(model, a + [13])[-1]]))


def test_fresh_runner_without_the_copy_sees_other_keys():
    """The copy above matters: without it the fork reads an empty block and its logits differ."""
    model = tiny_model(ALL["llama3"])
    a = sequences(model.cfg.vocab_size)["a"][:6]
    runner = ModelRunner(model, num_blocks=6, block_size=BS, device="cpu")
    runner.run([a], [[5, 2]], [0])
    got = runner.run([[13]], [[5, 4]], [6])
    assert (got[0] - plain(model, a + [13])[-1]).abs().max().item() > 1e-3


def test_recurrent_state_restarts_at_position_zero_and_forks():
    model = tiny_model(ALL["linear_attention"])
    a = sequences(model.cfg.vocab_size)["a"]
    runner = ModelRunner(model, num_blocks=6, block_size=BS, device="cpu")
    runner.run([a[:5]], [[0, 1]], [0], seq_ids=[7])
    runner.fork_state(7, 8)
    got = runner.run([a[5:6], [3]], [[0, 1], [2, 3]], [5, 5], seq_ids=[7, 8])  # parent and fork diverge
    assert_close(got, torch.stack([plain(model, a[:6])[-1], plain(model, a[:5] + [3])[-1]]))
    # recompute after preemption: seq 7 starts over at position 0 and must not reuse its old state
    assert_close(runner.run([a[:4]], [[0, 1]], [0], seq_ids=[7])[0], plain(model, a[:4])[-1])
    runner.drop_state(7)
    assert 7 not in runner.states and 8 in runner.states
