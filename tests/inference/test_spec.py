"""Speculative decoding: the acceptance rule leaves the target distribution unchanged
(statistical tests on a tiny vocabulary), and greedy output is identical to plain decoding."""
import pytest
import torch

from inference import sampler
from inference.engine import LLMEngine
from inference.sampling_params import SamplingParams
from inference.speculative import verify
from model import ModelConfig, Transformer
from tests.inference.test_engine import CONFIGS, greedy, greedy_reference, make_prompts, one_thread, tiny_model  # noqa: F401

CHI2_001 = {1: 10.83, 3: 16.27, 4: 18.47, 5: 20.52, 7: 24.32}  # chi-square critical values at p = 0.001, by degrees of freedom


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = n * probs.double()
    return (((counts.double() - expected) ** 2) / expected).sum().item()


def num_accepted_probs(p: torch.Tensor, q: torch.Tensor, num_draft: int) -> torch.Tensor:
    """P(a = m) for m = 0..num_draft. Proposal i is accepted with probability
    beta_i = sum_x min(p_i(x), q_i(x)) (Leviathan et al.'s alpha), independently of the others here,
    so P(a >= m) = beta_0 * ... * beta_{m-1}."""
    beta = torch.minimum(p[:num_draft], q[:num_draft]).sum(-1)  # (num_draft,)
    at_least = torch.cat([torch.ones(1), beta.cumprod(0)])  # P(a >= m), m = 0..num_draft
    return at_least - torch.cat([at_least[1:], torch.zeros(1)])


def simulate(p, q, num_draft, n, seed=0):
    """n independent speculative steps with fixed per-position distributions.
    p (K+1, V), q (K, V). Returns emitted tokens (n, K+1) padded with -1."""
    g = torch.Generator().manual_seed(seed)
    K1, V = p.shape
    K = K1 - 1
    d = torch.stack([torch.multinomial(q[i], n, replacement=True, generator=g) for i in range(K)], 1)  # (n, K)
    u = torch.rand(n, K, generator=g)
    nd = torch.full((n,), num_draft)
    a, residual = verify(p.expand(n, -1, -1), q.expand(n, -1, -1), d, nd, u)
    last = sampler.sample_from_probs(residual, torch.empty(n, V).exponential_(generator=g))
    out = torch.full((n, K1), -1)
    for i in range(K1):
        out[:, i] = torch.where(a > i, d[:, min(i, K - 1)], torch.where(a == i, last, -1))
    return out


@pytest.mark.parametrize("num_draft", [3, 1])
def test_acceptance_rule_keeps_the_target_distribution(num_draft):
    torch.manual_seed(0)
    V, K = 5, 3
    p = torch.rand(K + 1, V) ** 2
    p = p / p.sum(-1, keepdim=True)
    q = torch.rand(K, V) ** 2
    q = q / q.sum(-1, keepdim=True)
    out = simulate(p, q, num_draft, 40000)
    # Position i's token (when one was emitted) is distributed as p_i, whatever came before.
    for i in range(num_draft + 1):
        toks = out[:, i][out[:, i] >= 0]
        assert len(toks) > 2000
        assert chi2(torch.bincount(toks, minlength=V), p[i]) < CHI2_001[V - 1], f"position {i}"
    # A row emits a + 1 tokens: it accepts at most the num_draft proposals it made, and the
    # number accepted, a, follows the acceptance probabilities.
    emitted = (out >= 0).sum(1)
    assert emitted.max() <= num_draft + 1
    counts = torch.bincount(emitted - 1, minlength=num_draft + 1)
    assert chi2(counts, num_accepted_probs(p, q, num_draft)) < CHI2_001[num_draft]


def test_rule_accepts_everything_when_draft_equals_target():
    torch.manual_seed(1)
    p = torch.rand(4, 6).softmax(-1)
    out = simulate(p, p[:3], 3, 2000)
    assert (out >= 0).all()  # k proposals + the bonus token every time


def test_greedy_rule_matches_argmax():
    V = 6
    p = torch.eye(V)[[2, 4, 1, 5]][None]  # target argmax 2, 4, 1, bonus 5
    q = torch.eye(V)[[2, 4, 3]][None]  # draft agrees twice, then proposes 3
    a, residual = verify(p, q, torch.tensor([[2, 4, 3]]), torch.tensor([3]), torch.full((1, 3), 0.5))
    assert a.item() == 2 and residual.argmax().item() == 1


@pytest.mark.parametrize("name", ["llama3", "gpt2", "deepseek_v3_mla_dense", "mistral"])
def test_speculative_greedy_equals_plain_greedy(name):
    cfg = CONFIGS[name]
    target = tiny_model(cfg)
    prompts = make_prompts(cfg.vocab_size)
    want = [greedy_reference(target, p, 10) for p in prompts]
    weak_draft = Transformer(cfg).eval()  # untrained: mostly rejected
    for draft in (weak_draft, target):  # and a perfect draft: everything accepted
        engine = LLMEngine(target, block_size=4, draft_model=draft, num_speculative_tokens=3)
        assert greedy(engine, prompts) == want
        assert engine.bm.num_free_blocks == engine.num_blocks
        assert engine.stats["spec_accepted"] > 0 or draft is weak_draft
    # the context end: proposals must stop before max_model_len (gpt2's learned positions end at 64)
    long = [list(range(1, 55))]
    engine = LLMEngine(target, block_size=4, draft_model=target, num_speculative_tokens=4)
    assert greedy(engine, long) == [greedy_reference(target, long[0], 10)]


def test_speculative_greedy_under_preemption_and_prefix_cache():
    cfg = CONFIGS["qwen3"]
    target, draft = tiny_model(cfg), tiny_model(cfg, seed=1)
    prompts = make_prompts(cfg.vocab_size)
    want = [greedy_reference(target, p, 10) for p in prompts]
    engine = LLMEngine(target, block_size=4, num_blocks=14, draft_model=draft, num_speculative_tokens=2)
    assert greedy(engine, prompts) == want
    assert greedy(engine, prompts) == want  # again, through the prefix cache
    assert engine.scheduler.num_preemptions > 0 and engine.bm.prefix_hit_tokens > 0
    assert engine.bm.num_free_blocks == engine.num_blocks


def test_speculative_sampling_distribution_through_the_engine():
    """Four sampled tokens (temperature 1, top-k 3) from the spec engine follow the target's exact
    joint distribution p(x1) p(x2|x1) p(x3|x1,x2) p(x4|...), with a draft that disagrees often.
    (x1 comes from the prefill; x2, x3 are proposed by the draft, x4 is the bonus or a resample.)"""
    V = 8
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=2, max_seq_len=16)
    torch.manual_seed(0)
    target, draft = Transformer(cfg).eval(), Transformer(cfg).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(40)
        draft.load_state_dict(target.state_dict())  # a related but different model
        draft.lm_head.weight.add_(torch.randn(draft.lm_head.weight.shape) * 0.8)
    prompt = [1, 2, 3]
    sp = dict(max_tokens=4, temperature=1.0, top_k=3)
    joint = torch.ones(1)
    with torch.no_grad():
        for level in range(4):  # extend every prefix of `level` tokens by one
            prefixes = torch.cartesian_prod(*[torch.arange(V)] * level).view(-1, level) if level else torch.zeros(1, 0, dtype=torch.long)
            idx = torch.cat([torch.tensor(prompt).expand(len(prefixes), -1), prefixes], 1)
            n = len(prefixes)
            probs = sampler.processed_logits(target(idx)[:, -1], [SamplingParams(**sp)] * n, [prompt] * n, prefixes.tolist()).softmax(-1)
            joint = (joint[:, None] * probs).flatten()  # (V ** (level + 1),)
    engine = LLMEngine(target, block_size=4, draft_model=draft, num_speculative_tokens=2, max_num_seqs=256)
    outs = engine.generate([prompt] * 16, [SamplingParams(**sp, n=200, seed=s) for s in range(16)])
    codes = torch.tensor([((c.token_ids[0] * V + c.token_ids[1]) * V + c.token_ids[2]) * V + c.token_ids[3] for o in outs for c in o.outputs])
    rate = engine.stats["spec_accepted"] / engine.stats["spec_proposed"]
    assert 0.1 < rate < 0.9, rate  # the draft is neither useless nor perfect
    counts = torch.bincount(codes, minlength=V**4).double()
    big = joint * len(codes) >= 5  # merge the rare cells into one
    c = torch.cat([counts[big], counts[~big].sum()[None]])
    e = torch.cat([joint[big], joint[~big].sum()[None]])
    dof = len(c) - 1
    critical = dof + 3.1 * (2 * dof) ** 0.5 + 4  # ~p = 0.001 for the chi-square tail
    assert chi2(c, e) < critical


def test_speculative_with_n_siblings_copy_on_write():
    cfg = CONFIGS["llama3"]
    target, draft = tiny_model(cfg), tiny_model(cfg, seed=1)
    prompt = make_prompts(cfg.vocab_size)[3]  # 33 tokens: the last block is shared, then copied
    engine = LLMEngine(target, block_size=4, draft_model=draft, num_speculative_tokens=3, enable_prefix_caching=False)
    out = engine.generate([prompt], SamplingParams(n=3, max_tokens=10, temperature=0.0))[0]
    assert [c.token_ids for c in out.outputs] == [greedy_reference(target, prompt, 10)] * 3
    assert engine.bm.num_free_blocks == engine.num_blocks
