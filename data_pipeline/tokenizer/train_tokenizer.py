"""Train the byte-level BPE tokenizer on the raw stories (+ SFT text) and write data/tokenizer/.

    python data_pipeline/tokenizer/train_tokenizer.py --vocab_size 4096 --data_limit_mb 100

--backend hf (default) uses the HF ``tokenizers`` trainer (Rust); --backend
scratch uses ``bpe.py`` (pure Python; the same merges). Writes, atomically:
tokenizer.json (HF format), tokenizer_config.json and special_tokens_map.json
so ``transformers.AutoTokenizer.from_pretrained("data/tokenizer")`` works,
chat template included.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # repo root

import time
from pathlib import Path

from utils.fs import atomic_dir
from data_pipeline.cli import base_parser
from data_pipeline.jsonl import iter_jsonl
from data_pipeline.paths import DataPaths
from data_pipeline.tokenizer.bpe import ByteLevelBPE
from data_pipeline.tokenizer.tokenizer import SPECIAL_TOKENS, Tokenizer, hf_config_files
from utils.cli import main_guard
from utils.errors import UserError

MAX_VOCAB = 2**20


def row_text(row: dict) -> str:
    """The trainable text of a raw row: a story's text or a conversation's turns."""
    if "text" in row:
        return row["text"]
    if "messages" in row:
        return "\n".join(f"{m.get('role', '')}\n{m.get('content', '')}" for m in row["messages"])
    return ""


def read_corpus(paths: list[Path], limit_bytes: int) -> list[str]:
    """Texts from the jsonl files in order, stopping before ``limit_bytes`` of UTF-8."""
    texts, total = [], 0
    for path in paths:
        for row in iter_jsonl(path):
            text = row_text(row)
            size = len(text.encode("utf-8"))
            if total + size > limit_bytes:
                return texts
            if text:
                texts.append(text)
                total += size
    return texts


def train_hf(texts: list[str], vocab_size: int, show_progress: bool):
    """HF trainer configured to be byte-for-byte what bpe.py computes."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=0, show_progress=show_progress)
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--vocab_size", type=int, default=4096, help="including 256 bytes + 5 specials")
    p.add_argument("--data_limit_mb", type=float, default=100.0, help="read at most this much text")
    p.add_argument("--backend", choices=["hf", "scratch"], default="hf")
    p.add_argument("--inputs", nargs="*", default=None,
                   help="jsonl files to train on (default: raw stories_train + sft_train if present)")
    args = p.parse_args()
    paths = DataPaths.of(args.data_dir)

    min_vocab = 256 + len(SPECIAL_TOKENS)
    if args.vocab_size < min_vocab:
        raise UserError(f"--vocab_size {args.vocab_size} is too small: a byte-level BPE needs 256 "
                        f"byte tokens + {len(SPECIAL_TOKENS)} special tokens; use >= {min_vocab}")
    if args.vocab_size > MAX_VOCAB:  # the HF trainer allocates per requested slot: 1e9 aborted the process
        raise UserError(f"--vocab_size {args.vocab_size} is too large: at most {MAX_VOCAB:,} (published models "
                        "use up to ~256k; 4096-32768 suit this project's corpora)")
    if args.inputs:
        inputs = [Path(x) for x in args.inputs]
    else:
        inputs = [paths.stories("train")] + ([paths.sft_raw("train")] if paths.sft_raw("train").exists() else [])
    texts = read_corpus(inputs, int(args.data_limit_mb * 1e6))
    if not texts:
        raise UserError(f"the training corpus is empty (read {', '.join(map(str, inputs))}); "
                        "run data_pipeline/download/download_tinystories.py first or pass --inputs")
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6

    t0 = time.time()
    with atomic_dir(paths.tokenizer_dir) as tmp:
        if args.backend == "hf":
            train_hf(texts, args.vocab_size, show_progress=sys.stderr.isatty()).save(str(tmp / "tokenizer.json"))
        else:
            ByteLevelBPE.train(texts, args.vocab_size, SPECIAL_TOKENS).save(tmp / "tokenizer.json")
        hf_config_files(tmp)
        tok = Tokenizer.from_file(tmp / "tokenizer.json")  # validates the special ids
    seconds = time.time() - t0
    tok = Tokenizer.from_file(paths.tokenizer_json)
    print(f"trained {args.backend} BPE on {len(texts)} texts ({mb:.1f} MB) in {seconds:.1f}s: "
          f"vocab {tok.vocab_size} (asked {args.vocab_size}), hash {tok.hash} -> {paths.tokenizer_json}")
    if tok.vocab_size < args.vocab_size:
        print(f"note: the corpus ran out of pairs to merge at {tok.vocab_size} tokens "
              "(every word is already one token); a larger or more varied corpus gives more")


if __name__ == "__main__":
    main_guard(main)
