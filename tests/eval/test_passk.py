"""pass@k against brute-force enumeration of k-subsets and the closed-form binomial."""
import itertools
import math

import numpy as np
import pytest

from eval.passk import mean_pass_at_k, pass_at_k


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of k-subsets of n samples (first c correct) holding >= 1 correct."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_matches_brute_force_on_all_small_cases():
    cases = [(n, c, k) for n in range(1, 9) for c in range(n + 1) for k in range(1, n + 1)]
    for k in range(1, 9):
        ks = [(n, c) for n, c, kk in cases if kk == k]
        n = np.array([x[0] for x in ks])
        c = np.array([x[1] for x in ks])
        got = pass_at_k(n, c, k)  # vectorised over problems with different n and c
        want = np.array([brute_force_pass_at_k(nn, cc, k) for nn, cc in ks])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_large_n_matches_exact_binomial_and_is_finite():
    n, k = 200, 100
    c = np.array([0, 1, 7, 50, 100, 101, 200])
    got = pass_at_k(n, c, k)
    want = [1 - math.comb(n - cc, k) / math.comb(n, k) for cc in c.tolist()]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_pass_at_1_is_fraction_correct():
    np.testing.assert_allclose(pass_at_k(10, [0, 3, 10], 1), [0.0, 0.3, 1.0])


def test_mean_skips_k_above_n_and_rejects_bad_input():
    res = mean_pass_at_k(5, [1, 5], [1, 2, 10])
    assert set(res) == {"pass@1", "pass@2"}
    assert res["pass@1"] == pytest.approx((0.2 + 1.0) / 2)
    assert res["pass@2"] == pytest.approx((brute_force_pass_at_k(5, 1, 2) + 1.0) / 2)
    with pytest.raises(ValueError):
        pass_at_k(3, [4], 1)
    with pytest.raises(ValueError):
        pass_at_k(3, [1], 4)
