"""Write the raw corpora: stories (pretraining), SFT conversations and preference pairs.

    python data_pipeline/download/download_tinystories.py [--source hf|local|synthetic]

Sources per part:
  stories     hf: roneneldan/TinyStories      local: --local_path   synthetic: synthetic/stories.py
  sft         hf: HuggingFaceH4/no_robots     local: --sft_local_path         synthetic/sft.py
  preference  hf: HuggingFaceH4/ultrafeedback_binarized  local: --preference_local_path  synthetic/preferences.py
With --source local, a part without its local file falls back to synthetic (one line says so).
Writes data/raw/{stories,sft,preference}_{train,val}.jsonl (formats: download/formats.py).
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # repo root

import itertools
import random
from collections.abc import Iterable, Iterator

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
from data_pipeline.synthetic import preferences, sft
from data_pipeline.synthetic.splits import draw
from data_pipeline.synthetic.stories import generate_story
from utils.cli import main_guard
from utils.errors import UserError

HF_STORIES = "roneneldan/TinyStories"
HF_SFT = "HuggingFaceH4/no_robots"
HF_PREFERENCE = "HuggingFaceH4/ultrafeedback_binarized"


def synthetic_stories(seed: int, n_train: int, n_val: int) -> tuple[list[dict], list[dict]]:
    """Distinct stories; val stories come from their own hash bucket, so never repeat train."""
    rng_train, rng_val = random.Random(f"{seed}-stories"), random.Random(f"{seed}-stories-val")
    key = lambda row: row["text"]
    train = draw(lambda: {"text": generate_story(rng_train)[0]}, key, ("eval", "sft", "rl"), n_train)
    val = draw(lambda: {"text": generate_story(rng_val)[0]}, key, "val", n_val)
    return train, val


def converted(rows: Iterable[dict], fn, skipped: list[int]) -> Iterator[dict]:
    """Lazily convert rows (hub streams can be large), counting the ones skipped."""
    for row in rows:
        out = fn(row) if isinstance(row, dict) else None
        if out is None:
            skipped[0] += 1
        else:
            yield out


def write_part(name: str, source: str, local_path: str | None, synth, hf, convert_fn, paths_of) -> tuple[int, int]:
    """Write one part's train/val jsonl files from its source; return the row counts."""
    if source == "local" and not local_path:
        print(f"{name}: no local file given, using the synthetic {name} data")
        source = "synthetic"
    skipped = [0]
    if source == "synthetic":
        train, val = synth()
    elif source == "local":
        rows, skipped[0] = formats.convert(read_local(local_path), convert_fn)
        if not rows:
            raise UserError(f"{local_path}: none of its rows has the {name} format "
                            "(see data_pipeline/download/formats.py)")
        train, val = split_every(rows, 50)
    else:
        train, val = (converted(rows, convert_fn, skipped) for rows in hf())
    train = iter(train)
    first = next(train, None)  # check before writing anything
    if first is None:
        raise UserError(f"the {name} corpus is empty ({skipped[0]} rows skipped); check --source, "
                        "--local_path and the size flags")
    n_train = write_jsonl(paths_of("train"), itertools.chain([first], train))
    n_val = write_jsonl(paths_of("val"), val)
    if skipped[0]:
        print(f"{name}: skipped {skipped[0]} rows not in the expected format")
    return n_train, n_val


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    add_source_args(p)
    p.add_argument("--n_stories", type=int, default=None,
                   help="training stories (default: 16000 synthetic (~8 MB); all for hf/local)")
    p.add_argument("--n_val_stories", type=int, default=None,
                   help="validation stories (default: 800 synthetic; the full val split for hf)")
    p.add_argument("--n_sft", type=int, default=20000, help="SFT train conversations (synthetic/hf cap)")
    p.add_argument("--n_sft_val", type=int, default=1000)
    p.add_argument("--n_preference", type=int, default=5000, help="preference train pairs (synthetic/hf cap)")
    p.add_argument("--n_preference_val", type=int, default=250)
    p.add_argument("--sft_local_path", default=None, help="local SFT file ({'messages': [...]} rows)")
    p.add_argument("--preference_local_path", default=None,
                   help="local preference file (prompt/chosen/rejected rows)")
    p.add_argument("--parts", default="stories,sft,preference", help="comma-separated parts to write")
    args = p.parse_args()
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    if not parts <= {"stories", "sft", "preference"} or not parts:
        raise UserError(f"--parts {args.parts!r}: choose from stories, sft, preference")
    source = resolve_source(args.source, args.local_path)
    paths = DataPaths.of(args.data_dir)
    seed = args.seed

    if "stories" in parts:
        n, n_val = args.n_stories, args.n_val_stories
        counts = write_part(
            "stories", source, args.local_path,
            synth=lambda: synthetic_stories(seed, 16000 if n is None else n, 800 if n_val is None else n_val),
            hf=lambda: (hf_rows(HF_STORIES, "train", limit=n), hf_rows(HF_STORIES, "validation", limit=n_val)),
            convert_fn=formats.to_story, paths_of=paths.stories)
        mb = paths.stories("train").stat().st_size / 1e6
        print(f"stories: {counts[0]} train ({mb:.1f} MB of jsonl) + {counts[1]} val -> {paths.raw}")

    if "sft" in parts:
        counts = write_part(
            "sft", source, args.sft_local_path,
            synth=lambda: (sft.generate_conversations(random.Random(f"{seed}-sft"), args.n_sft, "sft"),
                           sft.generate_conversations(random.Random(f"{seed}-sft-val"), args.n_sft_val, "val")),
            hf=lambda: (hf_rows(HF_SFT, "train", limit=args.n_sft), hf_rows(HF_SFT, "test", limit=args.n_sft_val)),
            convert_fn=formats.to_sft, paths_of=paths.sft_raw)
        print(f"sft: {counts[0]} train + {counts[1]} val conversations -> {paths.raw}")

    if "preference" in parts:
        counts = write_part(
            "preference", source, args.preference_local_path,
            synth=lambda: (preferences.generate_pairs(random.Random(f"{seed}-pref"), args.n_preference, "sft"),
                           preferences.generate_pairs(random.Random(f"{seed}-pref-val"), args.n_preference_val, "val")),
            hf=lambda: (hf_rows(HF_PREFERENCE, "train_prefs", limit=args.n_preference),
                        hf_rows(HF_PREFERENCE, "test_prefs", limit=args.n_preference_val)),
            convert_fn=formats.to_preference, paths_of=paths.preference_raw)
        print(f"preference: {counts[0]} train + {counts[1]} val pairs -> {paths.raw}")

if __name__ == "__main__":
    main_guard(main)
