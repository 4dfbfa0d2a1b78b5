"""The pretraining recipe: the YAML of ``pretrain/train.py`` as typed dataclasses.

    model:  ModelConfig   (model/config.py)
    data:   train_bin, val_bin, tokenizer
    train:  TrainConfig   (utils/train_loop.py)
    optim:  OptimConfig   (utils/optim.py)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from model.config import ModelConfig
from utils.errors import UserError
from utils.optim import OptimConfig
from utils.train_loop import TrainConfig


@dataclass
class PretrainDataConfig:
    # {split}.bin + meta.json written by data_pipeline/processing/build_pretrain_bins.py
    train_bin: str = field(metadata={"path": "file"})
    val_bin: Optional[str] = field(default=None, metadata={"path": "file?"})  # val loss / perplexity when set
    # the tokenizer.json the bins were made with (hash checked), copied beside each checkpoint
    tokenizer: Optional[str] = field(default=None, metadata={"path": "file?"})


@dataclass
class PretrainRecipe:
    model: ModelConfig
    data: PretrainDataConfig
    train: TrainConfig
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if self.model.pos_emb == "learned" and self.train.seq_len > self.model.max_seq_len:
            raise UserError(f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len} "
                            "(learned positions have no embedding beyond it); lower seq_len or raise max_seq_len.")
