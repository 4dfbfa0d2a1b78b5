"""Bring a HuggingFace model in, hand a checkpoint back out.

    python model/hf_convert.py import --hf_dir path/to/hf_model --out runs/base          # HF dir -> our checkpoint
    python model/hf_convert.py import --hf_dir path/to/peft_lora --out runs/merged       # a PEFT adapter, merged
    python model/hf_convert.py export --checkpoint runs/sft/final --out exports/sft       # full model, or adapter merged
    python model/hf_convert.py export --checkpoint runs/sft_lora/final --out exports/lora --peft   # the adapter alone
    python model/hf_convert.py gguf --checkpoint runs/sft/final --out exports/sft.gguf --outtype q8_0  # llama.cpp, Ollama

Import is optional: every stage's ``init_from`` (and the server, the chat CLI, eval) also takes an
HF model directory as it is, through model/load.py; importing saves converting it each time.
Both directions carry the tokenizer: tokenizer.json, tokenizer_config.json (special tokens and the
chat template) and generation_config.json (the ids that end a reply), so
``AutoTokenizer.from_pretrained(export).apply_chat_template(...)`` renders what we trained on and
``AutoModelForCausalLM.from_pretrained(export)`` (and vLLM, llama.cpp's converter) load the weights.
A PEFT export writes ``adapter_model.safetensors`` + ``adapter_config.json`` for
``PeftModel.from_pretrained(base, export)``, where the base is the adapter's base exported as above.
A GGUF export (model/gguf_export.py) is one file with the weights, RoPE, tokenizer and chat template.
"""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
from pathlib import Path
from typing import Optional, Sequence

from utils.errors import UserError


def import_hf(hf_dir: str, out: str, base: Optional[str] = None) -> Path:
    """An HF model directory as one of our checkpoints (weights, config, the tokenizer's files); a PEFT
    LoRA adapter's directory is merged onto its base (the one its config names, or ``base``)."""
    from model.load import load_model, tokenizer_path
    from utils.checkpoint import save_checkpoint

    model = load_model(hf_dir, base=base)
    tok = tokenizer_path(hf_dir, base=base, required=False)
    return save_checkpoint(out, model, tokenizer_path=tok, meta={"source": "hf", "hf_dir": str(Path(hf_dir).resolve())})


def export(checkpoint: str, out: str, peft: bool = False, dtype: Optional[str] = None) -> Path:
    """A checkpoint (full, or an adapter merged onto its base) as an HF model directory; ``peft``:
    the adapter alone in PEFT's layout."""
    from model.hf_interop import write_hf
    from model.load import checkpoint_kind, load_model, load_tokenizer
    from utils.fs import atomic_dir

    kind = checkpoint_kind(checkpoint)
    if kind == "scalar_head":
        raise UserError(f"{checkpoint} is a reward model / critic; only language models export to the HF layout.")
    if peft and kind != "adapter":
        raise UserError(f"--peft exports an adapter, but {checkpoint} holds a full model (kind {kind!r}); drop --peft.")
    tok = load_tokenizer(checkpoint) if _has_tokenizer(checkpoint) else None
    with atomic_dir(out) as tmp:
        if peft:
            from model.lora import read_adapter_config
            from model.peft_export import write_peft_adapter

            write_peft_adapter(load_model(checkpoint, merge=False), read_adapter_config(checkpoint), tmp)
        else:
            model = load_model(checkpoint, dtype=dtype)
            write_hf(model, tmp)
            if model.cfg.vision is not None and tok is not None:  # a LLaVA: AutoProcessor's files too
                from model.hf_vision import write_llava_processor

                write_llava_processor(tmp, model.cfg, tok.id_to_token(model.cfg.vision["image_token_id"]))
        if tok is not None:
            tok.save_hf(tmp)
    return Path(out)


def _has_tokenizer(checkpoint: str) -> bool:
    from model.load import tokenizer_path

    return tokenizer_path(checkpoint, required=False) is not None


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Convert between HuggingFace model directories and checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF model directory -> checkpoint")
    imp.add_argument("--hf_dir", required=True, help="a HuggingFace model directory (config.json, *.safetensors, tokenizer files)")
    imp.add_argument("--out", required=True, help="checkpoint directory to write")
    imp.add_argument("--base_checkpoint", default=None, help="a PEFT adapter's base, when its config names another")
    exp = sub.add_parser("export", help="checkpoint -> HF model directory")
    exp.add_argument("--checkpoint", required=True, help="a checkpoint: full model, or a LoRA/QLoRA adapter (merged)")
    exp.add_argument("--out", required=True, help="HF directory to write")
    exp.add_argument("--peft", action="store_true", help="write the adapter alone, in PEFT's layout")
    exp.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="weights' dtype (default: as trained)")
    gg = sub.add_parser("gguf", help="checkpoint -> one GGUF file for llama.cpp / Ollama (llama architecture)")
    gg.add_argument("--checkpoint", required=True, help="a checkpoint: full model, or a LoRA/QLoRA adapter (merged)")
    gg.add_argument("--out", required=True, help="the .gguf file to write")
    gg.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                    help="matrix storage (norms stay f32); q8_0/q4_0: blocks of 32 with an f16 scale")
    args = parser.parse_args(argv)
    if args.command == "gguf":
        from model.gguf_export import export_gguf

        path = export_gguf(args.checkpoint, args.out, args.outtype)
        print(f"exported {args.checkpoint} -> {path} ({args.outtype}; run with llama.cpp: llama-cli -m {path})")
    elif args.command == "import":
        path = import_hf(args.hf_dir, args.out, args.base_checkpoint)
        print(f"imported {args.hf_dir} -> {path} (train from it with model.init_from={path})")
    else:
        path = export(args.checkpoint, args.out, args.peft, args.dtype)
        what = "PEFT adapter" if args.peft else "HF model"
        print(f"exported {args.checkpoint} -> {path} ({what}; load with transformers' "
              f"{'PeftModel.from_pretrained(base, path)' if args.peft else 'AutoModelForCausalLM.from_pretrained(path)'})")


if __name__ == "__main__":
    from utils.cli import main_guard

    main_guard(main)
