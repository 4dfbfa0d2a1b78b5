"""What the four eval scripts share: the recipe, the command line, model/tokenizer loading, the engine.

    recipe = parse_eval_args("gsm8k", "GSM8K accuracy", argv)      # --checkpoint ... or --config_path ...
    model, tok = load_model_and_tokenizer(recipe)                 # full checkpoint or LoRA adapter dir
    engine = make_engine(model, tok, recipe)                      # the one generation engine

Every recipe key is also a flag: ``--limit 20`` means the override ``limit=20``, so
``--checkpoint runs/x/final`` and ``checkpoint=runs/x/final`` are the same thing, and a
YAML recipe (``--config_path configs/examples/eval_gsm8k.yaml``) can be overridden either way.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch

from utils.config import parse_args, to_dict
from utils.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = REPO_ROOT / "data" / "tokenizer" / "tokenizer.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineSettings:
    """LLMEngine arguments (inference/engine.py); max_model_len None = the model's max_seq_len."""

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_model_len: Optional[int] = None
    block_size: int = 16
    enable_prefix_caching: bool = True  # few-shot prompts share their prefix: computed once


@dataclass
class EvalRecipe:
    """One recipe type for all four evals; each script reads the keys it needs.

    None for n_shot / out_dir / window / stride means "the script's default"
    (GSM8K 5 shots, MMLU 5 shots, out/eval/<name>, the model's context, window // 2).
    """

    checkpoint: str = ""  # model checkpoint dir, or a LoRA adapter dir (merged onto its base)
    base_checkpoint: Optional[str] = None  # an adapter's base when its meta.json does not record one
    tokenizer: Optional[str] = None  # default: tokenizer.json in the checkpoint (or its base), else data/tokenizer
    source: Literal["hf", "local", "synthetic"] = "synthetic"
    data_path: Optional[str] = None  # with source=local: your copy of the set, original format
    limit: Optional[int] = None  # first N examples (MMLU: per subject; perplexity: documents)
    n_shot: Optional[int] = None
    shots_path: Optional[str] = None  # GSM8K few-shot problems (jsonl question/answer); default per source
    out_dir: Optional[str] = None
    seed: int = 0
    progress: bool = True
    device: str = "auto"  # auto: cuda when available
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # generation (GSM8K, HumanEval)
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    n_samples: int = 1  # HumanEval completions per task
    k_list: list[int] = field(default_factory=lambda: [1, 10, 100])
    engine: EngineSettings = field(default_factory=EngineSettings)
    # scoring forward passes (MMLU, perplexity)
    batch_size: int = 8
    # perplexity
    text_path: Optional[str] = None  # .jsonl ({"text"}) or .txt held-out corpus
    bin_path: str = "data/bins/pretrain/val.bin"  # used when text_path is not set
    window: Optional[int] = None
    stride: Optional[int] = None
    # HumanEval execution
    timeout_s: float = 5.0
    memory_mb: int = 512
    n_workers: int = 2

    def __post_init__(self) -> None:
        for name in ("limit", "n_shot", "window", "stride"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "n_shot" else 1):
                raise UserError(f"{name} must be >= {0 if name == 'n_shot' else 1} (or null), got {value}")
        for name in ("max_new_tokens", "n_samples", "batch_size", "n_workers", "memory_mb"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.k_list or min(self.k_list) < 1:
            raise UserError(f"k_list must be a non-empty list of integers >= 1, got {self.k_list}")


# ----------------------------------------------------------------------------- command line

_FLAG_HELP = {
    "checkpoint": "checkpoint dir (full model or LoRA adapter)",
    "source": "hf | local | synthetic (default synthetic)",
    "data_path": "local copy of the eval set (with --source local)",
    "limit": "evaluate only the first N examples",
    "n_shot": "few-shot examples per prompt",
    "out_dir": "where the summary JSON and records JSONL go (default out/eval/<name>)",
    "max_new_tokens": "generation budget per answer",
    "temperature": "sampling temperature (0 = greedy)",
    "n_samples": "completions per task (HumanEval)",
    "text_path": "held-out corpus, .jsonl with 'text' or .txt (perplexity)",
    "device": "cpu, cuda, cuda:1 ... or auto",
}


def _flags_to_overrides(argv: Sequence[str]) -> list[str]:
    """Turn ``--key value`` / ``--key=value`` for a recipe key into the override ``key=value``."""
    names = {f.name for f in dataclasses.fields(EvalRecipe)}
    out, i = [], 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if key.split(".")[0] in names:  # also nested keys: --engine.max_num_seqs 4
            if not eq:
                if i + 1 >= len(argv):
                    raise UserError(f"--{key} needs a value (e.g. --{key} VALUE)")
                value, i = argv[i + 1], i + 1
            out.append(f"{key}={value}")
        else:
            out.append(arg)
        i += 1
    return out


def parse_eval_args(name: str, description: str, argv: Optional[Sequence[str]] = None) -> EvalRecipe:
    """The recipe from ``--config_path`` + overrides (``key=value``, ``--set key=value`` or ``--key value``)."""
    import sys

    def add_args(p: argparse.ArgumentParser) -> None:  # for --help only: flags are rewritten before parsing
        for key, text in _FLAG_HELP.items():
            p.add_argument(f"--{key}", help=text)

    argv = _flags_to_overrides(sys.argv[1:] if argv is None else argv)
    recipe, _ = parse_args(EvalRecipe, f"{description} Any recipe key can be given as --key value or key=value.",
                           argv, add_args=add_args)
    if not recipe.checkpoint:
        raise UserError(f"{name}: no checkpoint given; pass --checkpoint <dir> (a model or LoRA adapter "
                        f"checkpoint), or --config_path configs/examples/eval_{name}.yaml")
    return recipe


def out_dir(recipe: EvalRecipe, name: str) -> Path:
    return Path(recipe.out_dir) if recipe.out_dir else Path("out") / "eval" / name


# ----------------------------------------------------------------------------- model and tokenizer

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r} is not a torch device; use cpu, cuda, cuda:1 or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but CUDA is not available; use device=cpu")
    return device


def tokenizer_path_for(recipe: EvalRecipe) -> Optional[Path]:
    """recipe.tokenizer, else tokenizer.json beside the checkpoint, its adapter base, or data/tokenizer."""
    from utils.checkpoint import read_meta

    if recipe.tokenizer:
        if not Path(recipe.tokenizer).exists():
            raise UserError(f"tokenizer {recipe.tokenizer} does not exist; point tokenizer= at a tokenizer.json")
        return Path(recipe.tokenizer)
    ckpt = Path(recipe.checkpoint)
    base = recipe.base_checkpoint or (read_meta(ckpt).get("base_checkpoint") if ckpt.is_dir() else None)
    for candidate in (ckpt / "tokenizer.json", Path(base) / "tokenizer.json" if base else None, DEFAULT_TOKENIZER):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def load_tokenizer(recipe: EvalRecipe):
    """The project Tokenizer for the checkpoint; UserError naming where it looked."""
    from data_pipeline.tokenizer.tokenizer import Tokenizer

    if not Path(recipe.checkpoint).is_dir():
        raise UserError(f"checkpoint {recipe.checkpoint!r} does not exist; point --checkpoint at a directory "
                        "written by a training stage (e.g. runs/pretrain_tiny/final)")
    path = tokenizer_path_for(recipe)
    if path is None:
        raise UserError(f"no tokenizer.json in {recipe.checkpoint} (or its base checkpoint) nor at "
                        f"{DEFAULT_TOKENIZER}; pass tokenizer=<path to tokenizer.json>")
    return Tokenizer.from_file(path)


def load_model(recipe: EvalRecipe) -> torch.nn.Module:
    """The checkpoint's Transformer in eval mode on the recipe's device and dtype.

    A LoRA adapter dir is merged onto its base (finetune.sft.load_finetuned), so the
    model evaluated is exactly the one the adapter describes, with no adapter overhead.
    """
    from utils.checkpoint import load_model as load_full
    from utils.checkpoint import read_meta

    device = resolve_device(recipe.device)
    if read_meta(recipe.checkpoint).get("kind") == "adapter":
        from finetune.sft import load_finetuned

        model = load_finetuned(recipe.checkpoint, "cpu", recipe.base_checkpoint)
    else:
        model = load_full(recipe.checkpoint, "cpu")
    return model.to(device=device, dtype=DTYPES[recipe.dtype]).eval()


def load_model_and_tokenizer(recipe: EvalRecipe):
    """(model, tokenizer); checks that the tokenizer's ids fit the model's vocabulary."""
    tok = load_tokenizer(recipe)  # first: a missing tokenizer should fail before the weights load
    model = load_model(recipe)
    if tok.vocab_size > model.cfg.vocab_size:
        raise UserError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model's vocab_size is "
                        f"{model.cfg.vocab_size}; use the tokenizer the checkpoint was trained with")
    return model, tok


def make_engine(model: torch.nn.Module, tok, recipe: EvalRecipe):
    """The one generation engine (inference/engine.py) over `model`, with the recipe's settings."""
    from inference.engine import LLMEngine

    e = recipe.engine
    return LLMEngine(model, tokenizer=tok, device=next(model.parameters()).device,
                     max_num_seqs=e.max_num_seqs, max_num_batched_tokens=e.max_num_batched_tokens,
                     max_model_len=e.max_model_len, block_size=e.block_size,
                     enable_prefix_caching=e.enable_prefix_caching)


def context_length(model: torch.nn.Module, recipe: EvalRecipe) -> int:
    """Tokens the model may see at once: the engine's max_model_len, else the model's max_seq_len."""
    return min(recipe.engine.max_model_len or model.cfg.max_seq_len, model.cfg.max_seq_len)


def summary_header(name: str, recipe: EvalRecipe, started: float) -> dict:
    """The part of every summary that says what ran: eval, checkpoint, source, time, full recipe."""
    return {"eval": name, "checkpoint": str(recipe.checkpoint), "source": recipe.source,
            "seconds": round(time.time() - started, 2), "recipe": to_dict(recipe)}
