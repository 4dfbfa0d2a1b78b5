"""A minimal agent: plan, act, observe, over the OpenAI tools API of any compatible server (ours).

    python inference/server.py --checkpoint runs/x/final &
    python inference/agent.py --base_url http://127.0.0.1:8000/v1 "What is 17 * 23 + 4?"

Each step sends the conversation with the tools offered; when the reply calls tools, each call is
executed here and its result goes back as a ``tool`` message, and the model takes the next step;
a reply without calls is the answer. ``max_steps`` bounds the loop (a model that never stops
calling tools ends with ``stopped: "step limit"``). Two tools:

- ``calculator(expression)``: arithmetic, evaluated from its syntax tree (inference/calculator.py);
- ``python(code)``: a program run in the sandbox (utils/sandbox.py: a fresh interpreter, resource
  limits, no network, no files outside its own directory), its printed output returned.

A tool that fails (bad arguments, an error in the program) answers with the error text, so the
model can correct itself. Only the standard library talks to the server (no client package).
"""
from __future__ import annotations

import json
import pathlib
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

from inference.calculator import evaluate, format_number  # noqa: E402
from utils.errors import UserError  # noqa: E402

SYSTEM = ("You are a careful assistant. Use the calculator for arithmetic and python for anything longer; "
          "when you know the answer, reply with it and no tool call.")

TOOLS = [
    {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression (+ - * / // % ** and parentheses).",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string", "maxLength": 200}}, "required": ["expression"]}}},
    {"type": "function", "function": {
        "name": "python", "description": "Run a Python program in a sandbox and return what it prints.",
        "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}},
]


def calculator(expression: str) -> str:
    value = evaluate(str(expression))
    return "error: not an arithmetic expression" if value is None else format_number(value)


def python(code: str, timeout_s: float = 5.0) -> str:
    from utils.sandbox import run_python

    out = run_python(str(code), timeout_s=timeout_s, stdout_limit=4000)
    printed = out["stdout"].strip()
    if out["ok"]:
        return printed or "(the program printed nothing; print the result)"
    return (printed + "\n" if printed else "") + f"error: {out['result']}"


EXECUTORS: dict[str, Callable[..., str]] = {"calculator": calculator, "python": python}


def execute(call: dict) -> str:
    """Run one tool call ({"function": {"name", "arguments": JSON text}}); errors become its result."""
    fn = call.get("function") or {}
    name = fn.get("name")
    if name not in EXECUTORS:
        return f"error: no tool named {name!r}; the tools are {sorted(EXECUTORS)}"
    try:
        args = json.loads(fn.get("arguments") or "{}")
    except json.JSONDecodeError as err:
        return f"error: the arguments are not JSON ({err.msg})"
    if not isinstance(args, dict):
        return "error: the arguments must be a JSON object"
    try:
        return EXECUTORS[name](**args)
    except TypeError as err:  # missing or unexpected arguments
        return f"error: {err}"


@dataclass
class AgentResult:
    answer: Optional[str]  # the final reply's text; None when the step limit ended the loop
    messages: list[dict]  # the whole conversation, tool calls and results included
    steps: int
    tool_calls: int = 0
    stopped: str = "answer"  # "answer" | "step limit"
    usage: dict = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})


def post(url: str, body: dict, api_key: Optional[str], timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:300]
        raise UserError(f"the server answered {err.code} to {url}: {detail}") from None
    except urllib.error.URLError as err:
        raise UserError(f"cannot reach {url} ({err.reason}); start the server (python inference/server.py "
                        "--checkpoint ...) or pass --base_url.") from None


def run_agent(task: str, base_url: str = "http://127.0.0.1:8000/v1", model: Optional[str] = None,
              max_steps: int = 6, max_tokens: Optional[int] = None, temperature: float = 0.0, api_key: Optional[str] = None,
              first_tool_choice: Any = "auto", timeout: float = 300.0,
              on_step: Optional[Callable[[dict], None]] = None) -> AgentResult:
    """Run the loop on ``task``. ``max_tokens`` per reply (None: the server's default). ``model`` defaults to the server's one model; ``first_tool_choice``
    (e.g. "required") applies to the first step only, the rest are "auto"."""
    base = base_url.rstrip("/")
    if model is None:
        with urllib.request.urlopen(base + "/models", timeout=timeout) as r:
            model = json.loads(r.read())["data"][0]["id"]
    messages: list[dict] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task}]
    result = AgentResult(None, messages, 0)
    for step in range(max_steps):
        body = {"model": model, "messages": messages, "tools": TOOLS, "temperature": temperature,
                "tool_choice": first_tool_choice if step == 0 else "auto",
                **({"max_tokens": max_tokens} if max_tokens else {})}  # unset: what the context leaves
        reply = post(base + "/chat/completions", body, api_key, timeout)
        result.steps = step + 1
        for k in result.usage:
            result.usage[k] += reply.get("usage", {}).get(k, 0)
        message = reply["choices"][0]["message"]
        calls = message.get("tool_calls") or []
        messages.append({"role": "assistant", "content": message.get("content"), **({"tool_calls": calls} if calls else {})})
        if on_step:
            on_step(messages[-1])
        if not calls:
            result.answer = message.get("content") or ""
            return result
        for call in calls:
            result.tool_calls += 1
            messages.append({"role": "tool", "tool_call_id": call.get("id"), "content": execute(call)})
            if on_step:
                on_step(messages[-1])
    result.stopped = "step limit"
    return result


def main(argv: Optional[list[str]] = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="A plan-act-observe agent with a calculator and a sandboxed python tool.")
    ap.add_argument("task")
    ap.add_argument("--base_url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default=None, help="default: the server's model")
    ap.add_argument("--max_steps", type=int, default=6)
    ap.add_argument("--max_tokens", type=int, default=None, help="per reply (default: what the context leaves, up to the server's cap)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--api_key", default=None)
    args = ap.parse_args(argv)
    if args.max_steps < 1:
        raise UserError(f"--max_steps must be >= 1, got {args.max_steps}.")

    def show(message: dict) -> None:
        if message["role"] == "tool":
            print(f"  [tool] {message['content']}")
        for call in message.get("tool_calls") or []:
            print(f"  [call] {call['function']['name']}({call['function']['arguments']})")
        if message["role"] == "assistant" and message.get("content"):
            print(f"  [model] {message['content']}")

    result = run_agent(args.task, args.base_url, args.model, args.max_steps, args.max_tokens, args.temperature,
                       args.api_key, on_step=show)
    tail = f"answer: {result.answer}" if result.answer is not None else "stopped at the step limit, no answer"
    print(f"{tail}  ({result.steps} steps, {result.tool_calls} tool calls)")


if __name__ == "__main__":
    from utils.cli import main_guard

    main_guard(main)
