"""inference/agent.py: the tools it executes, and its loop against the real server (a random
model forced to call a tool on its first step, then free)."""
from __future__ import annotations

import json

import pytest

from inference import agent, server
from inference.async_engine import AsyncEngine
from tests.inference import test_server_helpers as H
from utils.errors import UserError


def call(name: str, **args) -> dict:
    return {"id": "c1", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def test_tools_run_and_fail_readably():
    assert agent.execute(call("calculator", expression="17 * 23 + 4")) == "395"
    assert agent.execute(call("calculator", expression="import os")).startswith("error:")
    assert agent.execute(call("python", code="print(sum(range(101)))")) == "5050"
    assert "ZeroDivisionError" in agent.execute(call("python", code="1/0"))
    assert "error" in agent.execute(call("python", code="import socket; socket.create_connection(('1.1.1.1', 80))"))
    assert agent.execute(call("search", q="x")).startswith("error: no tool named 'search'")
    assert agent.execute(call("calculator", expr="1+1")).startswith("error:")  # wrong argument name
    assert agent.execute({"function": {"name": "python", "arguments": "{not json"}}).startswith("error: the arguments are not JSON")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tok = H.load_tokenizer(H.train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json"))
    settings = server.ServerSettings(model_name="tiny", max_model_len=2048, max_tokens_cap=300, n_cap=1)
    with H.LiveServer(server.build_app(AsyncEngine(H.tiny_engine(tok, 2048)), tok, settings)) as url:
        yield url


def test_loop_executes_calls_feeds_results_back_and_stops_at_the_limit(live):
    seen = []
    named = {"type": "function", "function": {"name": "calculator"}}  # its expression is at most 200 characters
    result = agent.run_agent("What is 2+2?", base_url=live + "/v1", max_steps=2,
                             first_tool_choice=named, on_step=seen.append)
    roles = [m["role"] for m in result.messages]
    assert roles[:4] == ["system", "user", "assistant", "tool"]  # the forced call was executed
    first = result.messages[2]["tool_calls"][0]
    assert first["function"]["name"] == "calculator" and result.tool_calls >= 1
    assert result.messages[3]["tool_call_id"] == first["id"]
    assert result.steps <= 2 and seen == result.messages[2:]
    assert (result.stopped == "answer") == (result.answer is not None)
    assert result.usage["prompt_tokens"] > 0


def test_unreachable_server_is_a_clear_error():
    with pytest.raises(UserError, match="cannot reach"):
        agent.run_agent("hi", base_url="http://127.0.0.1:9/v1", model="m", timeout=5)
