"""Serving that agents use, through the official openai client: function calling (auto, required,
a named function, multi-turn with tool results, streaming), JSON mode and JSON schema (every reply
validates), logit_bias, null fields, and unsupported fields refused by name."""
from __future__ import annotations

import json
import random

import httpx
import jsonschema
import openai
import pydantic
import pytest

from inference import server
from inference.async_engine import AsyncEngine
from tests.inference import test_server_helpers as H

MODEL = "tiny"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                  "required": ["a", "b"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tok = H.load_tokenizer(H.train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json"))
    engine = H.tiny_engine(tok, 1536, max_num_seqs=8)
    settings = server.ServerSettings(model_name=MODEL, max_model_len=1536, max_tokens_cap=256, n_cap=4)
    with H.LiveServer(server.build_app(AsyncEngine(engine, max_concurrent=64), tok, settings)) as url:
        yield url, tok


@pytest.fixture()
def client(live):
    return openai.OpenAI(base_url=live[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def call_args(call, tool) -> dict:
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_required_and_named_tool_calls_are_forced(client, choice):
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, ADD], tool_choice=choice,
                                           temperature=1.0, seed=3, max_tokens=200, n=3)
    for c in reply.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None and len(c.message.tool_calls) == 1
        call = c.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        if isinstance(choice, dict):
            assert call.function.name == "add"
        call_args(call, WEATHER if call.function.name == "get_weather" else ADD)


def test_streamed_tool_call_arrives_whole_in_the_official_shape(client):
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                            temperature=0, max_tokens=200, stream=True)
    calls, reasons, content = [], [], ""
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            calls += c.delta.tool_calls or []
            reasons.append(c.finish_reason)
    assert content == "" and reasons[-1] == "tool_calls" and len(calls) == 1 and calls[0].index == 0
    whole = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           temperature=0, max_tokens=200)
    assert calls[0].function.name == whole.choices[0].message.tool_calls[0].function.name
    assert calls[0].function.arguments == whole.choices[0].message.tool_calls[0].function.arguments


def test_multi_turn_with_tool_results_and_auto(client, live):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           temperature=0, max_tokens=200)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp": 21, "unit": "C"})}]
    later = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], temperature=0, max_tokens=30)
    c = later.choices[0]
    assert c.finish_reason in ("stop", "length", "tool_calls")
    assert (c.message.content is not None) or c.message.tool_calls  # auto: text, or a call the model chose
    # the tool result and the call are in the prompt: it grew by both
    plain = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=1)
    assert later.usage.prompt_tokens > plain.usage.prompt_tokens + 20
    none = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=1)
    assert none.usage.prompt_tokens < plain.usage.prompt_tokens  # "none": the tools are not offered


def test_json_mode_and_the_official_structured_output_helper(client):
    reply = client.chat.completions.create(model=MODEL, messages=ASK, response_format={"type": "json_object"},
                                           temperature=1.0, seed=1, max_tokens=256, n=2)
    for c in reply.choices:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)

    class Weather(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=12)
        celsius: int
        sunny: bool

    parsed = client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Weather, temperature=0.7,
                                           seed=2, max_tokens=200)
    assert isinstance(parsed.choices[0].message.parsed, Weather)


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    kind = rng.choice(["string", "integer", "number", "boolean", "enum", "array", "object"] if depth < 2 else
                      ["string", "integer", "boolean", "enum"])
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 8)}
    if kind == "integer":
        return {"type": "integer", "minimum": -50, "maximum": rng.randint(0, 1000)}
    if kind == "number":
        return {"type": "number"}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2, None, True], rng.randint(1, 3))}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.randint(0, 3)}
    props = {f"k{i}": random_schema(rng, depth + 1) for i in range(rng.randint(1, 4))}
    return {"type": "object", "properties": props, "required": sorted(rng.sample(list(props), rng.randint(0, len(props)))),
            "additionalProperties": False}


@pytest.mark.slow
def test_hundreds_of_random_schemas_all_validate(live):
    rng = random.Random(0)
    url = live[0] + "/v1/chat/completions"
    checked = 0
    with httpx.Client(timeout=120) as http:
        for i in range(200):
            schema = {"type": "object", "properties": {"answer": random_schema(rng)}, "required": ["answer"],
                      "additionalProperties": False}
            body = {"model": MODEL, "messages": ASK, "temperature": 1.0, "seed": i, "max_tokens": 160,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}}
            r = http.post(url, json=body)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            if choice["finish_reason"] == "stop":  # a reply cut by max_tokens cannot be complete JSON
                jsonschema.validate(json.loads(choice["message"]["content"]), schema)
                checked += 1
    assert checked >= 150  # most finish inside the budget; every finished one validated


def test_logit_bias_nulls_and_unsupported_fields(client, live):
    tok = live[1]
    token = tok.encode(" cat")[0]
    r = client.chat.completions.create(model=MODEL, messages=ASK, logit_bias={str(token): 100}, max_tokens=5,
                                       temperature=1.0)
    assert r.usage.completion_tokens == 5 and r.choices[0].message.content == tok.decode([token] * 5)
    nulls = {k: None for k in ("temperature", "top_p", "n", "stream", "presence_penalty", "frequency_penalty", "logprobs",
                               "top_logprobs", "seed", "stop", "max_tokens", "logit_bias", "tools", "tool_choice",
                               "response_format", "stream_options", "user", "max_completion_tokens")}
    ok = httpx.post(live[0] + "/v1/chat/completions", json={"model": MODEL, "messages": ASK, **nulls})
    assert ok.status_code == 200, ok.text
    done = httpx.post(live[0] + "/v1/completions", json={"model": MODEL, "prompt": "hi", "echo": None, "suffix": None,
                                                         "temperature": None, "n": None, "best_of": None})
    for field, value in (("audio", {"voice": "x"}), ("modalities", ["audio"]), ("frobnicate", 1)):
        bad = httpx.post(live[0] + "/v1/chat/completions", json={"model": MODEL, "messages": ASK, field: value})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == field, bad.text
        assert "not support" in bad.json()["error"]["message"]
    assert done.status_code in (200, 400) and done.status_code != 500


@pytest.mark.parametrize("body,param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}}, "response_format"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, None),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_bad_tool_and_format_requests_are_400(live, body, param):
    r = httpx.post(live[0] + "/v1/chat/completions", json={"model": MODEL, "messages": ASK, **body})
    err = H.assert_error_shape(r, 400)
    assert param is None or err["param"] == param
