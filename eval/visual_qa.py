"""Visual question answering: exact-answer accuracy on held-out image questions, through the engine.

    python eval/visual_qa.py --checkpoint runs/vlm/instruct/final --data_path data/visual/qa_eval.jsonl
    python eval/visual_qa.py --checkpoint runs/vlm/text/final --data_path ... --with_images false   # text-only

Rows are the training layout (data_pipeline/download/make_visual_task.py): a user turn with its
image(s) and question, then the reference answer as the assistant turn. Each prompt is the chat up
to that answer, rendered in the model's chat format with the image placeholders; the images go to
the engine beside it (encoded once per image). Greedy answers must equal the reference exactly
(case and a final full stop aside). Reports accuracy overall and per kind of question.
Writes out/eval/visual_qa/visual_qa_{summary.json,records.jsonl}.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import time  # noqa: E402
from collections import defaultdict  # noqa: E402

from data_pipeline.images import to_pixels  # noqa: E402
from data_pipeline.tokenizer.chat_template import chat_stop_ids  # noqa: E402
from data_pipeline.user_data import read_rows  # noqa: E402
from data_pipeline.vision_chat import drop_images, render_with_images, row_chat  # noqa: E402
from eval.common import engine_summary, load_model_and_tokenizer, make_engine, out_dir, parse_eval_args, summary_header  # noqa: E402
from eval.report import write_results  # noqa: E402
from utils.cli import main_guard  # noqa: E402
from utils.errors import UserError  # noqa: E402

NAME = "visual_qa"


def normalise(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


def question_kind(question: str) -> str:
    """The question's template, numbers and names aside ("How many red shapes" -> "how many <colour>")."""
    words = question.lower().rstrip("?").split()
    if words[:2] == ["how", "many"]:
        return "count+k" if "plus" in words else "count" if words[2] == "shapes" else "count colour"
    return " ".join(words[:2])


def load_rows(path: str, limit=None) -> list[dict]:
    """{"messages" (up to the answer), "images", "answer", "question"} per row."""
    base = pathlib.Path(path).parent
    rows = []
    for where, row in read_rows(path):
        if limit is not None and len(rows) >= limit:
            break
        messages, images = row_chat(row, base, where)
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise UserError(f"{where}: the last message must be the assistant's reference answer.")
        rows.append({"messages": messages[:-1], "images": images, "answer": messages[-1]["content"],
                     "question": drop_images(messages[-2:-1])[0]["content"].strip()})  # the image before or after
    if not rows:
        raise UserError(f"{path} holds no rows.")
    return rows


def main() -> None:
    recipe = parse_eval_args(NAME, __doc__.splitlines()[0])
    if not recipe.data_path:
        raise UserError("visual_qa needs --data_path: a JSONL of image questions (python "
                        "data_pipeline/download/make_visual_task.py writes data/visual/qa_eval.jsonl).")
    started = time.time()
    model, tok = load_model_and_tokenizer(recipe)
    rows = load_rows(recipe.data_path, recipe.limit)
    v = model.cfg.vision
    prompts, images = [], []
    for r in rows:
        messages, imgs = (r["messages"], r["images"]) if recipe.with_images else (drop_images(r["messages"]), [])
        ids, _ = render_with_images(tok, messages, len(imgs), v["image_token_id"] if v else None, model.cfg.image_tokens,
                                    add_generation_prompt=True)
        prompts.append(ids)
        images.append(to_pixels(imgs, v["image_size"]) if imgs else None)
    from inference.sampling_params import SamplingParams

    engine = make_engine(model, tok, recipe)
    params = SamplingParams(max_tokens=min(recipe.max_new_tokens, 32), temperature=0.0, stop_token_ids=chat_stop_ids(tok))
    outs = engine.generate(prompts, params, use_tqdm=recipe.progress, images=images)
    by_kind = defaultdict(list)
    records = []
    for r, out in zip(rows, outs):
        text = out.outputs[0].text or ""
        ok = normalise(text) == normalise(r["answer"])
        by_kind[question_kind(r["question"])].append(ok)
        records.append({"question": r["question"], "answer": r["answer"], "output": text, "correct": ok})
    acc = sum(x["correct"] for x in records) / len(records)
    summary = {**summary_header(NAME, recipe, started), "n": len(records), "with_images": recipe.with_images,
               "accuracy": round(acc, 4), "by_kind": {k: round(sum(v) / len(v), 4) for k, v in sorted(by_kind.items())},
               **engine_summary(engine)}
    write_results(out_dir(recipe, NAME), NAME, summary, records)
    print(f"visual_qa: {recipe.checkpoint} ({'with' if recipe.with_images else 'without'} images) accuracy "
          f"{acc:.3f} on {len(records)} held-out questions | " + ", ".join(f"{k} {s:.2f}" for k, s in summary["by_kind"].items()))


if __name__ == "__main__":
    main_guard(main)
