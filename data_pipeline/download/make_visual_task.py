"""Write the synthetic visual task in the common local layout (JSONL of messages + image files).

    python data_pipeline/download/make_visual_task.py [--data_dir data] [--n_train 1500] [--n_eval 100]

  data/visual/images/<scene>.png            24 x 24 RGB scenes of coloured shapes on a 3 x 3 grid
  data/visual/caption_train.jsonl           {"messages": [user: image + "Describe the image.", assistant: caption],
                                             "images": ["images/<scene>.png"]}       (stage 1, align)
  data/visual/qa_{train,eval}.jsonl         the same with a question and its exact answer (stage 2, eval)
  data/visual/tokenizer/tokenizer.json      a small BPE over the task's words (a from-scratch model's tokenizer)

Held-out (eval) scenes come from the "eval" hash bucket, which no training row uses. Your own data
in this layout trains the same way (finetune/vlm_train.py's data.train_path).
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # repo root

import hashlib  # noqa: E402

from data_pipeline.cli import base_parser  # noqa: E402
from data_pipeline.images import encode_png_data_url  # noqa: E402
from data_pipeline.jsonl import write_jsonl  # noqa: E402
from data_pipeline.synthetic import visual  # noqa: E402
from utils.cli import main_guard  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.fs import atomic_dir  # noqa: E402


def write_split(rows: list[dict], out: pathlib.Path, name: str) -> int:
    """Save each row's image as a PNG named by its content, the row as {"messages", "images"}."""
    import base64

    lines = []
    for row in rows:
        png = base64.b64decode(encode_png_data_url(row["image"]).split(",", 1)[1])
        file = f"images/{hashlib.sha1(png).hexdigest()[:16]}.png"
        (out / file).write_bytes(png)
        lines.append({"messages": row["messages"], "images": [file]})
    return write_jsonl(out / f"{name}.jsonl", lines)


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--n_train", type=int, default=1500, help="training scenes (6 questions each, one caption)")
    p.add_argument("--n_eval", type=int, default=100, help="held-out scenes (6 questions each)")
    p.add_argument("--vocab_size", type=int, default=512, help="the task tokenizer's vocabulary")
    args = p.parse_args()
    if args.n_train <= 0 or args.n_eval <= 0:
        raise UserError("--n_train and --n_eval must be positive.")
    final = pathlib.Path(args.data_dir) / "visual"
    with atomic_dir(final) as out:
        (out / "images").mkdir()
        n_cap = write_split(visual.make_examples(args.n_train, "train", "caption", args.seed), out, "caption_train")
        n_qa = write_split(visual.make_examples(args.n_train, "train", "qa", args.seed), out, "qa_train")
        n_ev = write_split(visual.make_examples(args.n_eval, "eval", "qa", args.seed), out, "qa_eval")
        from data_pipeline.tokenizer.tokenizer import hf_config_files
        from data_pipeline.tokenizer.train_tokenizer import train_hf

        (out / "tokenizer").mkdir()
        train_hf(visual.corpus_text(args.n_train, args.seed), args.vocab_size, False).save(str(out / "tokenizer" / "tokenizer.json"))
        hf_config_files(out / "tokenizer")
    print(f"visual task -> {final}: {n_cap} captions, {n_qa} train questions, {n_ev} held-out questions, "
          f"tokenizer (vocab {args.vocab_size})")


if __name__ == "__main__":
    main_guard(main)
