"""Your own data, in the forms people keep it in.

    for where, row in read_rows("my_chats.jsonl"):          # also .json, .parquet, a save_to_disk folder,
        messages = to_messages(row, "auto", fields)          # or (online) a `datasets` name: hf:owner/name

Files: JSON lines, a JSON list of objects, Parquet, a folder written by ``datasets``'
``save_to_disk``, or ``hf:<name>`` (a dataset on the hub, read with ``datasets`` when online).
Each row has a ``where`` ("chats.jsonl line 12") that every error names.

Row forms (field names configurable with ``fields``, e.g. {"messages": "dialog"}):
  messages   OpenAI chat: {"messages": [{"role": system|user|assistant|tool, "content": ...}, ...]}
  sharegpt   {"conversations": [{"from": human|gpt|system|tool, "value": ...}, ...]}
  alpaca     {"instruction": ..., "input": ... (optional), "output": ..., "system": ... (optional)}
  preference TRL: {"prompt": str | [messages], "chosen": str | [messages], "rejected": ...}; without
             "prompt", chosen and rejected are whole conversations sharing their opening turns
  prompts    RL: {"question": str | [messages], "answer": "... #### 42"}
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from utils.errors import UserError

FIELDS = {  # the default field names; a recipe's ``fields`` overrides any of them
    "messages": "messages", "role": "role", "content": "content",
    "conversations": "conversations", "from": "from", "value": "value",
    "instruction": "instruction", "input": "input", "output": "output", "system": "system",
    "prompt": "prompt", "chosen": "chosen", "rejected": "rejected",
    "question": "question", "answer": "answer",
}
FORMATS = ("auto", "messages", "sharegpt", "alpaca")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "system": "system", "tool": "tool", "function": "tool", "observation": "tool"}
CHAT_ROLES = ("system", "user", "assistant", "tool")


def field_names(overrides: Optional[dict]) -> dict:
    """FIELDS with a recipe's overrides; an unknown key is a UserError naming the valid ones."""
    unknown = sorted(set(overrides or {}) - set(FIELDS))
    if unknown:
        raise UserError(f"fields: unknown key(s) {unknown}; the fields that can be renamed are {sorted(FIELDS)}.")
    return {**FIELDS, **(overrides or {})}


# ----------------------------------------------------------------------------- reading rows


def read_rows(source: str, split: str = "train") -> Iterator[tuple[str, dict]]:
    """(where, row) for every row of ``source`` (see the module docstring for what it may be)."""
    if source.startswith("hf:"):
        yield from _dataset_rows(_load_hub(source[3:], split), source)
        return
    path = Path(source)
    if path.is_dir():
        yield from _dataset_rows(_load_from_disk(path, split), str(path))
    elif not path.is_file():
        raise UserError(f"data file {source!r} does not exist; give a .jsonl, .json or .parquet file, a folder "
                        "written by datasets' save_to_disk, or hf:<dataset name> when online.")
    elif path.suffix == ".parquet":
        yield from _parquet_rows(path)
    elif path.suffix == ".json":
        yield from _json_rows(path)
    else:
        from data_pipeline.jsonl import iter_jsonl

        for n, row in enumerate(iter_jsonl(path), start=1):
            yield f"{path} line {n}", row


def _json_rows(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); a .json data file holds a list of objects "
                        "(use .jsonl for one object per line).") from None
    if not isinstance(data, list):
        raise UserError(f"{path} holds a JSON {type(data).__name__}; a .json data file holds a list of objects.")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise UserError(f"{path} item {i} is a JSON {type(row).__name__}, expected an object.")
        yield f"{path} item {i}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001  (pyarrow raises several types for a file that is not parquet)
        raise UserError(f"{path} cannot be read as Parquet ({type(err).__name__}: {str(err)[:160]}); "
                        "check the file or convert it to JSON lines.") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path} row {i}", row


def _load_from_disk(path: Path, split: str) -> Any:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"{path} is not a folder written by datasets' save_to_disk ({err}); give a data file instead.") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise UserError(f"{path} has splits {sorted(data)}, not {split!r}; choose one with the split key.")
        data = data[split]
    return data


def _load_hub(name: str, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001  (offline, missing, gated: many exception types)
        raise UserError(f"the dataset {name!r} (split {split!r}) cannot be loaded from the hub here ({type(err).__name__}: "
                        f"{str(err)[:160]}); download it where there is network and point at the files.") from None


def _dataset_rows(data: Any, where: str) -> Iterator[tuple[str, dict]]:
    for i, row in enumerate(data):
        yield f"{where} row {i}", dict(row)


# ----------------------------------------------------------------------------- rows -> chats


def detect_format(row: dict, fields: dict) -> str:
    """The row form from its keys: messages, sharegpt or alpaca (UserError if none fits)."""
    for fmt, key in (("messages", "messages"), ("sharegpt", "conversations"), ("alpaca", "instruction")):
        if fields[key] in row:
            return fmt
    raise UserError(f"the row has keys {sorted(row)[:8]}, none of which says its form: expected "
                    f"{fields['messages']!r} (messages), {fields['conversations']!r} (ShareGPT) or "
                    f"{fields['instruction']!r} (Alpaca); rename them with the recipe's fields, or set format.")


def to_messages(row: dict, fmt: str, fields: dict) -> list[dict]:
    """One row as chat messages [{"role", "content"}, ...] (UserError saying what is wrong)."""
    if fmt == "auto":
        fmt = detect_format(row, fields)
    if fmt == "alpaca":
        return _alpaca(row, fields)
    key, role_key, text_key = ((fields["messages"], fields["role"], fields["content"]) if fmt == "messages"
                               else (fields["conversations"], fields["from"], fields["value"]))
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{key!r} must be a non-empty list of turns, got {type(turns).__name__}")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise UserError(f"{key}[{i}] must be an object, got {type(turn).__name__}")
        role = turn.get(role_key)
        role = SHAREGPT_ROLES.get(role, role) if fmt == "sharegpt" else ("system" if role == "developer" else role)
        if role not in CHAT_ROLES:
            raise UserError(f"{key}[{i}] has {role_key}={turn.get(role_key)!r}; use one of "
                            f"{', '.join(CHAT_ROLES if fmt == 'messages' else SHAREGPT_ROLES)}")
        value = turn.get(text_key)
        if value is None and role == "assistant" and turn.get("tool_calls"):
            value = ""  # an assistant turn that only calls tools (OpenAI writes content: null)
        text = _text(value, f"{key}[{i}].{text_key}")
        # OpenAI messages keep their other fields (name, tool_calls, tool_call_id) for templates that use them.
        extra = {k: v for k, v in turn.items() if k not in (role_key, text_key)} if fmt == "messages" else {}
        out.append({**extra, "role": role, "content": text})
    return out


def _alpaca(row: dict, fields: dict) -> list[dict]:
    instruction = _text(row.get(fields["instruction"]), fields["instruction"])
    extra = row.get(fields["input"]) or ""
    if not isinstance(extra, str):
        raise UserError(f"{fields['input']!r} must be text, got {type(extra).__name__}")
    system = row.get(fields["system"]) or ""
    user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
    messages = [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []
    return messages + [{"role": "user", "content": user},
                       {"role": "assistant", "content": _text(row.get(fields["output"]), fields["output"])}]


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{name} must be text, got {'nothing' if value is None else type(value).__name__}")
    return value


def _messages_or_text(value: Any, name: str, role: str, fields: dict) -> list[dict]:
    """A TRL field that is either plain text (one ``role`` turn) or a message list."""
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{name!r} is empty")
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value:
        return to_messages({fields["messages"]: value}, "messages", fields)
    raise UserError(f"{name!r} must be text or a non-empty list of messages, got {type(value).__name__}")


def to_preference(row: dict, fields: dict) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen reply, rejected reply) of a TRL-style preference row."""
    chosen = _messages_or_text(row.get(fields["chosen"]), fields["chosen"], "assistant", fields)
    rejected = _messages_or_text(row.get(fields["rejected"]), fields["rejected"], "assistant", fields)
    if fields["prompt"] in row:
        prompt = _messages_or_text(row[fields["prompt"]], fields["prompt"], "user", fields)
    else:  # implicit prompt: the turns both conversations open with
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            raise UserError(f"no {fields['prompt']!r} field and {fields['chosen']!r}/{fields['rejected']!r} share no opening turns")
    for name, side in ((fields["chosen"], chosen), (fields["rejected"], rejected)):
        if len(side) != 1 or side[0]["role"] != "assistant" or not side[0]["content"].strip():
            raise UserError(f"{name!r} must be one non-empty assistant reply (after the prompt)")
    return prompt, chosen[0]["content"], rejected[0]["content"]


def to_prompt(row: dict, fields: dict) -> tuple[list[dict], str]:
    """(question as messages, reference answer) of an RL prompt row."""
    question = _messages_or_text(row.get(fields["question"]), fields["question"], "user", fields)
    answer = row.get(fields["answer"])
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)  # a bare number is a reference answer too
    return question, _text(answer, fields["answer"])
