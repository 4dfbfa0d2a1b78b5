"""Arguments every data-pipeline script shares (--data_dir, --seed, the source flags)."""
from __future__ import annotations

import argparse


def base_parser(description: str) -> argparse.ArgumentParser:
    """A parser with --data_dir (default ``data``) and --seed (default 0)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_dir", default="data", help="root folder of every data file")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    return p


def add_source_args(p: argparse.ArgumentParser) -> None:
    """--source / --local_path, the flags of every downloader."""
    p.add_argument("--source", choices=["hf", "local", "synthetic"], default=None,
                   help="where the data comes from; default: hf when the hub is reachable, "
                        "else synthetic (the embedded offline corpus)")
    p.add_argument("--local_path", default=None,
                   help="a local file in the original format (jsonl/json/txt/parquet); implies "
                        "--source local")


def add_workers_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num_workers", type=int, default=None,
                   help="encoding processes (default: number of CPUs, at most 8)")


def add_tokenizer_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (or a model directory holding one) to encode with; default: "
                        "<data_dir>/tokenizer/tokenizer.json. An imported model's own tokenizer works too.")


def open_tokenizer(args: argparse.Namespace, default_path):
    """The tokenizer a data script encodes with: --tokenizer, else the data folder's own."""
    from data_pipeline.tokenizer.tokenizer import load_tokenizer

    return load_tokenizer(args.tokenizer or default_path)
