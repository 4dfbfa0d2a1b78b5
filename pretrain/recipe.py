"""The pretraining recipe: the YAML of ``pretrain/train.py`` as typed dataclasses.

    model:  ModelConfig   (model/config.py), or
    init_from: a checkpoint directory to continue pretraining from (its config and weights,
            loaded through model/load.py; a model section, if given, must agree with it)
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
from utils.train_config import TrainConfig


@dataclass
class PretrainDataConfig:
    # {split}.bin + meta.json written by data_pipeline/processing/build_pretrain_bins.py
    train_bin: str = field(metadata={"path": "file"})
    val_bin: Optional[str] = field(default=None, metadata={"path": "file?"})  # val loss / perplexity when set
    # the tokenizer.json the bins were made with (hash checked), copied beside each checkpoint
    tokenizer: Optional[str] = field(default=None, metadata={"path": "file?"})
    # true: a window's documents attend only to themselves (positions restart at each EOS-opened document)
    document_mask: bool = False


@dataclass
class PretrainRecipe:
    data: PretrainDataConfig
    train: TrainConfig
    model: Optional[ModelConfig] = None
    init_from: str = field(default="", metadata={"path": "dir?"})
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if self.init_from:
            self.model = self._checkpoint_model()
        elif self.model is None:
            raise UserError("the recipe needs a model section (the ModelConfig to train from scratch) or "
                            "init_from: <checkpoint dir> (continued pretraining).")
        if self.train.parallel.pp > 1 and self.data.document_mask:
            raise UserError("train.parallel.pp > 1 with data.document_mask: pipeline stages pass hidden states only, "
                            "not the per-document positions; set one of them off.")
        if self.train.seq_len > self.model.max_seq_len:  # positions past the context were never meant to be seen
            raise UserError(f"train.seq_len={self.train.seq_len} exceeds the model's context max_seq_len="
                            f"{self.model.max_seq_len}; lower train.seq_len or raise model.max_seq_len.")

    def _checkpoint_model(self) -> ModelConfig:
        """init_from's ModelConfig; a model section that says otherwise is an error naming both values."""
        from model.load import read_config

        stored = read_config(self.init_from)
        if self.model is not None:
            ours, theirs = self.model.to_dict(), stored.to_dict()
            diff = [k for k in ours if k != "extra" and ours[k] != theirs.get(k)]
            if diff:
                shown = "; ".join(f"model.{k}={ours[k]!r} but {self.init_from} has {theirs.get(k)!r}" for k in diff[:4])
                raise UserError(f"the model section contradicts init_from ({shown}); remove the model section "
                                "(the checkpoint's config is used) or make it match.")
        return stored
