"""What the four eval scripts share: the recipe, the command line, model/tokenizer loading, the engine.

    recipe = parse_eval_args("gsm8k", "GSM8K accuracy", argv)      # --checkpoint ... or --config_path ...
    model, tok = load_model_and_tokenizer(recipe)                 # full checkpoint or LoRA adapter dir
    engine = make_engine(model, tok, recipe)                      # the one generation engine

Every recipe key is also a flag: ``--limit 20`` means the override ``limit=20``, so
``--checkpoint runs/x/final`` and ``checkpoint=runs/x/final`` are the same thing, and a
YAML recipe (``--config_path configs/examples/eval_gsm8k.yaml``) can be overridden either way.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch

from model.weight_formats import WeightFormat, check_settings
from utils.config import parse_args, to_dict
from utils.device import TORCH_DTYPES, DType
from utils.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class EngineSettings:
    """LLMEngine arguments (inference/engine.py); max_model_len None = the model's max_seq_len."""

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_model_len: Optional[int] = None
    block_size: int = 16
    enable_prefix_caching: bool = True  # few-shot prompts share their prefix: computed once
    draft_checkpoint: Optional[str] = None  # speculative decoding: a small model with the same tokenizer
    num_speculative_tokens: int = 4
    kv_cache_dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: the model's dtype


@dataclass
class EvalRecipe:
    """One recipe type for all four evals; each script reads the keys it needs.

    None for n_shot / out_dir / window / stride means "the script's default"
    (GSM8K 5 shots, MMLU 5 shots, out/eval/<name>, the model's context, window // 2).
    """

    checkpoint: str = ""  # model checkpoint dir, or a LoRA adapter dir (merged onto its base)
    base_checkpoint: Optional[str] = None  # an adapter's base when its meta.json's record is wrong here
    tokenizer: Optional[str] = None  # default: tokenizer.json in the checkpoint (or its adapter base)
    # where the eval set comes from; unset: local when data_path is given, else synthetic
    source: Optional[Literal["hf", "local", "synthetic"]] = None
    data_path: Optional[str] = None  # your copy of the set in its original layout (source local)
    limit: Optional[int] = None  # first N examples (MMLU: per subject; perplexity: documents)
    n_shot: Optional[int] = None
    shots_path: Optional[str] = None  # GSM8K few-shot problems (jsonl question/answer); default per source
    out_dir: Optional[str] = None
    seed: int = 0
    with_images: bool = True  # visual QA: false asks the questions without their images (a text-only baseline)
    progress: bool = True
    device: str = "auto"  # auto | cpu | cuda | cuda:N (auto: cuda when available)
    dtype: DType = "fp32"  # auto: bf16 on a GPU that has it
    weights: WeightFormat = "full"  # linear weights: full (as stored) | bf16 | int8 | int4 (model/weight_formats.py)
    group_size: int = 128  # int4: weights sharing one scale and zero (32, 64, 128, 256)
    # generation (GSM8K, HumanEval)
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    calculator: bool = False  # GSM8K: the model's "<<expression=" is answered by the calculator (inference/calculator.py)
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
    sandbox: Literal["auto", "bwrap", "python"] = "auto"  # auto: bubblewrap when installed (eval/humaneval_exec.py)

    def __post_init__(self) -> None:
        check_settings(self.weights, self.group_size)
        if self.source is None:
            self.source = "local" if self.data_path else "synthetic"
        elif self.data_path and self.source != "local":
            raise UserError(f"data_path {self.data_path} with source {self.source}: a data path is read only with "
                            f"source local; drop the source (a data path alone means local) or set source local")
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

def parse_eval_args(name: str, description: str, argv: Optional[Sequence[str]] = None) -> EvalRecipe:
    """The recipe from ``--config_path`` + overrides (``key=value``, ``--set key=value`` or ``--key value``)."""
    recipe, _ = parse_args(EvalRecipe, f"{description} Any recipe key can be given as --key value or key=value.",
                           argv, flags=True)
    if not recipe.checkpoint:
        raise UserError(f"{name}: no checkpoint given; pass --checkpoint <dir> (a model or LoRA adapter "
                        f"checkpoint), or --config_path configs/examples/eval_{name}.yaml")
    return recipe


def out_dir(recipe: EvalRecipe, name: str) -> Path:
    return Path(recipe.out_dir) if recipe.out_dir else Path("out") / "eval" / name


# ----------------------------------------------------------------------------- model and tokenizer

def load_tokenizer(recipe: EvalRecipe):
    """The checkpoint's tokenizer (model/load.py's rule; recipe.tokenizer overrides)."""
    from model.load import load_tokenizer as load_tok

    return load_tok(recipe.checkpoint, recipe.tokenizer, recipe.base_checkpoint)


def load_model(recipe: EvalRecipe) -> torch.nn.Module:
    """The checkpoint's model in eval mode on the recipe's device and dtype, through the one
    loader: a LoRA/QLoRA adapter is merged onto its base, so the model evaluated is exactly the
    one the adapter describes, with no adapter overhead."""
    from model.load import load_model as load

    return load(recipe.checkpoint, device=recipe.device, dtype=recipe.dtype, base=recipe.base_checkpoint, expect="lm",
                weights=recipe.weights, group_size=recipe.group_size)


def load_model_and_tokenizer(recipe: EvalRecipe):
    """(model, tokenizer); the tokenizer is checked first and must fit the model's vocabulary."""
    from model.load import load

    return load(recipe.checkpoint, tokenizer=recipe.tokenizer, base=recipe.base_checkpoint, device=recipe.device,
                dtype=recipe.dtype, expect="lm", weights=recipe.weights, group_size=recipe.group_size)


def make_engine(model: torch.nn.Module, tok, recipe: EvalRecipe):
    """The one generation engine (inference/engine.py) over `model`, with the recipe's settings."""
    from inference.engine import LLMEngine

    e = recipe.engine
    device = next(model.parameters()).device
    draft = None
    if e.draft_checkpoint:
        from inference.speculative import load_draft

        draft = load_draft(e.draft_checkpoint, model, tok, device, recipe.dtype)
    return LLMEngine(model, tokenizer=tok, device=device, max_num_seqs=e.max_num_seqs,
                     max_num_batched_tokens=e.max_num_batched_tokens, max_model_len=e.max_model_len,
                     block_size=e.block_size, enable_prefix_caching=e.enable_prefix_caching, draft_model=draft,
                     num_speculative_tokens=e.num_speculative_tokens, kv_cache_dtype=TORCH_DTYPES.get(e.kv_cache_dtype))


def context_length(model: torch.nn.Module, recipe: EvalRecipe) -> int:
    """Tokens the model may see at once: the engine's max_model_len, else the model's max_seq_len."""
    return min(recipe.engine.max_model_len or model.cfg.max_seq_len, model.cfg.max_seq_len)


def summary_header(name: str, recipe: EvalRecipe, started: float) -> dict:
    """The part of every summary that says what ran: eval, checkpoint, source, time, full recipe."""
    return {"eval": name, "checkpoint": str(recipe.checkpoint), "source": recipe.source,
            "seconds": round(time.time() - started, 2), "recipe": to_dict(recipe)}


def engine_summary(generate) -> dict:
    """What a summary records of the engine a ``generate`` ran on (speculative decoding's acceptance rate)."""
    rate = getattr(getattr(generate, "engine", None), "acceptance_rate", None)
    return {} if rate is None else {"speculative_acceptance_rate": round(rate, 4)}
