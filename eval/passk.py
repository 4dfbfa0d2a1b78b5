"""Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

Sample n completions per problem, count the c that pass, then

    pass@k = E_problems[ 1 - C(n-c, k) / C(n, k) ]

the probability that at least one of k completions drawn without replacement
from the n passes. The binomials overflow for realistic n, so we use the
product form C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def pass_at_k(num_samples: Sequence[int] | np.ndarray | int,
              num_correct: Sequence[int] | np.ndarray,
              k: int) -> np.ndarray:
    """Per-problem unbiased pass@k.

    Args:
        num_samples: n per problem, shape (P,), or one int used for every problem.
        num_correct: c per problem, shape (P,), 0 <= c <= n.
        k: completions per attempt, 1 <= k.
    Returns:
        float64 array (P,) of pass@k estimates in [0, 1]. A problem with n < k
        cannot be estimated; it raises ValueError rather than returning a biased value.
    """
    c = np.asarray(num_correct, dtype=np.int64).reshape(-1)
    if isinstance(num_samples, (int, np.integer)):
        n = np.full_like(c, int(num_samples))
    else:
        n = np.asarray(num_samples, dtype=np.int64).reshape(-1)
    if n.shape != c.shape:
        raise ValueError(f"num_samples {n.shape} and num_correct {c.shape} differ in shape")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if np.any(c < 0) or np.any(c > n):
        raise ValueError("need 0 <= num_correct <= num_samples for every problem")
    if np.any(n < k):
        raise ValueError(f"pass@{k} needs at least {k} samples per problem; got min n = {n.min()}")

    # Vectorised product: row j holds i = n_j-c_j+1 .. n_j, padded with factor 1
    # beyond c_j entries. (P, max_c)
    offsets = np.arange(int(c.max()) if len(c) else 0, dtype=np.float64)[None, :]
    i = (n - c + 1)[:, None].astype(np.float64) + offsets
    factors = np.where(offsets < c[:, None], 1.0 - k / i, 1.0)
    # When n - c < k every k-subset holds a correct sample; the product would
    # reach 0 through the i == k factor too, but say it explicitly.
    return np.where(n - c < k, 1.0, 1.0 - np.prod(factors, axis=1))


def mean_pass_at_k(num_samples: Sequence[int] | np.ndarray | int,
                   num_correct: Sequence[int] | np.ndarray,
                   k_list: Sequence[int]) -> dict[str, float]:
    """Mean pass@k over problems for each k in k_list that every problem supports.

    Returns {"pass@1": 0.42, ...}; a k larger than the smallest n is skipped
    (as in the reference harness) instead of reported with too few samples.
    """
    c = np.asarray(num_correct).reshape(-1)
    if len(c) == 0:
        return {}
    n_min = int(num_samples) if isinstance(num_samples, (int, np.integer)) else int(np.min(num_samples))
    return {f"pass@{k}": float(pass_at_k(num_samples, c, k).mean())
            for k in k_list if k <= n_min}
