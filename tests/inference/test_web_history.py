"""The chat page's conversation memory (inference/web/history.js) under node: which turns go when
the conversation outgrows the context (found under test: on a 256-token model every turn after the
fifth failed until "New chat")."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

NODE = shutil.which("node")
HISTORY = Path(__file__).resolve().parents[2] / "inference" / "web" / "history.js"
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


def run(script: str):
    out = subprocess.run([NODE, "-e", f"const h = require({json.dumps(str(HISTORY))});\n{script}"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_oldest_exchange_goes_first_and_the_system_turn_and_last_message_stay():
    got = run("""
        const a = [{role: "system", content: "s"}, {role: "user", content: "1"}, {role: "assistant", content: "a"},
                   {role: "user", content: "2"}, {role: "assistant", content: "b"}, {role: "user", content: "3"}];
        const steps = [];
        for (let i = 0; i < 3; i++) steps.push([h.dropOldestTurn(a), a.map(m => m.content)]);
        console.log(JSON.stringify(steps));""")
    assert got == [[True, ["s", "2", "b", "3"]], [True, ["s", "3"]], [False, ["s", "3"]]]
    assert run("""const a = [{role: "user", content: "1"}, {role: "assistant", content: "a"}, {role: "user", content: "2"}];
                  console.log(JSON.stringify([h.dropOldestTurn(a), a.map(m => m.content)]));""") == [True, ["2"]]


def test_nearly_full_leaves_the_reply_room():
    got = run("""console.log(JSON.stringify([
        h.nearlyFull({prompt_tokens: 200, completion_tokens: 41}, 256, 16),
        h.nearlyFull({prompt_tokens: 200, completion_tokens: 30}, 256, 16),
        h.nearlyFull(null, 256, 16), h.nearlyFull({prompt_tokens: 9, completion_tokens: 9}, null, 16)]));""")
    assert got == [True, False, False, False]


def test_an_attached_image_becomes_openai_content_parts():
    got = run("""console.log(JSON.stringify([h.userContent("hi", null), h.userContent("How many?", "data:image/png;base64,AAA")]));""")
    assert got == ["hi", [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
                          {"type": "text", "text": "How many?"}]]
