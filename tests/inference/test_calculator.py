"""The calculator tool: safe arithmetic, the watcher's token surgery, and the engine feeding a
result back so the model continues from the right number."""
from __future__ import annotations

import pytest

from inference.calculator import CalculatorWatcher, evaluate, format_number
from inference.engine import LLMEngine
from inference.sampling_params import SamplingParams
from tests.inference import test_server_helpers as H
from utils.errors import UserError


@pytest.mark.parametrize("expr, value", [("3+3", 6), ("48/2", 24), ("1,200*3", 3600), ("$5*4", 20), ("(2+3)*4-1", 19),
                                         ("7//2", 3), ("2**10", 1024), ("-4+10", 6), ("5/2", 2.5), ("3 x 4", 12)])
def test_evaluate_arithmetic(expr, value):
    assert evaluate(expr) == value


@pytest.mark.parametrize("expr", ["", "apples", "__import__('os')", "1/0", "9**9**9", "10**100", "a+1",
                                  "[1]*3", "1e400", "open('x')", "1" * 200])
def test_evaluate_refuses_what_is_not_small_arithmetic(expr):
    assert evaluate(expr) is None


def test_format_number():
    assert [format_number(v) for v in (6.0, 2.5, 1 / 3, -4.0, 1e6)] == ["6", "2.5", "0.3333", "-4", "1000000"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return H.load_tokenizer(H.train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def feed(tok, text: str) -> tuple[str, int]:
    """Run the watcher over ``text``'s tokens as if sampled one by one, until it answers a call;
    (the text that results, calls answered)."""
    watcher, out = CalculatorWatcher(tok), []
    for t in tok.encode(text):
        out += watcher.after(t)
        if watcher.calls:
            break
    return tok.decode(out), watcher.calls


def test_watcher_replaces_the_models_result_with_the_computed_one(tok):
    text, calls = feed(tok, "He has <<6+6=14")  # the model would have written 14
    assert text == "He has <<6+6=12>>" and calls == 1


def test_watcher_leaves_other_text_alone(tok):
    for text in ("no calls here = 3 < 4 > 2", "a <<note>> then = sign", "<<apples=3>> kept"):
        out, calls = feed(tok, text)
        assert out == text and calls == 0


def test_engine_feeds_results_back(tok):
    """A random model writes whatever it likes; a prompt that ends inside a call makes its very
    next '=' (forced through logit_bias) the calculator's cue."""
    engine = LLMEngine(H.tiny_model(tok.vocab_size, 256), tokenizer=tok, max_num_seqs=4)
    prompt = tok.encode("Tom has 3 apples and buys 4. <<3+4")
    eq = tok.encode("=")
    assert len(eq) == 1
    base = dict(max_tokens=6, temperature=0, logit_bias={eq[0]: 100}, ignore_eos=True)
    off = engine.generate([prompt], SamplingParams(**base))[0].outputs[0]
    on = engine.generate([prompt], SamplingParams(**base, calculator=True))[0].outputs[0]
    assert tok.decode(off.token_ids).startswith("=") and not tok.decode(off.token_ids).startswith("=7>>")
    assert tok.decode(on.token_ids).startswith("=7>>"), tok.decode(on.token_ids)
    assert len(on.token_ids) == 6  # forced tokens count toward max_tokens


def test_calculator_refuses_combinations_it_cannot_honour(tok):
    engine = LLMEngine(H.tiny_model(tok.vocab_size, 256), tokenizer=tok)
    with pytest.raises(UserError, match="calculator"):
        engine.add_request([1, 2], SamplingParams(calculator=True, logprobs=True))
    bare = LLMEngine(H.tiny_model(tok.vocab_size, 256))
    with pytest.raises(UserError, match="tokenizer"):
        bare.add_request([1, 2], SamplingParams(calculator=True))


def test_server_extension_field(tok):
    from inference import server
    from inference.async_engine import AsyncEngine

    settings = server.ServerSettings(model_name="tiny", max_model_len=256, max_tokens_cap=16, n_cap=1)
    app = server.build_app(AsyncEngine(H.tiny_engine(tok, 256)), tok, settings)
    eq = tok.encode("=")[0]
    body = {"model": "tiny", "prompt": "Tom has <<3+4", "max_tokens": 5, "temperature": 0, "logit_bias": {str(eq): 100}}
    import httpx

    with H.LiveServer(app) as url:
        off = httpx.post(url + "/v1/completions", json=body).json()["choices"][0]["text"]
        on = httpx.post(url + "/v1/completions", json={**body, "calculator": True}).json()["choices"][0]["text"]
        bad = httpx.post(url + "/v1/completions", json={**body, "calculator": True, "logprobs": 1})
    assert on.startswith("=7>>") and not off.startswith("=7>>"), (on, off)
    assert H.assert_error_shape(bad, 400)
