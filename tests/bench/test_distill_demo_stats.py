"""bench/bench_distill_demo.py's statistics against scipy: the exact McNemar test is a two-sided
binomial test on the discordant pairs, and the Wilson interval is scipy's."""
import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("bench_distill_demo", Path(__file__).resolve().parents[2] / "bench/bench_distill_demo.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.mark.parametrize("b,c", [(34, 22), (139, 121), (5, 0), (0, 0), (10, 10), (1, 30)])
def test_mcnemar_exact_is_scipys_binomial_test(b, c):
    stats = pytest.importorskip("scipy.stats")
    expected = stats.binomtest(min(b, c), b + c, 0.5).pvalue if b + c else 1.0
    assert bench.mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("k,n", [(309, 1000), (0, 50), (50, 50), (53, 200)])
def test_wilson_interval_is_scipys(k, n):
    stats = pytest.importorskip("scipy.stats")
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert bench.wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_paired_pools_seeds_run_by_run():
    """Run i of an arm meets run i of SFT alone (same seed), and the seeds' pairs add up."""
    arm = [[True, True, False, False], [True, False, False, True]]
    sft = [[True, False, True, False], [False, False, True, True]]
    assert bench.paired(arm[:1], sft[:1]) == (1, 1)
    assert bench.paired(arm[1:], sft[1:]) == (1, 1)
    assert bench.paired(arm, sft) == (2, 2)
    assert bench.paired(arm, [sft[1], sft[0]]) != bench.paired(arm, sft)  # pairs follow the order of the runs


def test_sign_flip_p():
    assert bench.sign_flip_p([1.0, 2.0, 3.0]) == 2 / 8  # only all-plus and all-minus reach |6|
    assert bench.sign_flip_p([1.0, -1.0]) == 1.0
    # 3s1 - s2 + s3 for the signs +++, ++-, +-+, +--: 3, 1, 5, 3 (and mirrored): 6 of 8 reach |3|
    assert bench.sign_flip_p([3.0, -1.0, 1.0]) == 6 / 8
