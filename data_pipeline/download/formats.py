"""Convert rows of public datasets (and local copies) to the pipeline's raw formats.

Raw formats (one JSON object per line):
  story:       {"text": str}
  sft:         {"messages": [{"role": system|user|assistant, "content": str}, ...]}
  preference:  {"prompt": [messages ending with a user turn], "chosen": str, "rejected": str}
  rl prompt / gsm8k: {"question": str, "answer": str ending '#### N'}
  mmlu:        {"subject": str, "question": str, "choices": [4 str], "answer": int 0-3}
  humaneval:   {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
Each ``to_*`` returns None for a row that cannot be converted (it is skipped and counted).
"""
from __future__ import annotations

ROLES = {"system", "user", "assistant"}


def to_story(row: dict) -> dict | None:
    text = row.get("text") if isinstance(row, dict) else None
    return {"text": text.strip()} if isinstance(text, str) and text.strip() else None


def _messages(msgs) -> list[dict] | None:
    if not isinstance(msgs, list) or not msgs:
        return None
    out = [{"role": m.get("role"), "content": m.get("content")} for m in msgs if isinstance(m, dict)]
    ok = len(out) == len(msgs) and all(m["role"] in ROLES and isinstance(m["content"], str) for m in out)
    return out if ok else None


def to_sft(row: dict) -> dict | None:
    """From {"messages": [...]} (HF chat datasets, e.g. HuggingFaceH4/no_robots)."""
    msgs = _messages(row.get("messages"))
    if msgs is None or not any(m["role"] == "assistant" for m in msgs):
        return None
    return {"messages": msgs}


def to_preference(row: dict) -> dict | None:
    """From our format, or from chosen/rejected message lists (ultrafeedback_binarized)."""
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    if isinstance(chosen, list):  # full conversations: the prompt is all but the last turn
        c, r = _messages(chosen), _messages(rejected)
        if not c or not r or c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
            return None
        prompt, chosen, rejected = c[:-1], c[-1]["content"], r[-1]["content"]
    elif isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    else:
        prompt = _messages(prompt)
    if not prompt or prompt[-1]["role"] != "user" or not isinstance(chosen, str) or not isinstance(rejected, str):
        return None
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def to_gsm8k(row: dict) -> dict | None:
    q, a = row.get("question"), row.get("answer")
    if not isinstance(q, str) or not isinstance(a, str) or "####" not in a:
        return None
    return {"question": q, "answer": a}


def to_mmlu(row: dict) -> dict | None:
    choices, answer = row.get("choices"), row.get("answer")
    if isinstance(answer, str) and answer in "ABCD" and len(answer) == 1:
        answer = "ABCD".index(answer)
    if not isinstance(row.get("question"), str) or not isinstance(choices, list) or len(choices) != 4 \
            or not isinstance(answer, int) or not 0 <= answer < 4:
        return None
    return {"subject": str(row.get("subject", "")), "question": row["question"],
            "choices": [str(c) for c in choices], "answer": answer}


def to_humaneval(row: dict) -> dict | None:
    keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    if not all(isinstance(row.get(k), str) for k in keys):
        return None
    return {k: row[k] for k in keys}


def convert(rows, fn) -> tuple[list[dict], int]:
    """Apply ``fn`` to rows; return (converted, number skipped)."""
    out = [fn(r) if isinstance(r, dict) else None for r in rows]
    kept = [r for r in out if r is not None]
    return kept, len(out) - len(kept)
