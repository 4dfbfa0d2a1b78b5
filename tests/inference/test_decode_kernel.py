"""The GPU decode path, checked on CPU: decode attention through the block table (the paged
kernel of model/kernels: its PyTorch reference here, the Triton kernel under TRITON_INTERPRET=1
in a subprocess) and the CUDA-graph runner's static buffers (run without capturing a graph)
give the engine's tokens."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from inference.engine import LLMEngine
from inference.sampling_params import SamplingParams
from model import ModelConfig, Transformer
from utils.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _model(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)
    return Transformer(ModelConfig(**{**cfg, **kw})).eval()


def _prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (n,), generator=g).tolist() for n in (3, 17, 9, 30, 1)]


def _tokens(engine, prompts=None):
    return [c.outputs[0].token_ids for c in engine.generate(prompts or _prompts(), GREEDY)]


@pytest.mark.parametrize("kv_dtype", [None, torch.bfloat16])
def test_paged_decode_path_gives_the_gather_paths_tokens(kv_dtype):
    model = _model()
    ref = _tokens(LLMEngine(model, block_size=4, decode_kernel=False, kv_cache_dtype=kv_dtype))
    engine = LLMEngine(model, block_size=4, decode_kernel=True, kv_cache_dtype=kv_dtype)
    calls = []
    original = engine.runner.cache.attend_decode
    engine.runner.cache.attend_decode = lambda *a: calls.append(1) or original(*a)
    assert _tokens(engine) == ref
    assert len(calls) >= 11 * 2  # every decode step of both layers went through the block table
    # and the logits of one decode step agree to float rounding (rows of different lengths)
    gather = LLMEngine(model, block_size=4, decode_kernel=False, kv_cache_dtype=kv_dtype)
    tables, prompts = [[0, 1, 2], [3, 4, 5, 6, 7, 8, 9, 10]], [[5] * 9, list(range(30))]
    for e in (engine, gather):
        e.runner.run(prompts, tables, [0, 0])
    kernel_logits, gather_logits = (e.runner.run([[7], [8]], tables, [9, 30]) for e in (engine, gather))
    torch.testing.assert_close(kernel_logits, gather_logits, atol=1e-5, rtol=1e-5)


def test_graph_runner_buffers_give_the_engines_tokens():
    model = _model()
    ref = _tokens(LLMEngine(model, block_size=4))
    for max_seqs, buckets in ((3, [2, 3]), (8, [8])):  # 5 prompts, 3 at a time / all 5 in a bucket of 8 (3 padding rows)
        engine = LLMEngine(model, block_size=4, max_num_seqs=max_seqs, cuda_graphs=True)
        assert _tokens(engine) == ref
        assert sorted(engine.runner.graphs.graphs) == buckets
    assert engine.runner.cache.num_blocks == engine.num_blocks + 1  # the padding rows' scratch block


def test_graphs_refuse_layers_the_kernel_does_not_serve():
    with pytest.raises(UserError, match="cuda_graphs"):
        LLMEngine(_model(sliding_window=8), cuda_graphs=True)
    assert _tokens(LLMEngine(_model(sliding_window=8), decode_kernel=True)) == _tokens(LLMEngine(_model(sliding_window=8)))


WORKER = """
import sys, torch
sys.path.insert(0, {root!r})
from model import kernels
from tests.inference.test_decode_kernel import LLMEngine, _model, _tokens
assert kernels.use_triton(torch.zeros(1))
model = _model(n_layers=1, d_model=32, n_heads=2, n_kv_heads=1)
prompts = [[5, 6, 7], [9] * 10]
ref = _tokens(LLMEngine(model, block_size=4, decode_kernel=False), prompts)
got = _tokens(LLMEngine(model, block_size=4, decode_kernel=True), prompts)
print("SAME" if got == ref else f"DIFF {{got}} {{ref}}")
"""


@pytest.mark.slow
def test_triton_kernel_in_the_engine_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", WORKER.format(root=str(ROOT))], env=env, capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert out.stdout.strip().endswith("SAME"), out.stdout + out.stderr
