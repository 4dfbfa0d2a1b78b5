import math

import torch
import torch.nn.functional as F

from align.logprobs import masked_mean, masked_sum, sequence_logprobs


def test_hand_values():
    # Row 0 position 0: logits [0, ln 2, 0] -> softmax [1/4, 1/2, 1/4]; target 1 -> ln(1/2).
    # Row 0 position 1: uniform logits -> ln(1/3) whatever the target.
    logits = torch.tensor([[[0.0, math.log(2.0), 0.0], [5.0, 5.0, 5.0]]])
    targets = torch.tensor([[1, 2]])
    logp = sequence_logprobs(logits, targets, torch.ones(1, 2))
    torch.testing.assert_close(logp, torch.tensor([[math.log(0.5), math.log(1 / 3)]]))


def test_matches_cross_entropy_chunked_and_masked():
    torch.manual_seed(0)
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :2] = False  # prompt
    mask[2, 5:] = False  # padding
    targets_ignored = targets.masked_fill(~mask, -100)  # ignore index in masked slots must be fine
    reference = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T)
    reference = reference.masked_fill(~mask, 0.0)
    for chunk in (None, 1, 3, 100):
        logp = sequence_logprobs(logits, targets_ignored, mask, chunk_size=chunk)
        assert logp.dtype == torch.float32  # computed in float32 by design
        torch.testing.assert_close(logp.double(), reference, atol=1e-5, rtol=0)
        assert torch.all(logp[~mask] == 0)


def test_bf16_logits_scored_in_float32():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 50).bfloat16()
    targets = torch.randint(0, 50, (2, 5))
    reference = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(sequence_logprobs(logits, targets), reference, atol=1e-6, rtol=0)


def test_gradient_flows_through_chunks():
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 6, requires_grad=True)
    targets = torch.randint(0, 6, (2, 4))
    sequence_logprobs(logits, targets, chunk_size=1).sum().backward()
    # d/dz sum log softmax(z)[y] = onehot(y) - softmax(z)
    expected = F.one_hot(targets, 6).float() - torch.softmax(logits.detach(), -1)
    torch.testing.assert_close(logits.grad, expected)


def test_masked_sum_and_mean():
    x = torch.tensor([[1.0, 2.0, float("inf")], [4.0, float("nan"), 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    torch.testing.assert_close(masked_sum(x, mask, dim=1), torch.tensor([3.0, 10.0]))
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 5.0]))
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor(13.0 / 4))
    empty = torch.zeros_like(mask)
    assert masked_mean(x, empty).item() == 0.0
    assert torch.equal(masked_mean(x, empty, dim=1), torch.zeros(2))
