"""Low-precision serving: weight formats and the bf16 KV cache through the engine, the serving
settings, and the quality each format keeps on a trained model (perplexity, greedy agreement)."""
import math
import random

import pytest
import torch

from inference.engine import LLMEngine
from inference.sampling_params import SamplingParams
from inference.server import parse_serve_args
from model import ModelConfig, Transformer
from model.weight_formats import Int4Linear, Int8Linear, apply_weight_format
from utils.errors import UserError

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)).eval()


def test_bf16_kv_cache_stores_half_and_reads_back_in_the_model_dtype():
    model = _model()
    prompts = [torch.randint(0, 128, (n,)).tolist() for n in (5, 19, 33)]
    full = LLMEngine(model, block_size=8)
    half = LLMEngine(model, block_size=8, kv_cache_dtype=torch.bfloat16)
    runs = {}
    for name, engine in (("full", full), ("half", half)):
        runs[name] = engine.generate(prompts, GREEDY)
    pools = [p for ps in half.runner.cache.pools.values() for p in ps]
    assert pools and all(p.dtype == torch.bfloat16 for p in pools)
    assert half.runner.cache.nbytes() * 2 == full.runner.cache.nbytes()
    agree = sum(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(runs["full"], runs["half"]))
    assert agree >= 2  # bf16 keys move a near-tie now and then; logits are checked exactly below
    # the same step's logits through both caches: bf16 rounding of k/v only (~2^-8 relative)
    toks = [prompts[0]]
    a = full.runner.run(toks, [list(range(5))], [0])
    b = half.runner.run(toks, [list(range(5))], [0])
    assert (a - b).abs().max() <= 0.02 * a.abs().max()


def test_serving_settings_take_the_formats_and_refuse_bad_ones(tmp_path):
    (tmp_path / "ckpt").mkdir()
    r = parse_serve_args(["--checkpoint", str(tmp_path / "ckpt"), "--weights", "int4", "--group-size", "64",
                          "--kv-cache-dtype", "bf16"])
    assert (r.weights, r.group_size, r.kv_cache_dtype) == ("int4", 64, "bf16")
    with pytest.raises(UserError, match="32, 64, 128, 256"):
        parse_serve_args(["--checkpoint", "x", "--weights", "int4", "--group-size", "100"])
    with pytest.raises(UserError, match="'int8'"):
        parse_serve_args(["--checkpoint", "x", "--weights", "int5"])


def test_load_serving_builds_a_quantized_engine(tmp_path):
    from inference.serve_recipe import ChatRecipe, load_serving
    from utils.checkpoint import save_checkpoint

    tok = tmp_path / "tok.json"
    _tokenizer(["a story about a cat and a dog"] * 20, 300).save(str(tok))
    ckpt = save_checkpoint(tmp_path / "ckpt", Transformer(ModelConfig(vocab_size=300, d_model=64, n_layers=1, n_heads=2,
                                                                     max_seq_len=64)), tokenizer_path=tok)
    engine, _ = load_serving(ChatRecipe(checkpoint=str(ckpt), device="cpu", weights="int8", kv_cache_dtype="bf16"))
    assert isinstance(engine.model.lm_head, Int8Linear) and engine.kv_cache_dtype == torch.bfloat16
    assert len(engine.generate([[5, 6, 7]], GREEDY)[0].outputs[0].token_ids) == 16
    with pytest.raises(UserError, match="group_size=128"):  # 64-wide layers
        load_serving(ChatRecipe(checkpoint=str(ckpt), device="cpu", weights="int4"))


# ----------------------------------------------------------------------------- quality on a trained model


def _tokenizer(texts, vocab):
    from data_pipeline.tokenizer.train_tokenizer import train_hf

    return train_hf(texts, vocab, show_progress=False)


@pytest.fixture(scope="module")
def trained():
    """A 0.9M-parameter model trained for 150 steps on the synthetic stories, and held-out token ids."""
    from data_pipeline.synthetic.stories import generate_story

    rng = random.Random(0)
    texts = [generate_story(rng)[0] for _ in range(1200)]
    tok = _tokenizer(texts[:1000], 512)
    ids = [t for s in texts[:1100] for t in tok.encode(s).ids + [1]]
    held = [tok.encode(s).ids for s in texts[1100:]]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.tensor(ids)
    g = torch.Generator().manual_seed(0)
    for step in range(150):
        starts = torch.randint(0, len(data) - 65, (16,), generator=g)
        batch = torch.stack([data[s : s + 65] for s in starts])
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), held


def _scores(model, docs, ref_top1=None) -> tuple[float, list[torch.Tensor], float]:
    """Perplexity over ``docs``, each position's argmax, and the share of positions whose argmax
    equals ``ref_top1``'s (teacher-forced top-1 agreement; 1.0 without a reference)."""
    nll, n, top1, same = 0.0, 0, [], 0
    with torch.inference_mode():
        for i, d in enumerate(docs):
            x = torch.tensor([d[:128]])
            logp = model(x[:, :-1]).float().log_softmax(-1)
            nll -= logp.gather(-1, x[:, 1:, None]).sum().item()
            n += x.shape[1] - 1
            top1.append(logp.argmax(-1))
            same += int((top1[-1] == ref_top1[i]).sum()) if ref_top1 else top1[-1].numel()
    return math.exp(nll / n), top1, same / n


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _quantized(model, fmt):
    import copy

    return apply_weight_format(copy.deepcopy(model), fmt, group_size=32)


@pytest.mark.slow
def test_quality_bounds_on_a_trained_model(trained):
    """Per format, on held-out stories: the perplexity increase (int8 <= 1%, int4 <= 5%), the share
    of positions whose next-token argmax matches the full model's, and greedy agreement with the
    full model on 32 prompts through the engine (tokens before the first difference)."""
    model, held = trained
    base, ref_top1, _ = _scores(model, held)
    assert base < 20  # the model learned the stories (a uniform guess is 512)
    prompts = [d[:8] for d in held[:32]]
    ref = [c.outputs[0].token_ids for c in LLMEngine(model).generate(prompts, GREEDY)]
    # (max perplexity increase, min top-1 agreement, min greedy agreement)
    bounds = {"bf16": (0.01, 0.97, 0.6), "int8": (0.01, 0.97, 0.6), "int4": (0.05, 0.9, 0.3)}
    measured = {}
    for fmt in bounds:
        q = _quantized(model, fmt)
        ppl, _, top1 = _scores(q, held, ref_top1)
        outs = [c.outputs[0].token_ids for c in LLMEngine(q).generate(prompts, GREEDY)]
        greedy = sum(_common_prefix(o, r) for o, r in zip(outs, ref)) / sum(map(len, ref))
        measured[fmt] = ppl / base - 1, top1, greedy
        print(f"{fmt}: perplexity {base:.3f} -> {ppl:.3f} ({ppl / base - 1:+.2%}), top-1 agreement {top1:.1%}, "
              f"greedy tokens before the first difference {greedy:.1%}")
    for fmt, (max_increase, min_top1, min_greedy) in bounds.items():
        increase, top1, greedy = measured[fmt]
        assert increase <= max_increase and top1 >= min_top1 and greedy >= min_greedy, (fmt, measured[fmt])
    assert isinstance(_quantized(model, "int4").layers[0].ffn.up_proj, Int4Linear)
