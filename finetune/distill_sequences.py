"""Sequence-level distillation (Kim & Rush 2016): the teacher answers a prompt set through the
engine, and its answers become SFT data for the student.

    python finetune/distill_sequences.py --teacher runs/sft/final --prompts data/prompts/rl_train.jsonl \\
        --out data/distill/teacher_answers.jsonl [--n 1 --temperature 0 --max_new_tokens 128 --limit 1000]
    python finetune/sft_train.py --config_path <student's SFT recipe> data.train_path=data/distill/teacher_answers.jsonl

Prompt rows are read as RL prompts are ({"question": text or [messages]}, renamed with --fields;
.jsonl/.json/.parquet, a save_to_disk folder or hf:<name>), rendered in the teacher's chat format,
and answered greedily (temperature 0) or sampled n times. Each answer is a row
{"messages": [..the prompt.., {"role": "assistant", "content": answer}]}, the form SFT reads.
Answers cut off by max_new_tokens are left out (--keep_truncated to keep them): an unfinished
answer would teach the student not to stop. Every recipe key is also a flag.
"""
from __future__ import annotations

import sys
import pathlib

if __name__ == "__main__":
    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # repo root

import json  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

from utils.cli import main_guard  # noqa: E402
from utils.config import parse_args  # noqa: E402
from utils.device import DType  # noqa: E402
from utils.errors import UserError  # noqa: E402


@dataclass
class SequenceKDRecipe:
    teacher: str = field(default="", metadata={"path": "dir"})  # checkpoint (full or adapter) or HF model dir
    prompts: str = "data/prompts/rl_train.jsonl"  # rows {"question": text | [messages]} (an answer field is ignored)
    out: str = "data/distill/teacher_answers.jsonl"
    fields: dict = field(default_factory=dict)  # rename fields, e.g. {question: problem}
    limit: int = 0  # first N prompts (0: all)
    n: int = 1  # answers per prompt
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 128
    keep_truncated: bool = False
    seed: int = 0
    device: str = "auto"
    dtype: DType = "auto"  # the teacher's weights (auto: bf16 on a GPU that has it)
    max_num_seqs: int = 64  # engine batch width

    def __post_init__(self) -> None:
        if not self.teacher:
            raise UserError("--teacher is required: the checkpoint or HF model directory that answers the prompts.")
        if self.n < 1 or self.max_new_tokens < 1 or self.limit < 0:
            raise UserError("n and max_new_tokens must be >= 1 and limit >= 0.")
        if self.n > 1 and self.temperature == 0:
            raise UserError(f"n={self.n} answers per prompt need sampling: set temperature > 0 (greedy gives n copies).")


def read_questions(path: str, fields: dict, limit: int) -> list[list[dict]]:
    """Each prompt row's question as chat messages (a row's answer, if any, is not needed)."""
    from data_pipeline.user_data import field_names, read_rows, to_prompt

    names = field_names(fields)
    out = []
    for where, row in read_rows(path):
        try:
            out.append(to_prompt({names["answer"]: "", **row}, names)[0])
        except UserError as err:
            raise UserError(f"{where}: {err}; prompt rows need a non-empty {names['question']!r} "
                            "(text or a list of messages)") from None
        if limit and len(out) == limit:
            break
    if not out:
        raise UserError(f"{path} holds no prompts.")
    return out


def teacher_answers(model, tokenizer, questions: Sequence[list[dict]], cfg: SequenceKDRecipe) -> tuple[list[dict], dict]:
    """The SFT rows of the teacher's answers, and counts {prompts, answers, truncated, too_long}."""
    from data_pipeline.tokenizer.chat_template import chat_stop_ids, render_chat
    from inference.engine import LLMEngine
    from inference.sampling_params import SamplingParams

    limit = model.cfg.max_seq_len
    prompts = [render_chat(tokenizer, q, add_generation_prompt=True)[0] for q in questions]
    keep = [i for i, p in enumerate(prompts) if len(p) < limit]
    engine = LLMEngine(model, tokenizer=tokenizer, device=next(model.parameters()).device,
                       max_num_seqs=cfg.max_num_seqs)
    stop = chat_stop_ids(tokenizer)
    params = [SamplingParams(max_tokens=min(cfg.max_new_tokens, limit - len(prompts[i])), temperature=cfg.temperature,
                             top_p=cfg.top_p, n=cfg.n, seed=cfg.seed + i, stop_token_ids=stop) for i in keep]
    rows, truncated = [], 0
    for i, completion in zip(keep, engine.generate([prompts[i] for i in keep], params, use_tqdm=False)):
        for out in completion.outputs:
            if out.finish_reason == "error":
                raise UserError(f"the engine refused prompt {i}: {out.error}")
            stopped = out.finish_reason == "stop"
            truncated += not stopped
            if stopped or cfg.keep_truncated:
                ids = list(out.token_ids[:-1] if stopped else out.token_ids)
                rows.append({"messages": [*questions[i], {"role": "assistant", "content": tokenizer.decode(ids)}]})
    counts = {"prompts": len(questions), "answers": len(rows), "truncated": truncated,
              "too_long": len(questions) - len(keep)}
    return rows, counts


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from model.load import load
    from utils.device import resolve_device
    from utils.fs import atomic_file

    cfg, _ = parse_args(SequenceKDRecipe, __doc__.splitlines()[0], argv, flags=True)
    questions = read_questions(cfg.prompts, cfg.fields, cfg.limit)
    device = resolve_device(cfg.device)
    model, tokenizer = load(cfg.teacher, device=device, dtype=cfg.dtype)
    rows, counts = teacher_answers(model, tokenizer, questions, cfg)
    if not rows:
        raise UserError(f"the teacher finished none of its {counts['prompts']} answers within max_new_tokens="
                        f"{cfg.max_new_tokens}; raise --max_new_tokens (or pass --keep_truncated).")
    with atomic_file(cfg.out) as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"sequence KD: {counts['answers']} teacher answers to {counts['prompts']} prompts -> {cfg.out} "
          f"({counts['truncated']} cut off by max_new_tokens{' and kept' if cfg.keep_truncated else ', left out'}; "
          f"{counts['too_long']} prompts longer than the teacher's context). Train on them with "
          f"data.train_path={cfg.out} in an SFT recipe.")
    return counts


if __name__ == "__main__":
    main_guard(main)
