"""Recipe section ``train`` (every training stage): where, how long, what batch, which device.

Its own module so the loop (utils/train_loop.py) and the run state it saves and resumes
(utils/train_state.py) both read it without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from utils.device import DType
from utils.errors import UserError
from utils.spike import SpikeConfig


@dataclass
class ParallelConfig:
    """Recipe section ``train.parallel``: how the processes torchrun starts split the work, on a
    DeviceMesh of (pp, dp, tp) = world size (utils/distributed.py).

    tp: tensor parallelism, each block's matmuls split over tp ranks (model/tensor_parallel.py)
    pp: pipeline parallelism, the blocks cut into pp stages run as a ``pp_schedule`` pipeline
        whose micro-batches are the step's gradient-accumulation micro-batches (utils/pipeline.py)
    dp: data parallelism over the rest (0: world / (tp * pp)), by train.distributed: fsdp shards
        (with tp: FSDP2 x TP on a 2-D mesh), ddp replicates (tp: 1 only)
    """

    tp: int = 1
    pp: int = 1
    dp: int = 0
    pp_schedule: Literal["1f1b", "gpipe"] = "1f1b"

    def __post_init__(self) -> None:
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise UserError(f"train.parallel.{name} must be >= 1 (1: off), got {getattr(self, name)}.")
        if self.dp < 0:
            raise UserError(f"train.parallel.dp must be >= 0 (0: the processes tp and pp leave), got {self.dp}.")

    @property
    def model_parallel(self) -> bool:
        return self.tp > 1 or self.pp > 1


@dataclass
class TrainConfig:
    """Recipe section ``train``."""

    out_dir: str
    max_steps: int
    batch_size: int  # micro-batch rows per process
    seq_len: int
    global_batch_tokens: Optional[int] = None  # tokens per optimizer step over all processes
    global_batch_size: Optional[int] = None  # or: rows per optimizer step over all processes
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 20  # micro-batches per evaluation (>= 1)
    save_every: int = 0  # 0: checkpoint only at the end (and on Ctrl-C)
    keep_last: int = 2  # step checkpoints kept (0: keep all); the newest healthy one is never pruned
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N (utils/device.py); torchrun: one GPU per process
    dtype: DType = "auto"  # autocast dtype; auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False
    distributed: Literal["none", "ddp", "fsdp"] = "none"  # the data-parallel engine (torchrun; see parallel.dp)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # tensor / pipeline parallelism
    resume: str = "auto"  # "auto" (latest in out_dir) | "never" | path to a step checkpoint
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    tensorboard: bool = False
    peak_flops: Optional[float] = None  # per-device peak FLOPs/s for MFU; None: device table
    progress: bool = True  # tqdm bar on rank 0
    aux_loss: bool = True  # add the model's auxiliary loss (MoE balance, model/loss.py); false: CE only

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "seq_len"):
            if getattr(self, name) <= 0:
                raise UserError(f"train.{name} must be positive, got {getattr(self, name)}.")
        if self.global_batch_tokens is not None and self.global_batch_size is not None:
            raise UserError("train: set global_batch_tokens or global_batch_size, not both.")
        for name in ("log_every", "eval_batches"):
            if getattr(self, name) <= 0:
                raise UserError(f"train.{name} must be positive, got {getattr(self, name)}.")
        for name, zero in (("eval_every", "evaluate only at the end"), ("save_every", "checkpoint only at the end"),
                           ("keep_last", "keep every checkpoint")):
            if getattr(self, name) < 0:
                raise UserError(f"train.{name} must be >= 0 (0: {zero}), got {getattr(self, name)}.")
