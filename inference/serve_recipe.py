"""Typed settings of the serving commands (the server and the terminal chat), read like every
other recipe by ``utils/config.py``: a YAML (``--config_path 5_serve.yaml``) plus overrides,
where every key is also a flag (``--port 9000``, ``--max-num-seqs 8``, ``port=9000``).

    recipe = parse_serve_args(argv)                 # ServeRecipe, validated
    engine, tokenizer = load_serving(recipe)        # through model/load.py: full checkpoints and adapters

Unknown keys are reported with the closest valid key, wrong types with what was expected,
all at once, before a model is loaded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence

from model.weight_formats import WeightFormat, check_settings
from utils.device import TORCH_DTYPES, DType
from utils.errors import UserError


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class ServingModel:
    """What is served and how it runs: the keys the server and the chat CLI share."""

    checkpoint: str = field(default="", metadata=_help("checkpoint directory: a full model or a LoRA/QLoRA adapter "
                                                         "(merged onto its base on load)"))
    tokenizer: Optional[str] = field(default=None, metadata=_help("tokenizer.json (default: the checkpoint's)"))
    base_checkpoint: Optional[str] = field(default=None, metadata=_help("an adapter's base, when the one its "
                                                                         "meta.json records is elsewhere"))
    device: str = field(default="auto", metadata=_help("auto | cpu | cuda | cuda:N (auto: cuda when available)"))
    dtype: DType = field(default="fp32", metadata=_help("fp32 | bf16 | fp16 | auto (bf16 on a GPU that has it)"))
    weights: WeightFormat = field(default="full", metadata=_help("linear weights for decode: full (as stored, in dtype) "
                                                                 "| bf16 | int8 (per row) | int4 (per group)"))
    group_size: int = field(default=128, metadata=_help("int4: weights sharing one scale and zero (32, 64, 128, 256)"))
    kv_cache_dtype: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata=_help(
        "KV cache storage: auto (the model's dtype) | fp32 | bf16 (half an fp32 model's cache)"))
    max_num_seqs: int = field(default=32, metadata=_help("sequences decoded together per step"))
    max_model_len: Optional[int] = field(default=None, metadata=_help("context length (default: the model's max_seq_len)"))
    draft_checkpoint: Optional[str] = field(default=None, metadata=_help("a small model with the same tokenizer: "
                                                                          "speculative decoding (same output, fewer target steps)"))
    num_speculative_tokens: int = field(default=4, metadata=_help("tokens the draft proposes per step"))

    def __post_init__(self) -> None:
        check_settings(self.weights, self.group_size)
        if self.max_num_seqs < 1:
            raise UserError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}.")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise UserError(f"max_model_len must be >= 1 (or null for the model's context), got {self.max_model_len}.")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise UserError(f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens}.")


@dataclass
class ServeRecipe(ServingModel):
    """``python inference/server.py --config_path serve.yaml`` (or the same keys as flags)."""

    host: str = field(default="127.0.0.1", metadata=_help("interface to listen on (0.0.0.0 exposes it to the network)"))
    port: int = 8000
    api_key: Optional[str] = field(default=None, metadata=_help("require 'Authorization: Bearer KEY' on /v1 "
                                                                 "(default: $LLM_API_KEY)"))
    model_name: Optional[str] = field(default=None, metadata=_help("name clients pass as 'model' (default: the "
                                                                    "checkpoint directory's name)"))
    max_concurrent: int = field(default=256, metadata=_help("requests in flight before answering 503"))
    max_tokens_cap: int = field(default=4096, metadata=_help("largest max_tokens a request may ask for"))
    clamp_max_tokens: bool = field(default=False, metadata=_help("lower a max_tokens that does not fit after the prompt "
                                                                  "to what fits (logged) instead of answering 400"))
    n_cap: int = field(default=8, metadata=_help("largest n (choices per request)"))
    max_body_bytes: int = field(default=1 << 20, metadata=_help("larger request bodies get 413"))
    shutdown_timeout: float = field(default=30.0, metadata=_help("seconds in-flight requests get to finish after SIGTERM"))
    log_level: str = "info"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_concurrent", "max_tokens_cap", "n_cap", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not 0 <= self.port < 65536:
            raise UserError(f"port must be in [0, 65535] (0: any free port), got {self.port}.")
        if self.shutdown_timeout < 0:
            raise UserError(f"shutdown_timeout must be >= 0 seconds, got {self.shutdown_timeout}.")
        self.api_key = self.api_key or os.environ.get("LLM_API_KEY") or None


@dataclass
class ChatRecipe(ServingModel):
    """``python inference/chat.py --checkpoint DIR`` (a streaming terminal chat)."""

    max_num_seqs: int = field(default=1, metadata=_help("one conversation: no batch to reserve KV blocks for"))
    system: Optional[str] = field(default=None, metadata=_help("system message that starts every conversation"))
    max_tokens: int = field(default=512, metadata=_help("longest reply in tokens"))
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stats: bool = field(default=False, metadata=_help("print prompt/generated tokens and speed after each reply (stderr)"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_tokens < 1:
            raise UserError(f"max_tokens must be >= 1, got {self.max_tokens}.")


def parse_serving_args(cls: type, description: str, argv: Optional[Sequence[str]] = None) -> Any:
    """A ServeRecipe / ChatRecipe from ``--config_path`` + flags/overrides; a checkpoint is required."""
    from utils.config import parse_args

    recipe, _ = parse_args(cls, description, argv, flags=True)
    if not recipe.checkpoint:
        raise UserError("no checkpoint given; pass --checkpoint <dir> (a model or LoRA adapter checkpoint) "
                        "or --config_path <serve.yaml> with a checkpoint key.")
    return recipe


def load_serving(recipe: ServingModel) -> tuple[Any, Any]:
    """(engine, tokenizer) for the recipe's checkpoint, through the one loader (model/load.py)."""
    from inference.engine import LLMEngine
    from model.load import load

    model, tokenizer = load(recipe.checkpoint, tokenizer=recipe.tokenizer, base=recipe.base_checkpoint,
                            device=recipe.device, dtype=recipe.dtype, expect="lm", weights=recipe.weights,
                            group_size=recipe.group_size)
    device = next(model.parameters()).device
    draft = None
    if recipe.draft_checkpoint:
        from inference.speculative import load_draft

        draft = load_draft(recipe.draft_checkpoint, model, tokenizer, device, recipe.dtype)
    engine = LLMEngine(model, tokenizer=tokenizer, device=device, max_num_seqs=recipe.max_num_seqs,
                       max_model_len=recipe.max_model_len, draft_model=draft,
                       num_speculative_tokens=recipe.num_speculative_tokens,
                       kv_cache_dtype=TORCH_DTYPES.get(recipe.kv_cache_dtype))
    return engine, tokenizer
