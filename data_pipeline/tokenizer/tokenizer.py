"""The project's tokenizer: a thin wrapper over an HF ``tokenizers.Tokenizer`` (byte-level BPE).

Special tokens are fixed (ids 0..4, in this order) so every stage can rely on them:

    <|endoftext|>  EOS and document separator in pretraining bins; also the pad id
    <|bos|>        starts every chat (see chat_template.render_chat)
    <|im_start|>   opens a chat message
    <|im_end|>     closes a chat message (the model learns to emit it to stop)
    <|pad|>        reserved for exports that want a distinct pad token

``encode`` never adds special tokens and never turns special-token *text* in
the input into special ids (user text cannot inject ``<|im_end|>``); only the
chat template places special ids.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import tokenizers

from data_pipeline.tokenizer.tokenizer_file import TokenizerFile, read_tokenizer_file
from utils.errors import UserError
from utils.fs import file_hash  # noqa: F401  (part of this module's API: bins record the tokenizer's hash)

SPECIAL_TOKENS = ["<|endoftext|>", "<|bos|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
EOS, BOS, IM_START, IM_END, PAD = SPECIAL_TOKENS


class Tokenizer(TokenizerFile):
    """Byte-level BPE tokenizer with the project's special tokens.

    Attributes: path (the tokenizer.json), hash (``file_hash`` of it, stored in
    every bin's meta.json), vocab_size (including special tokens), eos_id,
    bos_id, pad_id (== eos_id), im_start_id, im_end_id.
    """

    def __init__(self, hf: tokenizers.Tokenizer, path: Path):
        super().__init__(hf, path)
        self._hf.encode_special_tokens = True  # special-token text in input stays plain text
        ids = [hf.token_to_id(t) for t in SPECIAL_TOKENS]
        if ids != list(range(len(SPECIAL_TOKENS))):
            raise UserError(f"{path} does not have the special tokens {SPECIAL_TOKENS} at ids "
                            f"0..{len(SPECIAL_TOKENS) - 1} (found {ids}); retrain it with "
                            "python data_pipeline/tokenizer/train_tokenizer.py")
        self.eos_id, self.bos_id, self.im_start_id, self.im_end_id, self._pad_token_id = ids
        self.pad_id = self.eos_id
        self.special_ids = frozenset(ids)
        self.chat_stop_ids = [self.im_end_id, self.eos_id]  # what ends an assistant reply
        self.document_prefix = [self.eos_id]  # pretraining bins separate documents with EOS
        self.special_tokens = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS}

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer.json; UserError if it is missing or unreadable."""
        path, hf = read_tokenizer_file(path, "train it with python data_pipeline/tokenizer/train_tokenizer.py")
        return cls(hf, path)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False,
                    tools: list | None = None) -> tuple[list[int], list[int]]:
        """(ids, assistant mask) in the project's own chat format (chat_template.render_project_chat)."""
        from data_pipeline.tokenizer.chat_template import render_project_chat, with_tools

        return render_project_chat(self, with_tools(messages, tools), add_generation_prompt)

    def save_hf(self, out: str | os.PathLike) -> None:
        """tokenizer.json, tokenizer_config.json (special tokens, the chat format as a Jinja template),
        special_tokens_map.json and generation_config.json (stop ids) for transformers' AutoTokenizer."""
        import shutil

        shutil.copyfile(self.path, Path(out) / "tokenizer.json")
        hf_config_files(Path(out))
        generation = {"bos_token_id": self.bos_id, "eos_token_id": self.chat_stop_ids, "pad_token_id": self.pad_id}
        (Path(out) / "generation_config.json").write_text(json.dumps(generation, indent=1))

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size}, hash={self.hash!r})"


def hf_config_files(out: Path) -> None:
    """tokenizer_config.json + special_tokens_map.json of the project's tokenizer, for transformers'
    AutoTokenizer; the chat template is the project's format written in Jinja."""
    from data_pipeline.tokenizer.chat_template import HF_CHAT_TEMPLATE

    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
               "additional_special_tokens": [IM_START, IM_END, PAD]}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": 1_000_000, "chat_template": HF_CHAT_TEMPLATE, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=1))


def load_tokenizer(path: str | os.PathLike):
    """A tokenizer.json (or the directory holding it) -> the project's Tokenizer when it has the
    project's special tokens at ids 0..4 (trained by data_pipeline/tokenizer/train_tokenizer.py),
    else an imported model's HFTokenizer (its own special tokens and Jinja chat template)."""
    from data_pipeline.tokenizer.hf_tokenizer import HFTokenizer

    path, hf = read_tokenizer_file(path, "train one with python data_pipeline/tokenizer/train_tokenizer.py, "
                                         "or point at a model's tokenizer.json (restore it if it is damaged)")
    ours = [hf.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    return Tokenizer(hf, path) if ours else HFTokenizer(path, hf)
