"""The one map of where every data file lives under a data dir (default ``data/``).

Other stages build their paths from here, so a renamed file changes in one place.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataPaths:
    """Paths of the pipeline's files under ``root``."""

    root: Path

    @classmethod
    def of(cls, data_dir: str | os.PathLike = "data") -> DataPaths:
        return cls(Path(data_dir))

    # --- raw text written by the downloaders -------------------------------
    @property
    def raw(self) -> Path:
        return self.root / "raw"

    def stories(self, split: str) -> Path:
        """``{"text": str}`` per line; split is train or val."""
        return self.raw / f"stories_{split}.jsonl"

    def sft_raw(self, split: str) -> Path:
        """``{"messages": [{"role", "content"}, ...]}`` per line."""
        return self.raw / f"sft_{split}.jsonl"

    def preference_raw(self, split: str) -> Path:
        """``{"prompt": [messages], "chosen": str, "rejected": str}`` per line."""
        return self.raw / f"preference_{split}.jsonl"

    # --- tokenizer ----------------------------------------------------------
    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def tokenizer_json(self) -> Path:
        return self.tokenizer_dir / "tokenizer.json"

    # --- token arrays -------------------------------------------------------
    @property
    def tokens_stories(self) -> Path:
        """Encoded stories (per-document), written by encode_stories.py."""
        return self.root / "tokens" / "stories"

    @property
    def bins_pretrain(self) -> Path:
        return self.root / "bins" / "pretrain"

    @property
    def bins_sft(self) -> Path:
        return self.root / "bins" / "sft"

    @property
    def bins_preference(self) -> Path:
        return self.root / "bins" / "preference"

    # --- prompts and eval sets (written by download_prompts.py) ------------
    def rl_prompts(self, split: str) -> Path:
        """``{"question": str, "answer": str}`` per line; split is train or test."""
        return self.root / "prompts" / f"rl_{split}.jsonl"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def gsm8k_test(self) -> Path:
        return self.eval_dir / "gsm8k_test.jsonl"

    def mmlu(self, split: str) -> Path:
        """split is dev (few-shot examples) or test."""
        return self.eval_dir / "mmlu" / f"{split}.jsonl"

    @property
    def humaneval(self) -> Path:
        return self.eval_dir / "humaneval.jsonl"
