"""Write the RL prompts and the eval sets (GSM8K-format, MMLU-format, HumanEval-format).

    python data_pipeline/download/download_prompts.py [--source hf|local|synthetic]

  data/prompts/rl_{train,test}.jsonl  {"question", "answer" ending '#### N'}
      hf: openai/gsm8k train (rl_test = its last --n_rl_test rows)   local: --local_path
  data/eval/gsm8k_test.jsonl          hf: openai/gsm8k test
  data/eval/mmlu/{dev,test}.jsonl     hf: cais/mmlu (all)
  data/eval/humaneval.jsonl           hf: openai/openai_humaneval
--eval_local_dir DIR (with any --source) takes the eval sets from your copies, in the
layouts their publishers ship (see EVAL_NAMES): GSM8K's test.jsonl, MMLU's data/ folder
or a cais/mmlu snapshot as mmlu/, HumanEval.jsonl.gz; or data/eval's own names. A set
DIR lacks comes from the source (synthetic for --source local), and says so.
Synthetic eval and RL-test questions come from the "eval" hash bucket, which no
training data uses.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # repo root

import random
from pathlib import Path

from data_pipeline.cli import add_source_args, base_parser
from data_pipeline.download import eval_files, formats
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


# Where --eval_local_dir may hold each eval set: data/eval's names, the publishers' names,
# or a folder (the eval readers find test.jsonl, HumanEval.jsonl.gz, HF snapshots inside).
EVAL_NAMES = {
    "gsm8k": ("gsm8k_test.jsonl", "test.jsonl", "gsm8k"),
    "mmlu": ("mmlu", "data"),
    "humaneval": ("humaneval.jsonl", "HumanEval.jsonl.gz", "HumanEval.jsonl", "humaneval"),
}
READERS = {"gsm8k": eval_files.read_gsm8k, "mmlu": eval_files.read_mmlu, "humaneval": eval_files.read_humaneval}


def local_eval_sets(eval_dir: Path) -> dict:
    """{name: rows} (mmlu: (dev, test)) of each eval set eval_dir holds under one of EVAL_NAMES,
    read and checked as the eval scripts read --data_path; UserError when it holds none."""
    if not eval_dir.is_dir():
        raise UserError(f"--eval_local_dir {eval_dir} is not a folder")
    found = {}
    for name, candidates in EVAL_NAMES.items():
        path = next((eval_dir / c for c in candidates if (eval_dir / c).exists()), None)
        if path is not None:
            found[name] = READERS[name](path)
            print(f"eval set {name}: {path}")
    if not found:
        names = "; ".join(f"{name}: {', '.join(c)}" for name, c in EVAL_NAMES.items())
        raise UserError(f"--eval_local_dir {eval_dir} holds no eval set under the names looked for ({names})")
    return found


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    add_source_args(p)
    p.add_argument("--n_rl_train", type=int, default=2000, help="RL train prompts (synthetic; cap for hf)")
    p.add_argument("--n_rl_test", type=int, default=200)
    p.add_argument("--n_gsm8k_test", type=int, default=200, help="(synthetic; cap for hf)")
    p.add_argument("--n_mmlu_test", type=int, default=200, help="(synthetic; cap for hf)")
    p.add_argument("--n_mmlu_dev_per_subject", type=int, default=5)
    p.add_argument("--n_humaneval", type=int, default=12, help="synthetic tasks (at most 12)")
    p.add_argument("--eval_local_dir", default=None,
                   help="folder with your copies of the eval sets (test.jsonl, mmlu/ or data/, HumanEval.jsonl.gz)")
    args = p.parse_args()
    source = resolve_source(args.source, args.local_path)
    paths, seed = DataPaths.of(args.data_dir), args.seed

    def synthetic_sets():
        rl_train, rl_test, gsm8k = synthetic_math(seed, args.n_rl_train, args.n_rl_test, args.n_gsm8k_test)
        dev, test = synthetic_mmlu(seed, args.n_mmlu_test, args.n_mmlu_dev_per_subject)
        return rl_train, rl_test, gsm8k, dev, test, humaneval_tasks(random.Random(f"{seed}-humaneval"), args.n_humaneval)

    eval_dir = Path(args.eval_local_dir) if args.eval_local_dir else None
    mine = local_eval_sets(eval_dir) if eval_dir else {}
    if source == "hf":
        gsm_train, _ = formats.convert(hf_rows("openai/gsm8k", "train", "main"), formats.to_gsm8k)
        cut = len(gsm_train) - args.n_rl_test  # the last rows are held out as the RL test set
        rl_train, rl_test = gsm_train[:cut][:args.n_rl_train], gsm_train[cut:]
        sets = {}
        if "gsm8k" not in mine:
            sets["gsm8k"] = formats.convert(hf_rows("openai/gsm8k", "test", "main", limit=args.n_gsm8k_test),
                                            formats.to_gsm8k)[0]
        if "mmlu" not in mine:
            sets["mmlu"] = (formats.convert(hf_rows("cais/mmlu", "dev", "all"), formats.to_mmlu)[0],
                            formats.convert(hf_rows("cais/mmlu", "test", "all", limit=args.n_mmlu_test),
                                            formats.to_mmlu)[0])
        if "humaneval" not in mine:
            sets["humaneval"] = formats.convert(hf_rows("openai/openai_humaneval", "test"), formats.to_humaneval)[0]
    else:
        rl_train, rl_test, gsm8k, dev, test, he = synthetic_sets()
        sets = {"gsm8k": gsm8k, "mmlu": (dev, test), "humaneval": he}
        if source == "local":
            rows, skipped = formats.convert(read_local(args.local_path), formats.to_gsm8k)
            if not rows:
                raise UserError(f"{args.local_path}: no row has question/answer with '#### N' ({skipped} skipped)")
            rl_train, rl_test = split_every(rows, 10)
    if eval_dir is not None:
        for name in [n for n in EVAL_NAMES if n not in mine]:
            print(f"eval set {name}: {'the hub' if source == 'hf' else 'synthetic'} "
                  f"(none of {', '.join(EVAL_NAMES[name])} under {eval_dir})")
    elif source == "local":
        print("eval sets: synthetic (give --eval_local_dir for your copies of GSM8K, MMLU, HumanEval)")
    sets.update(mine)
    gsm8k, (dev, test), he = sets["gsm8k"], sets["mmlu"], sets["humaneval"]

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
