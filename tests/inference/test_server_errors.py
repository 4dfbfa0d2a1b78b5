"""Bad requests get the OpenAI error shape with a 4xx status, never a 500."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference import server
from inference.async_engine import AsyncEngine
from tests.inference import test_server_helpers as H

MODEL = "tiny"
GOOD_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0}
GOOD_COMPLETION = {"model": MODEL, "prompt": "Once upon", "max_tokens": 4}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return H.load_tokenizer(H.train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def serve(tok, api_key=None, max_concurrent=64, step_delay=0.002, max_body_bytes=20_000):
    engine = H.slow_down(H.tiny_engine(tok, 128), step_delay)
    settings_ = server.ServerSettings(model_name=MODEL, max_model_len=128, api_key=api_key, max_tokens_cap=64, n_cap=4, max_body_bytes=max_body_bytes)
    return H.LiveServer(server.build_app(AsyncEngine(engine, max_concurrent=max_concurrent), tok, settings_))


@pytest.fixture(scope="module")
def url(tok):
    with serve(tok) as url:
        yield url


def with_(base: dict, **changes) -> dict:
    body = dict(base)
    for k, v in changes.items():
        if v is ...:
            body.pop(k, None)
        else:
            body[k] = v
    return body


BAD_CHAT = {
    "missing model": with_(GOOD_CHAT, model=...),
    "model not a string": with_(GOOD_CHAT, model=5),
    "missing messages": with_(GOOD_CHAT, messages=...),
    "empty messages": with_(GOOD_CHAT, messages=[]),
    "messages not a list": with_(GOOD_CHAT, messages="hi"),
    "message not an object": with_(GOOD_CHAT, messages=["hi"]),
    "unknown role": with_(GOOD_CHAT, messages=[{"role": "wizard", "content": "hi"}]),
    "content a number": with_(GOOD_CHAT, messages=[{"role": "user", "content": 7}]),
    "image part": with_(GOOD_CHAT, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
    "temperature a string": with_(GOOD_CHAT, temperature="hot"),
    "temperature too high": with_(GOOD_CHAT, temperature=3.5),
    "top_p zero": with_(GOOD_CHAT, top_p=0),
    "max_tokens a string": with_(GOOD_CHAT, max_tokens="5"),
    "max_tokens zero": with_(GOOD_CHAT, max_tokens=0),
    "max_tokens float": with_(GOOD_CHAT, max_tokens=4.5),
    "max_tokens over cap": with_(GOOD_CHAT, max_tokens=65),
    "max_completion_tokens over cap": with_(GOOD_CHAT, max_completion_tokens=1000),
    "huge max_tokens": with_(GOOD_CHAT, max_tokens=10**30),
    "n over cap": with_(GOOD_CHAT, n=5),
    "n bool": with_(GOOD_CHAT, n=True),
    "n negative": with_(GOOD_CHAT, n=-1),
    "stop a number": with_(GOOD_CHAT, stop=5),
    "stop list of numbers": with_(GOOD_CHAT, stop=[1, 2]),
    "seed float": with_(GOOD_CHAT, seed=1.5),
    "seed too big": with_(GOOD_CHAT, seed=2**70),
    "presence_penalty out of range": with_(GOOD_CHAT, presence_penalty=9),
    "stream a string": with_(GOOD_CHAT, stream="yes"),
    "logprobs a string": with_(GOOD_CHAT, logprobs="yes"),
    "top_logprobs without logprobs": with_(GOOD_CHAT, top_logprobs=2),
    "top_logprobs too many": with_(GOOD_CHAT, logprobs=True, top_logprobs=50),
    "prompt over the context": with_(GOOD_CHAT, messages=[{"role": "user", "content": "hello " * 200}]),
    "prompt + max_tokens over the context": with_(GOOD_CHAT, max_tokens=64, messages=[{"role": "user", "content": "hello " * 60}]),
    "stream_options a list": with_(GOOD_CHAT, stream_options=[1]),
}
BAD_COMPLETION = {
    "empty prompt": with_(GOOD_COMPLETION, prompt=""),
    "empty token list": with_(GOOD_COMPLETION, prompt=[]),
    "empty inner token list": with_(GOOD_COMPLETION, prompt=[[]]),
    "token id out of range": with_(GOOD_COMPLETION, prompt=[1, 2, 10**9]),
    "negative token id": with_(GOOD_COMPLETION, prompt=[-1]),
    "mixed prompt list": with_(GOOD_COMPLETION, prompt=[1, "a"]),
    "prompt a dict": with_(GOOD_COMPLETION, prompt={"text": "a"}),
    "suffix": with_(GOOD_COMPLETION, suffix="the end"),
    "logprobs bool": with_(GOOD_COMPLETION, logprobs=True),
    "max_tokens negative": with_(GOOD_COMPLETION, max_tokens=-1),
    "max_tokens 0 with n 2": with_(GOOD_COMPLETION, max_tokens=0, n=2),
    "stop_token_ids out of range": with_(GOOD_COMPLETION, stop_token_ids=[10**6]),
    "stop_token_ids negative": with_(GOOD_COMPLETION, stop_token_ids=[-1]),
    "stop_token_ids a string": with_(GOOD_COMPLETION, stop_token_ids="3"),
    "prompt fills the context, max_tokens 1": with_(GOOD_COMPLETION, prompt=[5] * 128, max_tokens=1),
}
BAD_TOKENIZE = {
    "neither prompt nor messages": {},
    "both prompt and messages": {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]},
    "prompt a number": {"prompt": 5},
    "unknown model": {"model": "gpt-9", "prompt": "hi"},
    "bad role": {"messages": [{"role": "wizard", "content": "hi"}]},
}
BAD_DETOKENIZE = {
    "no tokens": {},
    "token out of range": {"tokens": [1, 10**6]},
    "negative token": {"tokens": [-3]},
    "tokens a string": {"tokens": "1 2"},
}


@pytest.mark.parametrize("name", sorted(BAD_CHAT))
def test_bad_chat_request_is_400(url, name):
    H.assert_error_shape(httpx.post(url + "/v1/chat/completions", json=BAD_CHAT[name]), 400)


@pytest.mark.parametrize("name", sorted(BAD_COMPLETION))
def test_bad_completion_request_is_400(url, name):
    H.assert_error_shape(httpx.post(url + "/v1/completions", json=BAD_COMPLETION[name]), 400)


@pytest.mark.parametrize("route, name", [("tokenize", n) for n in sorted(BAD_TOKENIZE)] + [("detokenize", n) for n in sorted(BAD_DETOKENIZE)])
def test_bad_tokenize_request_is_4xx(url, route, name):
    body = (BAD_TOKENIZE if route == "tokenize" else BAD_DETOKENIZE)[name]
    H.assert_error_shape(httpx.post(f"{url}/{route}", json=body), 404 if name == "unknown model" else 400)


@pytest.mark.parametrize("raw", [b"{", b"", b"[1, 2]", b"null", b'"text"', b"\xff\xfe{}", b"[" * 100_00 + b"]" * 100_00,
                                 b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
                                 b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1e999}',
])
def test_malformed_body_is_400(url, raw):
    r = httpx.post(url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    H.assert_error_shape(r, 400)


@pytest.mark.parametrize("endpoint, body", [
    ("chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "lone \\ud800 surrogate"}]}'),
    ("completions", b'{"model": "tiny", "prompt": "lone \\udc00 surrogate"}'),
])
def test_lone_surrogate_is_400(url, endpoint, body):
    """Valid JSON (an escaped lone surrogate) that is not valid Unicode text."""
    H.assert_error_shape(httpx.post(f"{url}/v1/{endpoint}", content=body, headers={"content-type": "application/json"}), 400)


def test_unknown_model_route_and_method(url):
    err = H.assert_error_shape(httpx.post(url + "/v1/chat/completions", json=with_(GOOD_CHAT, model="gpt-9")), 404)
    assert err["param"] == "model" and err["code"] == "model_not_found"
    H.assert_error_shape(httpx.get(url + "/v1/models/gpt-9"), 404)
    H.assert_error_shape(httpx.get(url + "/v1/nothing"), 404)
    H.assert_error_shape(httpx.get(url + "/v1/chat/completions"), 405)
    assert httpx.post(url + "/v1/chat/completions", json=GOOD_CHAT).status_code == 200  # still fine afterwards


def test_oversized_body_is_413(url):
    big = with_(GOOD_CHAT, messages=[{"role": "user", "content": "x" * 30_000}])
    H.assert_error_shape(httpx.post(url + "/v1/chat/completions", json=big), 413)

    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"x" * 1000
        yield b'"}]}'

    H.assert_error_shape(httpx.post(url + "/v1/chat/completions", content=chunks()), 413)


def test_api_key(tok):
    with serve(tok, api_key="s3cret") as url:
        assert httpx.get(url + "/health").status_code == 200  # health stays open
        assert httpx.get(url + "/").status_code == 200  # so does the page (it asks for the key)
        H.assert_error_shape(httpx.get(url + "/v1/models"), 401)
        H.assert_error_shape(httpx.post(url + "/v1/chat/completions", json=GOOD_CHAT, headers={"Authorization": "Bearer wrong"}), 401)
        H.assert_error_shape(httpx.post(url + "/v1/chat/completions", json=GOOD_CHAT, headers={"Authorization": "s3cret"}), 401)
        ok = httpx.post(url + "/v1/chat/completions", json=GOOD_CHAT, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None

def test_overloaded_is_503_and_recovers(tok):
    async def scenario(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            slow = with_(GOOD_CHAT, max_tokens=60, ignore_eos=True)
            running = [asyncio.create_task(client.post("/v1/chat/completions", json=slow)) for _ in range(2)]
            await asyncio.sleep(0.3)  # both admitted and generating
            busy = await client.post("/v1/chat/completions", json=GOOD_CHAT)
            err = H.assert_error_shape(busy, 503)
            assert err["code"] == "overloaded"
            assert all(r.status_code == 200 for r in await asyncio.gather(*running))
            assert (await client.post("/v1/chat/completions", json=GOOD_CHAT)).status_code == 200

    with serve(tok, max_concurrent=2, step_delay=0.02) as url:
        asyncio.run(scenario(url))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
FIELDS = ["model", "messages", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "logprobs",
          "top_logprobs", "presence_penalty", "frequency_penalty", "max_completion_tokens", "stream_options", "prompt",
          # added with tool calling, structured output and the eval-backend fields
          "tools", "tool_choice", "response_format", "logit_bias", "stop_token_ids", "echo", "parallel_tool_calls",
          "repetition_penalty", "ignore_eos", "suffix", "user"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=json_values, endpoint=st.sampled_from(["chat/completions", "completions"]))
def test_fuzzed_fields_never_500(url, field, value, endpoint):
    base = GOOD_CHAT if endpoint == "chat/completions" else GOOD_COMPLETION
    r = httpx.post(f"{url}/v1/{endpoint}", content=json.dumps(with_(base, **{field: value})),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code in (200, 400, 404), (field, value, r.status_code, r.text)
    if r.status_code != 200:
        H.assert_error_shape(r, r.status_code)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_fuzzed_bytes_never_500(url, raw):
    r = httpx.post(url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, (raw, r.status_code, r.text)


# Shaped like the real thing, so the fuzz reaches the tool-call and grammar code past validation.
schemas = st.recursive(
    st.fixed_dictionaries({"type": st.sampled_from(["string", "integer", "number", "boolean", "null", "nope"])})
    | json_values,
    lambda children: st.fixed_dictionaries({"type": st.just("object"), "properties": st.dictionaries(st.text(max_size=6), children, max_size=3)},
                                           optional={"required": st.lists(st.text(max_size=6), max_size=3)})
    | st.fixed_dictionaries({"type": st.just("array"), "items": children}, optional={"maxItems": st.integers(-2, 5)}),
    max_leaves=6,
)
tool = st.fixed_dictionaries({"type": st.sampled_from(["function", "other"]),
                              "function": st.fixed_dictionaries({"name": st.text(max_size=10)}, optional={"parameters": schemas})})
tool_choice = st.sampled_from(["auto", "none", "required", "bogus"]) | st.fixed_dictionaries(
    {"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.text(max_size=10)})})
response_format = st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "xml"])},
                                        optional={"json_schema": st.fixed_dictionaries({"name": st.text(max_size=8)}, optional={"schema": schemas, "strict": st.booleans()})})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tools=st.none() | st.lists(tool, max_size=3), choice=st.none() | tool_choice, fmt=st.none() | response_format,
       stream=st.booleans())
def test_fuzzed_tools_and_formats_never_500(url, tools, choice, fmt, stream):
    body = with_(GOOD_CHAT, tools=tools, tool_choice=choice, response_format=fmt, stream=stream)
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code in (200, 400), (body, r.status_code, r.text)
    if r.status_code != 200:
        H.assert_error_shape(r, 400)
    elif stream:
        assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
