"""The tokenizer of an imported HuggingFace model: its ``tokenizer.json`` (HF ``tokenizers``), the
special tokens of ``tokenizer_config.json`` / ``special_tokens_map.json``, the end-of-turn ids of
``generation_config.json``, and its own Jinja chat template (``chat_template`` in
tokenizer_config.json, or ``chat_template.jinja`` beside it).

It offers the interface of the project's own Tokenizer (encode/decode, eos/bos/pad ids,
``render_chat``, ``chat_stop_ids``), so SFT masks, preference data, RL rollouts, the server, the
chat CLI and eval use the model's own format without knowing which kind they hold. Text is
encoded as transformers encodes it (``add_special_tokens=False``; special-token text in the
input becomes the special ids, as ``apply_chat_template`` also does).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import tokenizers

from data_pipeline.tokenizer.jinja_chat import render_template, token_mask
from data_pipeline.tokenizer.tokenizer_file import TokenizerFile, read_tokenizer_file
from utils.errors import UserError

CONFIG, SPECIAL_MAP, GENERATION, TEMPLATE_FILE = (
    "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja")
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); restore it from the model's original files.") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object; restore it from the model's original files.")
    return data


def _token_text(value: Any) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def read_chat_template(directory: Path, config: dict) -> Optional[str]:
    """The default chat template: chat_template.jinja, else tokenizer_config.json's chat_template
    (a string, or a list of named templates whose "default" wins)."""
    if (directory / TEMPLATE_FILE).is_file():
        return (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


class HFTokenizer(TokenizerFile):
    """A HuggingFace model's tokenizer and chat format (see the module docstring)."""

    def __init__(self, path: Path, hf: Optional[tokenizers.Tokenizer] = None):
        if hf is None:
            path, hf = read_tokenizer_file(path, "restore the model's tokenizer.json.")
        super().__init__(hf, path)
        directory = self.path.parent
        config = _read_json(directory / CONFIG)
        special = {**_read_json(directory / SPECIAL_MAP), **{k: v for k, v in config.items() if k in SPECIAL_KEYS}}
        self.special_tokens = {k: t for k, v in special.items() if k in SPECIAL_KEYS and (t := _token_text(v)) is not None}
        self.chat_template = read_chat_template(directory, config)
        self.eos_id = self._id_of("eos_token")
        self.bos_id = self._id_of("bos_token")
        pad = self._id_of("pad_token")
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        gen = _read_json(directory / GENERATION)
        stops = _ids(gen.get("eos_token_id")) + ([self.eos_id] if self.eos_id is not None else [])
        self.chat_stop_ids = list(dict.fromkeys(stops))  # generation_config's end-of-turn ids first, no repeats
        self.special_ids = frozenset(i for i, t in self._hf.get_added_tokens_decoder().items() if t.special)
        # Plain documents start as the model was pretrained: with BOS when it has one.
        self.document_prefix = [self.bos_id] if self.bos_id is not None else []

    def _id_of(self, key: str) -> Optional[int]:
        text = self.special_tokens.get(key)
        return None if text is None else self._hf.token_to_id(text)

    def save_hf(self, out: Path) -> None:
        """The model's tokenizer files as they came (tokenizer.json and its companions)."""
        import shutil

        for name in ("tokenizer.json", CONFIG, SPECIAL_MAP, GENERATION, TEMPLATE_FILE):
            if (self.path.parent / name).is_file():
                shutil.copyfile(self.path.parent / name, Path(out) / name)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False,
                    tools: Optional[list] = None) -> tuple[list[int], list[int]]:
        """(ids, assistant mask) of a conversation in the model's own template."""
        if not self.chat_template:
            raise UserError(f"{self.path.parent} has no chat template (tokenizer_config.json chat_template or "
                            "chat_template.jinja); this is a base model: use /v1/completions or plain text, or add a template.")
        text, spans = render_template(self.chat_template, messages, add_generation_prompt, tools, self.special_tokens)
        enc = self._hf.encode(text, add_special_tokens=False)
        return list(enc.ids), token_mask(enc.offsets, spans)

    def __repr__(self) -> str:
        return f"HFTokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size}, template={'yes' if self.chat_template else 'no'})"
