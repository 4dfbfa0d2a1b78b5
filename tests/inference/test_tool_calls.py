"""Tool calls at the text edge (inference/tool_calls.py) and in the project's chat format."""
import json

import pytest

from data_pipeline.tokenizer.chat_template import TOOL_CLOSE, TOOL_OPEN, with_tools
from inference.tool_calls import CallSplitter, check_tools, for_template, parse_tool_calls
from utils.errors import UserError

CALL = TOOL_OPEN + json.dumps({"name": "add", "arguments": {"a": 1, "b": 2}}) + TOOL_CLOSE


@pytest.mark.parametrize("text,content,names", [
    ("plain answer", "plain answer", []),
    (CALL, None, ["add"]),
    ("Let me add. " + CALL + CALL, "Let me add. ", ["add", "add"]),
    (TOOL_OPEN + "{not json" + TOOL_CLOSE, TOOL_OPEN + "{not json" + TOOL_CLOSE, []),  # left as text
    ('{"name": "add", "parameters": {"a": 1, "b": 2}}', None, ["add"]),  # Llama-3.1's bare JSON
    ('{"a": 1}', '{"a": 1}', []),  # JSON that is not a call
    (TOOL_OPEN + '{"name": "add", "arguments": "{\\"a\\": 1}"}' + TOOL_CLOSE, None, ["add"]),  # arguments as text
])
def test_parse_tool_calls(text, content, names):
    got, calls = parse_tool_calls(text)
    assert got == content and [c["function"]["name"] for c in calls] == names
    for c in calls:
        assert c["type"] == "function" and isinstance(json.loads(c["function"]["arguments"]), dict)


def test_splitter_streams_text_and_holds_back_calls():
    s = CallSplitter()
    out = "".join(s.feed(p) for p in ["Sure", ", adding.", " <tool", "_call>", '{"name": "add", ', '"arguments": {}}', TOOL_CLOSE])
    assert out == "Sure, adding. "  # never a piece of the marker
    rest, calls = s.finish()
    assert rest == "" and [c["function"]["name"] for c in calls] == ["add"]
    s = CallSplitter()
    assert "".join(s.feed(p) for p in ["a <", "b > c"]) == "a <b > c" and s.finish() == ("", [])
    s = CallSplitter()
    assert s.feed('{"name": "add",') == ""  # may be a bare JSON call
    assert s.feed(' "arguments": {}}') == "" and s.finish()[1][0]["function"]["name"] == "add"


def test_project_format_offers_tools_and_renders_calls_and_results():
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    msgs = with_tools([{"role": "user", "content": "1+?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                       {"role": "tool", "tool_call_id": "call_1", "content": "3"}], tools)
    assert msgs[0]["role"] == "system" and '"name": "add"' in msgs[0]["content"] and TOOL_OPEN in msgs[0]["content"]
    assert msgs[2] == {"role": "assistant", "content": TOOL_OPEN + '{"name": "add", "arguments": {"a": 1}}' + TOOL_CLOSE}
    assert msgs[3] == {"role": "tool", "content": "3"}
    assert for_template([msgs[0], {"role": "assistant", "tool_calls": [call]}])[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    with pytest.raises(UserError, match="not JSON"):
        with_tools([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "x", "arguments": "{"}}]}], None)


def test_check_tools():
    tools = [{"type": "function", "function": {"name": "add"}}]
    assert check_tools(tools, "auto") is None and check_tools(tools, {"type": "function", "function": {"name": "add"}}) == "add"
    with pytest.raises(UserError, match="not among the tools"):
        check_tools(tools, {"type": "function", "function": {"name": "sub"}})
    with pytest.raises(UserError, match="tools\\[0\\]"):
        check_tools([{"type": "function", "function": {}}], "auto")
