"""Recipes of the alignment stages: ``OfflineRecipe`` (2_{reward,dpo,orpo,kto,simpo}.yaml) and
``OnlineRecipe`` (3_rlhf_{ppo,grpo,gspo}.yaml, and rft).

Both share ``PolicyConfig`` (which checkpoint to start from, full-parameter or LoRA/QLoRA) and
the loop's ``train`` / ``optim`` sections. Everything is validated when the YAML is read,
before a model is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from model.lora import LoRAConfig
from model.quant import QLoRAConfig
from utils.errors import UserError
from utils.optim import OptimConfig
from utils.train_config import TrainConfig


@dataclass
class PolicyConfig:
    """Recipe section ``model``: the starting checkpoint and how it is trained."""

    init_from: str = field(metadata={"path": "dir"})  # SFT output: a full checkpoint, or an adapter (merged onto its base)
    tokenizer_path: str = field(default="", metadata={"path": "file?"})  # "" -> init_from/tokenizer.json
    lora: Optional[LoRAConfig] = None  # set -> only adapters train (the base stays frozen)
    qlora: Optional[QLoRAConfig] = None  # set (with lora) -> the frozen base is NF4 (bitsandbytes)

    def __post_init__(self) -> None:
        if self.qlora is not None and self.lora is None:
            raise UserError("model.qlora needs a model.lora section too (QLoRA trains LoRA adapters over a 4-bit base), "
                            "e.g. lora: {r: 16, alpha: 32, targets: all-linear}.")


# ----------------------------------------------------------------------------- offline


@dataclass
class PreferenceDataConfig:
    """Recipe section ``data``: preference pairs from the chat-format bins
    (data_pipeline/processing/build_preference_bins.py, splits train/val), or, when
    ``train_path`` is set, straight from JSONL rows ``{"prompt": [messages], "chosen", "rejected"}``."""

    bin_dir: str = "data/bins/preference"  # checked below, only when it is the source
    # set -> your own pairs instead of the bins: .jsonl/.json/.parquet, a save_to_disk folder or hf:<name>
    train_path: str = ""
    val_path: str = ""  # held-out pairs (needed with train_path)
    max_train_pairs: int = 0  # 0: all (the reference pass costs one forward per reply)
    max_val_pairs: int = 256  # held-out pairs for the accuracy report (0: all)
    fields: dict = field(default_factory=dict)  # rename TRL fields, e.g. {prompt: question, chosen: good}
    on_bad_row: Literal["error", "skip"] = "error"  # error names the file and line; skip counts them

    def __post_init__(self) -> None:
        if self.train_path and not self.val_path:
            raise UserError("data.train_path is set but data.val_path is not; held-out pairs are needed for the "
                            "preference-accuracy report (or drop train_path to read data.bin_dir).")
        if not self.train_path and not Path(self.bin_dir or ".").joinpath("meta.json").is_file():
            raise UserError(f"data.bin_dir={self.bin_dir!r} holds no preference bins; build them with "
                            "data_pipeline/processing/build_preference_bins.py, or set data.train_path and "
                            "data.val_path to JSONL files.")

    @property
    def source(self) -> str:
        return "jsonl" if self.train_path else "bins"


@dataclass
class OfflineLossConfig:
    """Recipe section ``loss``: hyper-parameters of the offline objectives (paper names)."""

    beta: float = 0.1  # DPO / KTO inverse temperature; SimPO's beta (the paper uses ~2)
    label_smoothing: float = 0.0  # DPO: conservative DPO epsilon
    dpo_loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    orpo_lambda: float = 0.1  # weight of ORPO's odds-ratio term
    simpo_gamma: float = 0.5  # SimPO target margin
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise UserError(f"loss.beta must be positive, got {self.beta}.")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise UserError(f"loss.label_smoothing must be in [0, 0.5), got {self.label_smoothing}.")


@dataclass
class OfflineRecipe:
    """``python align/train_offline.py --config_path 2_<algorithm>.yaml``."""

    algorithm: Literal["reward", "dpo", "orpo", "kto", "simpo"]
    model: PolicyConfig
    train: TrainConfig
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    loss: OfflineLossConfig = field(default_factory=OfflineLossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-6, warmup_steps=10, weight_decay=0.0))

    def __post_init__(self) -> None:
        data_parallel_only(self.train)


def data_parallel_only(train: TrainConfig) -> None:
    """Alignment runs DDP / FSDP2: its policy, reference and engine rollouts are whole models per process."""
    if train.parallel.model_parallel:
        raise UserError("train.parallel (tp/pp > 1) is built for pretraining and full SFT; alignment trains with "
                        "train.distributed=ddp or fsdp. Set train.parallel.tp and pp to 1.")


# ----------------------------------------------------------------------------- online


@dataclass
class RolloutConfig:
    """Recipe section ``rollout``: prompts and how completions are sampled (through the engine)."""

    # prompts with reference answers: .jsonl/.json/.parquet, a save_to_disk folder or hf:<name>; rows
    # {"question": str | [messages], "answer": "... #### 42"} (renamed with fields)
    train_prompts: str = "data/prompts/rl_train.jsonl"
    test_prompts: str = "data/prompts/rl_test.jsonl"  # "" -> no held-out accuracy
    fields: dict = field(default_factory=dict)  # e.g. {question: problem, answer: solution}
    prompts_per_rollout: int = 8  # per process; with group_size G the buffer holds prompts x G rows
    group_size: int = 4  # completions per prompt (GRPO/GSPO/RFT groups; PPO may use 1)
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_num_seqs: int = 64  # engine batch width
    block_size: int = 16  # engine KV block size
    eval_prompts: int = 64  # held-out test prompts for the exact-accuracy eval (0: none)

    def __post_init__(self) -> None:
        for name in ("prompts_per_rollout", "group_size", "max_new_tokens", "max_num_seqs", "block_size"):
            if getattr(self, name) < 1:
                raise UserError(f"rollout.{name} must be >= 1, got {getattr(self, name)}.")
        if self.temperature <= 0:
            raise UserError(f"rollout.temperature must be > 0 for RL sampling (greedy rollouts give identical "
                            f"group members and no learning signal), got {self.temperature}.")


@dataclass
class RewardConfig:
    """Recipe section ``reward``: a rule by name (align.rewards) or a reward-model checkpoint."""

    function: str = "gsm8k_combined"
    model_path: str = field(default="", metadata={"path": "dir?"})  # set -> scores come from this reward-model checkpoint

    def __post_init__(self) -> None:
        if not self.model_path:
            from align.rewards import get_reward_fn

            get_reward_fn(self.function)  # UserError with the closest name


@dataclass
class RLConfig:
    """Recipe section ``rl``: the objective's hyper-parameters. None picks the algorithm's default."""

    epochs: int = 1  # optimisation passes over each rollout buffer (PPO's K epochs)
    clip_eps: Optional[float] = None  # ppo/grpo 0.2; gspo 3e-4 (sequence ratio is a geometric mean)
    clip_eps_high: Optional[float] = None  # DAPO clip-higher; gspo default 4e-4
    kl_beta: float = 0.04  # GRPO: weight of the k3 KL to the reference in the loss
    kl_coef: float = 0.05  # PPO: per-token KL penalty in the reward
    aggregation: Literal["token", "sequence"] = "token"  # GRPO loss aggregation
    scale_rewards: bool = True  # GRPO/GSPO: divide by the group std (False: Dr. GRPO)
    gamma: float = 1.0  # PPO GAE discount
    lam: float = 0.95  # PPO GAE lambda
    vf_coef: float = 0.1  # PPO value-loss weight
    vf_clip: float = 0.2  # PPO value clipping
    whiten_advantages: bool = True  # PPO
    critic_init: str = field(default="", metadata={"path": "dir?"})  # PPO critic: reward-model checkpoint; "" -> policy backbone
    rft_min_reward: float = 0.5  # RFT keeps a group's best only when its reward reaches this

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise UserError(f"rl.epochs must be >= 1, got {self.epochs}.")

    def clip(self, algorithm: str) -> tuple[float, Optional[float]]:
        if algorithm == "gspo":
            return (3e-4 if self.clip_eps is None else self.clip_eps), (4e-4 if self.clip_eps_high is None else self.clip_eps_high)
        return (0.2 if self.clip_eps is None else self.clip_eps), self.clip_eps_high


@dataclass
class OnlineRecipe:
    """``python align/train_online.py --config_path 3_rlhf_<algorithm>.yaml``.

    One optimizer step = train.global_batch_size rows (default: train.batch_size). Steps per
    rollout = rl.epochs * buffer rows / rows per step; train.max_steps sets the run length.
    """

    algorithm: Literal["ppo", "grpo", "gspo", "rft"]
    model: PolicyConfig
    train: TrainConfig
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, warmup_steps=0, weight_decay=0.0, schedule="constant"))

    def __post_init__(self) -> None:
        data_parallel_only(self.train)
        if self.algorithm in ("grpo", "gspo", "rft") and self.rollout.group_size < 2:
            raise UserError(
                f"{self.algorithm} compares the completions of one prompt, so rollout.group_size must be 2 or more "
                f"(got {self.rollout.group_size}); 4 to 16 is typical"
            )

    @property
    def buffer_rows(self) -> int:
        """Rows one rollout phase leaves to train on, per process."""
        groups = self.rollout.prompts_per_rollout
        return groups if self.algorithm == "rft" else groups * self.rollout.group_size
