"""What the project's tokenizer and an imported model's tokenizer share: a ``tokenizer.json`` read
by HF ``tokenizers``, and the text <-> id calls over it. The two subclasses differ in their special
tokens and chat format (tokenizer.py, hf_tokenizer.py)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import tokenizers

from utils.errors import UserError
from utils.fs import file_hash


def read_tokenizer_file(path: str | os.PathLike, fix: str) -> tuple[Path, tokenizers.Tokenizer]:
    """(the tokenizer.json path, its loaded tokenizer) of a file or the directory holding it;
    UserError naming ``fix`` when it is missing or unreadable."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"tokenizer file {path} does not exist; {fix}")
    try:
        return path, tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001  (the Rust loader raises a plain Exception)
        raise UserError(f"cannot read tokenizer {path} ({err}); {fix}") from None


class TokenizerFile:
    def __init__(self, hf: tokenizers.Tokenizer, path: Path):
        self._hf, self.path, self.hash = hf, Path(path), file_hash(path)

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens added."""
        if not isinstance(text, str):
            raise UserError(f"can only encode str, got {type(text).__name__}")
        try:
            return self._hf.encode(text, add_special_tokens=False).ids
        except TypeError:
            raise UserError("text is not valid Unicode (it holds a lone surrogate, e.g. from "
                            "decoding bytes with errors='surrogateescape'); fix the input text") from None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode`` for many texts at once."""
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped unless ``skip_special_tokens=False``."""
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._hf.token_to_id(token)

    def id_to_token(self, idx: int) -> Optional[str]:
        return self._hf.id_to_token(idx)
