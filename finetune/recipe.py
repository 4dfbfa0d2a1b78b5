"""The SFT recipe: one dataclass family for full SFT, LoRA and QLoRA (1_sft_{full,lora,qlora}.yaml).

    model: {init_from: runs/pretrain/final}   # a checkpoint (or an HF model dir), rebuilt from its config
    data: {bin_dir: data/bins/sft}            # or train_path: my_chats.jsonl (messages, ShareGPT, Alpaca; cached)
    train: {out_dir: runs/sft, max_steps: 300, batch_size: 8, seq_len: 512}
    optim: {lr: 2e-4, warmup_steps: 20}
    lora: {r: 16, alpha: 32, targets: all-linear}     # present -> LoRA (adapters only train)
    qlora: {compute_dtype: auto}                       # present (with lora) -> the base is NF4
    # long-context SFT beyond the base's: model: {init_from: ..., max_seq_len: 2048, rope_scaling: {type: yarn, factor: 4.0}}

Which of the three a recipe is follows from its sections (``SFTRecipe.mode``); each entry
script checks that it was given its own kind.
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

MODES = {"full": "finetune/sft_train.py", "lora": "finetune/peft/lora/sft_lora_train.py",
         "qlora": "finetune/peft/qlora/sft_qlora_train.py"}


@dataclass
class SFTDataConfig:
    """Recipe section ``data``: the chat-format token bins (data_pipeline/processing/build_sft_bins.py),
    or your own files with ``train_path`` (rendered in the model's chat format, cached by content)."""

    bin_dir: str = "data/bins/sft"  # read when train_path is not set
    tokenizer: str = field(default="", metadata={"path": "file?"})  # "" -> the base checkpoint's tokenizer
    pack: bool = True  # pack short conversations into full rows ...
    document_mask: bool = True  # ... each attending only to itself (false: later examples see earlier ones)
    val_split: str = "val"
    # Your own data (data_pipeline/user_data.py): a .jsonl/.json/.parquet file, a datasets save_to_disk
    # folder, or hf:<dataset name> when online; rows in OpenAI messages, ShareGPT or Alpaca form.
    train_path: str = ""
    val_path: str = ""  # "" -> every 50th row of train_path is held out
    format: Literal["auto", "messages", "sharegpt", "alpaca"] = "auto"
    fields: dict = field(default_factory=dict)  # rename fields, e.g. {messages: dialog, role: speaker}
    on_bad_row: Literal["error", "skip"] = "error"  # error names the file and line; skip counts them
    long_examples: Literal["truncate", "drop"] = "truncate"  # examples longer than train.seq_len + 1
    cache_dir: str = "data/cache"  # tokenized train_path data, one folder per content hash

    def __post_init__(self) -> None:
        if not self.train_path and not Path(self.bin_dir).is_dir():
            raise UserError(f"data.bin_dir={self.bin_dir!r} does not exist; build the SFT bins with "
                            "data_pipeline/processing/build_sft_bins.py, or set data.train_path to your own data file.")
        if self.val_path and not self.train_path:
            raise UserError("data.val_path is set without data.train_path; set both (or neither, to read data.bin_dir).")
        from data_pipeline.user_data import field_names

        field_names(self.fields)  # unknown field names fail with the recipe, not mid-run


@dataclass
class SFTModelConfig:
    """Recipe section ``model``: what SFT starts from, and (long-context SFT) how its context grows."""

    init_from: str = field(default="", metadata={"path": "dir?"})  # a checkpoint (full or adapter) or an HF model dir
    max_seq_len: Optional[int] = None  # a context longer than the base's ...
    rope_scaling: Optional[dict] = None  # ... with RoPE scaling applied to its ModelConfig (e.g. {type: yarn, factor: 4})


@dataclass
class SFTRecipe:
    data: SFTDataConfig
    train: TrainConfig
    model: SFTModelConfig = field(default_factory=SFTModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=20, weight_decay=0.0))
    lora: Optional[LoRAConfig] = None
    qlora: Optional[QLoRAConfig] = None
    format_eval_prompts: int = 64  # held-out arithmetic prompts for the '#### <n>' format rate (0: skip)
    # Older spellings of model.init_from / model.max_seq_len / model.rope_scaling, still read.
    base_checkpoint: str = field(default="", metadata={"path": "dir?"})
    max_seq_len: Optional[int] = None
    rope_scaling: Optional[dict] = None

    def __post_init__(self) -> None:
        for old, new in (("base_checkpoint", "init_from"), ("max_seq_len", "max_seq_len"), ("rope_scaling", "rope_scaling")):
            value = getattr(self, old)
            if value in (None, ""):
                continue
            if getattr(self.model, new) not in (None, ""):
                raise UserError(f"the recipe sets both {old} and model.{new}; keep model.{new} ({old} is its older name).")
            setattr(self.model, new, value)
        if not self.model.init_from:
            raise UserError("the recipe needs model.init_from: the checkpoint or HuggingFace model directory to "
                            "finetune (e.g. runs/pretrain/final).")
        self.base_checkpoint = self.model.init_from  # one value, whichever spelling the recipe used
        if self.qlora is not None and self.lora is None:
            raise UserError("the recipe has a qlora section but no lora section; QLoRA trains LoRA adapters "
                            "over a 4-bit base, so add lora: {r: 16, alpha: 32, targets: all-linear}.")
        if self.qlora is not None and self.train.distributed == "fsdp":
            raise UserError("QLoRA with train.distributed=fsdp: FSDP2 cannot shard bitsandbytes' packed 4-bit weights; "
                            "use train.distributed=ddp (each GPU holds the small NF4 base) or LoRA with fsdp.")
        if self.train.parallel.pp > 1:
            raise UserError("train.parallel.pp > 1 is built for pretraining (a pipeline runs the next-token loss on its "
                            "last stage); SFT takes tp (full SFT) and fsdp/ddp. Set train.parallel.pp: 1.")
        if self.train.parallel.tp > 1 and self.lora is not None:
            raise UserError("train.parallel.tp > 1 with LoRA/QLoRA: tensor parallelism is built for full fine-tuning; "
                            "use train.distributed=ddp (QLoRA) or fsdp (LoRA) for adapters.")
        if self.model.max_seq_len is not None and self.model.max_seq_len <= 0:
            raise UserError(f"model.max_seq_len must be positive, got {self.model.max_seq_len}.")

    @property
    def mode(self) -> str:
        return "qlora" if self.qlora is not None else "lora" if self.lora is not None else "full"

    def expect_mode(self, mode: str) -> None:
        """Each entry script runs one kind of recipe; point the user at the right script."""
        if self.mode != mode:
            raise UserError(
                f"this is a {self.mode} SFT recipe (sections: lora={'yes' if self.lora else 'no'}, "
                f"qlora={'yes' if self.qlora else 'no'}) but the script runs {mode} SFT; "
                f"run python {MODES[self.mode]} --config_path <recipe> instead."
            )
