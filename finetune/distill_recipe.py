"""The distillation recipe (2_distill.yaml): a teacher, a student, the data and the divergence.

    teacher: {init_from: runs/sft/final, logits: online}   # or logits: topk (cached once), quantize: nf4
    model: {init_from: runs/student/final}                 # the student: a checkpoint, or config: {ModelConfig}
    data: {bin_dir: data/bins/sft}                          # SFT data (bins or train_path), or train_bin: pretraining
    loss: {divergence: forward_kl, temperature: 1.0, kd_weight: 0.5}
    onpolicy: {ratio: 0.5, max_new_tokens: 64}             # GKD: share of batches the student samples itself
    train: {out_dir: runs/distill, max_steps: 300, batch_size: 8, seq_len: 256}
    lora: {r: 16, alpha: 32}                                # present -> the student trains adapters (qlora: NF4 base)

The sections ``model``, ``train``, ``lora`` and ``qlora`` mean what they mean in an SFT recipe
(finetune/recipe.py), so the student is built by SFT's own builder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from finetune.distill_losses import Divergence
from finetune.recipe import SFTDataConfig
from model.config import ModelConfig
from model.lora import LoRAConfig
from model.quant import QLoRAConfig
from utils.device import DType
from utils.errors import UserError
from utils.optim import OptimConfig
from utils.train_config import TrainConfig


@dataclass
class TeacherConfig:
    """Recipe section ``teacher``: the model whose next-token distribution the student learns."""

    init_from: str = field(metadata={"path": "dir"})  # our checkpoint (full or adapter) or an HF model dir
    dtype: DType = "auto"  # its weights: auto = bf16 on a GPU that has it, else fp32
    quantize: Literal["none", "nf4"] = "none"  # nf4: its linear layers stored in 4 bits (bitsandbytes)
    logits: Literal["online", "topk"] = "online"  # online: a teacher forward per batch; topk: computed once, cached
    top_k: int = 64  # tokens kept per position in the cache (with the mass of the rest)
    cache_dir: str = "data/cache"  # the top-k cache, one folder per (teacher, data, k, temperature)

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise UserError(f"teacher.top_k must be >= 1, got {self.top_k}.")


@dataclass
class StudentConfig:
    """Recipe section ``model``: the student, from a checkpoint (init_from) or new (config)."""

    init_from: str = field(default="", metadata={"path": "dir?"})  # a checkpoint or an HF model dir
    config: Optional[ModelConfig] = None  # a new model of this shape (distillation from scratch)
    max_seq_len: Optional[int] = None  # a longer context than init_from's ...
    rope_scaling: Optional[dict] = None  # ... with RoPE scaling (as in SFT)

    def __post_init__(self) -> None:
        if bool(self.init_from) == (self.config is not None):
            raise UserError("the student needs exactly one of model.init_from (a checkpoint to start from) and "
                            "model.config (a new model's ModelConfig, e.g. half the teacher's layers).")


@dataclass
class DistillDataConfig(SFTDataConfig):
    """Recipe section ``data``: SFT data as in an SFT recipe (bins, or your files with train_path),
    or pretraining bins with ``train_bin`` (random windows, every token counts)."""

    train_bin: str = field(default="", metadata={"path": "file?"})  # pretraining data instead of SFT data
    val_bin: str = field(default="", metadata={"path": "file?"})

    def __post_init__(self) -> None:
        if self.train_bin:
            if self.train_path:
                raise UserError("data sets both train_bin (pretraining windows) and train_path (SFT chats); keep one.")
            return
        if self.val_bin:
            raise UserError("data.val_bin is set without data.train_bin; set both (or neither, for SFT data).")
        super().__post_init__()

    @property
    def kind(self) -> str:
        return "pretrain" if self.train_bin else "sft"


@dataclass
class DistillLossConfig:
    """Recipe section ``loss``: loss = kd_weight * T^2 * D(teacher_T, student_T) + (1 - kd_weight) * CE."""

    divergence: Divergence = "forward_kl"  # forward_kl | reverse_kl | jsd (finetune/distill_losses.py)
    beta: float = 0.5  # jsd's mixture weight: 0 is forward KL, 1 reverse KL
    temperature: float = 1.0
    kd_weight: float = 0.5  # the divergence's share; the rest is the next-token loss on the data's tokens
    chunk_size: int = 0  # rows of logits at a time (0: about 8 chunks)

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta <= 1.0:
            raise UserError(f"loss.beta must be in [0, 1] (0: forward KL, 1: reverse KL), got {self.beta}.")
        if self.temperature <= 0:
            raise UserError(f"loss.temperature must be > 0, got {self.temperature}.")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise UserError(f"loss.kd_weight must be in [0, 1] (1: the divergence alone), got {self.kd_weight}.")


@dataclass
class OnPolicyConfig:
    """Recipe section ``onpolicy`` (GKD, Agarwal et al. 2024): a share of micro-batches are the
    student's own samples (through the engine) for the prompts of the data, scored by the teacher
    token by token; those batches carry the divergence alone (no next-token loss on its own samples)."""

    ratio: float = 0.0  # GKD's lambda: share of micro-batches sampled by the student (0: the data only)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_num_seqs: int = 64  # engine batch width
    block_size: int = 16  # engine KV block size

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise UserError(f"onpolicy.ratio must be in [0, 1], got {self.ratio}.")
        for name in ("max_new_tokens", "max_num_seqs", "block_size"):
            if getattr(self, name) < 1:
                raise UserError(f"onpolicy.{name} must be >= 1, got {getattr(self, name)}.")
        if self.temperature <= 0:
            raise UserError(f"onpolicy.temperature must be > 0 (the student samples), got {self.temperature}.")


@dataclass
class DistillRecipe:
    """``python finetune/distill_train.py --config_path 2_distill.yaml``."""

    teacher: TeacherConfig
    data: DistillDataConfig
    train: TrainConfig
    model: StudentConfig
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=20, weight_decay=0.0))
    lora: Optional[LoRAConfig] = None
    qlora: Optional[QLoRAConfig] = None
    format_eval_prompts: int = 64  # held-out arithmetic prompts answered by student (before, after) and teacher

    def __post_init__(self) -> None:
        if self.qlora is not None and self.lora is None:
            raise UserError("the recipe has a qlora section but no lora section; QLoRA trains LoRA adapters over a "
                            "4-bit base, so add lora: {r: 16, alpha: 32, targets: all-linear}.")
        if self.lora is not None and self.model.config is not None:
            raise UserError("a lora section needs a trained student (model.init_from): adapters over a new, random "
                            "model have nothing to adapt. Train it full-parameter, or start from a checkpoint.")
        if self.teacher.logits == "topk":
            if self.data.kind == "pretrain":
                raise UserError("teacher.logits=topk caches the teacher per SFT example; pretraining windows are drawn "
                                "at random offsets, so with data.train_bin use teacher.logits: online.")
            if self.data.pack:
                raise UserError("teacher.logits=topk holds the teacher's view of each example alone, so the rows must "
                                "be single examples: set data.pack: false (or use teacher.logits: online).")
        if self.onpolicy.ratio > 0 and self.data.kind == "pretrain":
            raise UserError("onpolicy.ratio > 0 samples answers to the prompts of SFT examples; pretraining windows "
                            "have none. Use SFT data (data.bin_dir or data.train_path) or onpolicy.ratio: 0.")
        if self.model.config is not None and self.train.seq_len > self.model.config.max_seq_len:
            raise UserError(f"train.seq_len={self.train.seq_len} exceeds the student's max_seq_len="
                            f"{self.model.config.max_seq_len}; lower train.seq_len or raise model.config.max_seq_len.")

    @property
    def mode(self) -> str:
        """full | lora | qlora, as SFT's builder reads it."""
        return "qlora" if self.qlora is not None else "lora" if self.lora is not None else "full"

    @property
    def out_dir(self) -> Path:
        return Path(self.train.out_dir)
