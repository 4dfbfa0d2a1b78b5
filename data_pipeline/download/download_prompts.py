"""Write the RL prompts and the eval sets (GSM8K-format, MMLU-format, HumanEval-format).

    python data_pipeline/download/download_prompts.py [--source hf|local|synthetic]

  data/prompts/rl_{train,test}.jsonl  {"question", "answer" ending '#### N'}
      hf: openai/gsm8k train (rl_test = its last --n_rl_test rows)   local: --local_path
  data/eval/gsm8k_test.jsonl          hf: openai/gsm8k test
  data/eval/mmlu/{dev,test}.jsonl     hf: cais/mmlu (all)
  data/eval/humaneval.jsonl           hf: openai/openai_humaneval
With --source local, eval sets are read from --eval_local_dir (same file names
as under data/eval) when given, else synthetic. Synthetic eval and RL-test
questions come from the "eval" hash bucket, which no training data uses.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # repo root

import random
from pathlib import Path

from data_pipeline.cli import add_source_args, base_parser
from data_pipeline.download import formats
from data_pipeline.download.sources import (
    hf_rows,
    read_local,
    resolve_source,
    split_every,
)
from data_pipeline.jsonl import write_jsonl
from data_pipeline.paths import DataPaths
from data_pipeline.synthetic import arithmetic, mmlu
from data_pipeline.synthetic.humaneval import humaneval_tasks
from data_pipeline.synthetic.splits import draw
from utils.cli import main_guard
from utils.errors import UserError


def synthetic_math(seed: int, n_train: int, n_rl_test: int, n_gsm8k: int):
    """(rl_train, rl_test, gsm8k_test): rl_train from the "rl" bucket; the two tests share one
    stream from the "eval" bucket, so they are disjoint from each other and from all training."""
    key = lambda p: p["question"]
    rng = random.Random(f"{seed}-rl")
    train = draw(lambda: arithmetic.generate_problem(rng), key, "rl", n_train)
    rng_eval = random.Random(f"{seed}-eval-math")
    held_out = draw(lambda: arithmetic.generate_problem(rng_eval), key, "eval", n_gsm8k + n_rl_test)
    return train, held_out[n_gsm8k:], held_out[:n_gsm8k]


def synthetic_mmlu(seed: int, n_test: int, dev_per_subject: int) -> tuple[list[dict], list[dict]]:
    """(dev, test): per subject, the first dev_per_subject items are dev, the rest test."""
    rng = random.Random(f"{seed}-mmlu")
    dev, test = [], []
    per = [n_test // len(mmlu.SUBJECTS) + (i < n_test % len(mmlu.SUBJECTS)) for i in range(len(mmlu.SUBJECTS))]
    for subject, n in zip(mmlu.SUBJECTS, per):
        items = draw(lambda subject=subject: mmlu.generate_question(rng, subject),
                     lambda q: q["question"] + "|" + "|".join(q["choices"]), "eval", dev_per_subject + n)
        dev += items[:dev_per_subject]
        test += items[dev_per_subject:]
    return dev, test


def local_eval(eval_dir: Path | None, name: str, fn) -> list[dict] | None:
    """Rows of eval_dir/name converted with fn, or None when there is no such file."""
    if eval_dir is None or not (eval_dir / name).exists():
        return None
    rows, skipped = formats.convert(read_local(eval_dir / name), fn)
    if not rows:
        raise UserError(f"{eval_dir / name}: no row has the expected format ({skipped} skipped)")
    return rows


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    add_source_args(p)
    p.add_argument("--n_rl_train", type=int, default=2000, help="RL train prompts (synthetic; cap for hf)")
    p.add_argument("--n_rl_test", type=int, default=200)
    p.add_argument("--n_gsm8k_test", type=int, default=200, help="(synthetic; cap for hf)")
    p.add_argument("--n_mmlu_test", type=int, default=200, help="(synthetic; cap for hf)")
    p.add_argument("--n_mmlu_dev_per_subject", type=int, default=5)
    p.add_argument("--n_humaneval", type=int, default=12, help="synthetic tasks (at most 12)")
    p.add_argument("--eval_local_dir", default=None, help="folder with local eval files (with --source local)")
    args = p.parse_args()
    source = resolve_source(args.source, args.local_path)
    paths, seed = DataPaths.of(args.data_dir), args.seed

    def synthetic_sets():
        rl_train, rl_test, gsm8k = synthetic_math(seed, args.n_rl_train, args.n_rl_test, args.n_gsm8k_test)
        dev, test = synthetic_mmlu(seed, args.n_mmlu_test, args.n_mmlu_dev_per_subject)
        return rl_train, rl_test, gsm8k, dev, test, humaneval_tasks(random.Random(f"{seed}-humaneval"), args.n_humaneval)

    if source == "hf":
        gsm_train, _ = formats.convert(hf_rows("openai/gsm8k", "train", "main"), formats.to_gsm8k)
        cut = len(gsm_train) - args.n_rl_test  # the last rows are held out as the RL test set
        rl_train, rl_test = gsm_train[:cut][:args.n_rl_train], gsm_train[cut:]
        gsm8k, _ = formats.convert(hf_rows("openai/gsm8k", "test", "main", limit=args.n_gsm8k_test), formats.to_gsm8k)
        dev, _ = formats.convert(hf_rows("cais/mmlu", "dev", "all"), formats.to_mmlu)
        test, _ = formats.convert(hf_rows("cais/mmlu", "test", "all", limit=args.n_mmlu_test), formats.to_mmlu)
        he, _ = formats.convert(hf_rows("openai/openai_humaneval", "test"), formats.to_humaneval)
    elif source == "local":
        rows, skipped = formats.convert(read_local(args.local_path), formats.to_gsm8k)
        if not rows:
            raise UserError(f"{args.local_path}: no row has question/answer with '#### N' ({skipped} skipped)")
        rl_train, rl_test = split_every(rows, 10)
        eval_dir = Path(args.eval_local_dir) if args.eval_local_dir else None
        local = [local_eval(eval_dir, name, fn) for name, fn in (
            ("gsm8k_test.jsonl", formats.to_gsm8k), ("mmlu/dev.jsonl", formats.to_mmlu),
            ("mmlu/test.jsonl", formats.to_mmlu), ("humaneval.jsonl", formats.to_humaneval))]
        if None in local:
            print("eval sets without a local file (see --eval_local_dir) use the synthetic ones")
            synthetic = synthetic_sets()[2:]
            local = [mine if mine is not None else syn for mine, syn in zip(local, synthetic)]
        gsm8k, dev, test, he = local
    else:
        rl_train, rl_test, gsm8k, dev, test, he = synthetic_sets()

    write_jsonl(paths.rl_prompts("train"), rl_train)
    write_jsonl(paths.rl_prompts("test"), rl_test)
    write_jsonl(paths.gsm8k_test, gsm8k)
    write_jsonl(paths.mmlu("dev"), dev)
    write_jsonl(paths.mmlu("test"), test)
    write_jsonl(paths.humaneval, he)
    print(f"rl prompts: {len(rl_train)} train + {len(rl_test)} test -> {paths.rl_prompts('train').parent}")
    print(f"eval: gsm8k_test {len(gsm8k)}, mmlu dev {len(dev)} / test {len(test)}, humaneval {len(he)} "
          f"-> {paths.eval_dir}")


if __name__ == "__main__":
    main_guard(main)
