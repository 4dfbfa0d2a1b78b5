"""One door from a checkpoint directory to a ready model and the tokenizer that belongs to it.

    model, tok = load("runs/sft/final", device="auto", dtype="fp32")   # eval, engine, server, chat CLI
    policy = load_model(init_from, train=True)                         # align: a full checkpoint or an adapter (merged)
    base = load_model(base_dir, config=longer_context_cfg, train=True) # SFT: the base's weights in an extended config
    reward = load_model(reward_dir, expect="scalar_head")              # a reward model or PPO critic

Every stage and every inference command comes through here, so "what is in this directory?"
is asked in one place. A checkpoint directory (``utils/checkpoint.py`` layout) says what it
holds in ``meta.json``'s ``kind``:

    model        full weights of a Transformer
    adapter      LoRA (or QLoRA) matrices only, over the base named by ``base_checkpoint``;
                 the base may itself be an adapter (a LoRA policy trained over an SFT adapter)
    scalar_head  a reward model or critic: a Transformer backbone plus ``score_head``

and a HuggingFace model directory (``config.json`` + one or more ``*.safetensors``, no
model_config.json) is the kind ``hf``: converted on load by model/hf_interop.py, its tokenizer
(tokenizer.json, tokenizer_config.json, generation_config.json) read as an HFTokenizer. A PEFT
LoRA adapter's directory (``adapter_config.json`` + ``adapter_model.safetensors``) is the kind
``peft``: merged onto the base its config names (or ``base``) by model/peft_import.py.

An adapter is merged into its base on load by default (``merge=False`` keeps the LoRA layers,
e.g. to train them further). A QLoRA adapter is applied to the NF4-quantized base it was
trained against, so the merged weights are exactly the ones training saw.

The tokenizer rule, also one: an explicit path, else ``tokenizer.json`` in the directory,
else in the adapter's base (recursively), else a UserError saying how to pass one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from model.config import ModelConfig
from model.heads import KIND as SCALAR_HEAD
from model.heads import ScalarHeadModel, load_scalar_state
from model.transformer import Transformer
from utils.checkpoint import MODEL_CONFIG, TOKENIZER, WEIGHTS, load_into, load_weights, read_config_dict, read_meta
from utils.device import resolve_device, torch_dtype
from utils.errors import UserError

KINDS = ("model", "adapter", SCALAR_HEAD)
HF_CONFIG = "config.json"
PathLike = Union[str, os.PathLike]


def checkpoint_kind(path: PathLike) -> str:
    """``model`` | ``adapter`` | ``scalar_head`` | ``hf`` | ``peft`` for a checkpoint, a HuggingFace
    model directory or a PEFT LoRA adapter's (UserError when it is none of them)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {str(path)!r} does not exist; point at a directory written by a training stage "
                        "(e.g. runs/<name>/final or runs/<name>/step_00000100) or a HuggingFace model directory.")
    if not (path / MODEL_CONFIG).is_file() and (path / "adapter_config.json").is_file():
        if not (path / "adapter_model.safetensors").is_file():
            raise UserError(f"{path} has a PEFT adapter_config.json but no adapter_model.safetensors (adapter_model.bin "
                            "is not read: it is a pickle); save the adapter with safe_serialization.")
        return "peft"
    if not (path / MODEL_CONFIG).is_file() and (path / HF_CONFIG).is_file():
        if not any(path.glob("*.safetensors")):
            raise UserError(f"{path} has a config.json but no *.safetensors weights; download the model's safetensors "
                            "files (PyTorch .bin weights are not read: they are pickles).")
        return "hf"
    for name in (WEIGHTS, MODEL_CONFIG):
        if not (path / name).is_file():
            raise UserError(f"checkpoint {str(path)!r} has no {name}; it is incomplete or not a checkpoint directory.")
    kind = read_meta(path).get("kind", "model")
    if kind not in KINDS:
        raise UserError(f"{path / 'meta.json'} says kind={kind!r}, which is not one of {', '.join(KINDS)}; "
                        "the checkpoint is damaged or was written by another tool.")
    return kind


def read_config(path: PathLike) -> ModelConfig:
    """The ModelConfig stored beside the weights (model_config.json), or a HuggingFace
    directory's config.json mapped onto one, with clear errors."""
    kind = checkpoint_kind(path)
    if kind == "hf":
        from model.hf_interop import read_hf_config

        return read_hf_config(path)
    if kind == "peft":  # the base's (a merged adapter changes no shape, except a head trained untied)
        from model.peft_import import peft_base

        return read_config(peft_base(Path(path)))
    try:
        return ModelConfig.from_dict(read_config_dict(path))
    except (TypeError, ValueError) as err:  # e.g. "d_model": "big" fails in the size arithmetic
        raise UserError(f"{Path(path) / MODEL_CONFIG} holds an invalid model config ({err}); "
                        "the checkpoint is damaged or hand-edited.") from None


def adapter_base(path: PathLike, base: Optional[PathLike] = None) -> Path:
    """The directory an adapter was trained over: ``base`` if given, else its meta.json's record."""
    recorded = read_meta(path).get("base_checkpoint")
    chosen = base or recorded
    if not chosen:
        raise UserError(f"adapter {path} does not record its base checkpoint; pass the base model's directory "
                        "(base_checkpoint=<dir>).")
    if not Path(chosen).is_dir():
        raise UserError(f"adapter {path} was trained over {str(chosen)!r}, which does not exist here; pass the base "
                        "model's directory (base_checkpoint=<dir>), or run from the directory the training ran in.")
    return Path(chosen)


# ----------------------------------------------------------------------------- the model


def load_model(
    path: PathLike,
    *,
    device: Union[str, torch.device] = "cpu",
    dtype: Union[str, torch.dtype, None] = None,
    train: bool = False,
    merge: bool = True,
    config: Optional[ModelConfig] = None,
    base: Optional[PathLike] = None,
    expect: Optional[str] = None,
    weights: str = "full",
    group_size: int = 128,
) -> nn.Module:
    """The model a checkpoint directory describes, on ``device`` in ``dtype`` (None: as stored, fp32).

    train: train mode (else eval mode). merge: fold an adapter into its base (else keep LoRA layers).
    config: build the model from this ModelConfig instead of the stored one (same weight shapes;
    e.g. a longer context with RoPE scaling). base: an adapter's base directory when its
    meta.json's record is wrong here. expect: ``lm`` (a language model: full or adapter) or
    ``scalar_head``; anything else in the directory is a UserError naming what it holds.
    weights: ``full`` (as stored, in ``dtype``) or a low-precision format for inference, ``bf16 |
    int8 | int4`` (int4 in groups of ``group_size``), applied on the device (model/weight_formats.py).
    """
    kind = checkpoint_kind(path)
    _check_expected(path, kind, expect)
    if kind == "adapter":
        model = _load_adapter(Path(path), config, base, merge)
    elif kind in ("hf", "peft"):
        from model.hf_interop import load_hf_dir

        if kind == "peft" and not merge:
            raise UserError(f"{path} is a PEFT adapter, which is merged as it loads; train a new LoRA on the result.")
        state, cfg = load_hf_dir(path) if kind == "hf" else _load_peft(Path(path), base)
        model = Transformer(config or cfg)
        load_into(model, state, str(path))
    else:
        model = _build(kind, config or read_config(path))
        state = load_weights(path)
        if kind == SCALAR_HEAD:
            load_scalar_state(model, state, str(path))
        else:
            load_into(model, state, str(path))
    device = resolve_device(device) if isinstance(device, str) else device
    if isinstance(dtype, str):
        dtype = torch_dtype(dtype, device)
    quantized = any(type(m).__name__ == "Linear4bit" for m in model.modules())
    model = model.to(device) if dtype is None or quantized else model.to(device=device, dtype=dtype)
    if weights != "full":
        from model.weight_formats import apply_weight_format

        if train:
            raise UserError(f"weights={weights} is an inference format; training loads the model with weights=full.")
        apply_weight_format(model, weights, group_size)
    return model.train(train)


def _check_expected(path: PathLike, kind: str, expect: Optional[str]) -> None:
    if expect is None or (expect == "lm" and kind != SCALAR_HEAD) or expect == kind:
        return
    if expect == SCALAR_HEAD:
        raise UserError(f"{path} is a language-model checkpoint (kind {kind!r}), not a reward model; point at the "
                        "output of align/train_offline.py with algorithm: reward.")
    raise UserError(f"{path} is a reward model / critic (kind {kind!r}), not a language model; point at a "
                    "pretraining, SFT or alignment checkpoint.")


def _build(kind: str, cfg: ModelConfig) -> nn.Module:
    return ScalarHeadModel(Transformer(cfg)) if kind == SCALAR_HEAD else Transformer(cfg)


def _load_adapter(path: Path, config: Optional[ModelConfig], base: Optional[PathLike], merge: bool) -> nn.Module:
    """The adapter's base (itself loaded through this door, merged), quantized as in training
    for QLoRA, with the adapter applied and, if ``merge``, folded in."""
    from model.lora import load_lora, merge_and_unload, read_adapter_config

    read_adapter_config(path)  # a clear error when meta.json says adapter but holds no LoRA settings
    meta = read_meta(path)
    # The adapter's own config may extend the base's (long-context SFT); the base's weights fit it.
    model = load_model(adapter_base(path, base), config=config or read_config(path), expect="lm", train=False)
    if meta.get("qlora"):
        from model.quant import quantize_model

        quantize_model(model, meta.get("quantized") or "all-linear", torch.float32)
    load_lora(model, path)
    return merge_and_unload(model) if merge else model


def _load_peft(path: Path, base: Optional[PathLike]) -> tuple[dict, ModelConfig]:
    """(our state dict, ModelConfig) of a PEFT LoRA adapter's base with the adapter merged in
    (model/peft_import.py), in the base's HuggingFace names."""
    from model.hf_common import read_safetensors
    from model.hf_interop import from_hf, read_hf_json, read_hf_weights, to_hf
    from model.peft_import import PEFT_WEIGHTS, merge_peft, peft_base, read_peft_config

    cfg = read_peft_config(path)
    home = peft_base(path, base, cfg)
    if checkpoint_kind(home) == "hf":
        hf_state, hf_config = read_hf_weights(home), read_hf_json(home)
    else:  # one of our checkpoints, in the HF names of its family
        model = load_model(home, expect="lm")
        hf_state, hf_config = to_hf({k: v.detach() for k, v in model.state_dict().items()}, model.cfg)
    merged, untied = merge_peft(hf_state, read_safetensors(path / PEFT_WEIGHTS), cfg, str(path))
    return from_hf(merged, {**hf_config, "tie_word_embeddings": False} if untied else hf_config)


# ----------------------------------------------------------------------------- the tokenizer


def tokenizer_path(path: PathLike, override: Optional[PathLike] = None, base: Optional[PathLike] = None,
                   required: bool = True) -> Optional[Path]:
    """Where the checkpoint's tokenizer is (see the module docstring for the rule); None when
    there is none and ``required`` is false (a stage that only copies it along)."""
    if override:
        override = Path(override)
        if override.is_dir():
            override = override / TOKENIZER
        if not override.is_file():
            raise UserError(f"tokenizer {str(override)!r} does not exist; point it at a tokenizer.json.")
        return override
    kind = checkpoint_kind(path)
    if (Path(path) / TOKENIZER).is_file():
        return Path(path) / TOKENIZER
    if kind == "adapter":
        return tokenizer_path(adapter_base(path, base), required=required)
    if kind == "peft":
        from model.peft_import import peft_base

        return tokenizer_path(peft_base(Path(path), base), required=required)
    if not required:
        return None
    raise UserError(f"no {TOKENIZER} in {path}; checkpoints written with a tokenizer carry it beside the weights. "
                    "Pass the tokenizer the model was trained with (e.g. tokenizer=data/tokenizer/tokenizer.json).")


def load_tokenizer(path: PathLike, override: Optional[PathLike] = None, base: Optional[PathLike] = None) -> Any:
    """The tokenizer that belongs to the checkpoint at ``path`` (see ``tokenizer_path``): the project's
    own, or an imported model's (its special tokens and chat template, from the files beside it)."""
    from data_pipeline.tokenizer.tokenizer import load_tokenizer as load_tok

    return load_tok(tokenizer_path(path, override, base))


def load(path: PathLike, *, tokenizer: Optional[PathLike] = None, base: Optional[PathLike] = None,
         **kwargs: Any) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a checkpoint directory; ``kwargs`` go to ``load_model``.

    The tokenizer is found (or refused) before the weights load, and its ids must fit the
    model's vocabulary."""
    tok = load_tokenizer(path, tokenizer, base)
    model = load_model(path, base=base, **kwargs)
    check_vocab(tok, model.cfg)
    return model, tok


def check_vocab(tok: Any, cfg: ModelConfig) -> None:
    """UserError when the tokenizer has ids beyond the model's embedding."""
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model's vocab_size is "
                        f"{cfg.vocab_size}; use the tokenizer the checkpoint was trained with.")
