"""The vision-language recipe (LLaVA-style training, finetune/vlm_train.py): one dataclass, three stages.

    stage: align                        # text | align | instruct
    model: {init_from: runs/vlm/text/final}   # a checkpoint; a text-only one gets model.vision added
    data: {train_path: data/visual/caption_train.jsonl}   # chats referencing image files (or LLaVA's .json)
    train: {out_dir: runs/vlm/align, max_steps: 300, batch_size: 16, seq_len: 128}
    optim: {lr: 1e-3}

Stages (what trains; the vision tower is always frozen, as in LLaVA):
  text      the language model alone on the chats with their images removed (a text-only base)
  align     stage 1: the projector only, on image captions (LM and tower frozen)
  instruct  stage 2: projector + language model, on visual instructions (train_tower: the tower too);
            with a ``lora`` section the language model trains as LoRA adapters (the projector in full)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from model.lora import LoRAConfig
from utils.errors import UserError
from utils.optim import OptimConfig
from utils.train_config import TrainConfig

STAGES = ("text", "align", "instruct")


@dataclass
class VLMDataConfig:
    """Recipe section ``data``: a .jsonl, .json (a list) or .parquet file of rows ``{"messages": [...],
    "images": [files]}`` (content parts ``{"type": "image", "image": file}`` or ``<image>`` markers), or
    in LLaVA's layout ``{"image": file, "conversations": [{"from": "human", "value": "<image>\n..."}, ...]}``
    (LLaVA-Pretrain's and LLaVA-Instruct's .json files as published); files relative to ``image_dir``."""

    train_path: str = field(default="", metadata={"path": "file"})
    extra_paths: list[str] = field(default_factory=list)  # more files of the same layout, mixed in
    image_dir: str = ""  # "" -> the folder of train_path
    tokenizer: str = field(default="", metadata={"path": "file?"})  # "" -> the checkpoint's tokenizer


@dataclass
class VLMModelConfig:
    """Recipe section ``model``: a checkpoint to start from, or a fresh model's ModelConfig."""

    init_from: str = field(default="", metadata={"path": "dir?"})  # a text LM or a VLM checkpoint
    vision: Optional[dict] = None  # the vision section to add to a text-only init_from (fresh tower + projector)
    # a pretrained SigLIP tower (a transformers save_pretrained directory of SiglipVisionModel or
    # SiglipModel): its sizes and weights; model.vision then gives the rest (image_token_id, pool, post_norm)
    vision_tower: str = field(default="", metadata={"path": "dir?"})
    config: Optional[dict] = None  # a fresh model (init_from ""): its ModelConfig, vision section included


@dataclass
class VLMRecipe:
    stage: Literal["text", "align", "instruct"]
    data: VLMDataConfig
    train: TrainConfig
    model: VLMModelConfig = field(default_factory=VLMModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=20, weight_decay=0.0))
    # instruct: train the vision tower too (LLaVA keeps a pretrained tower frozen; a tower that starts
    # from random weights, as in the from-scratch demo, has to learn)
    train_tower: bool = False
    # instruct: adapters on the language model's linear layers instead of training it in full (LLaVA's
    # LoRA variant); the projector (and a trained tower) train in full and are saved with the adapters
    lora: Optional[LoRAConfig] = None

    def __post_init__(self) -> None:
        if bool(self.model.init_from) == bool(self.model.config):
            raise UserError("the recipe needs exactly one of model.init_from (a checkpoint) and model.config "
                            "(a fresh model's ModelConfig with a vision section).")
        if self.model.config is not None and self.model.vision is not None:
            raise UserError("model.vision adds a vision part to init_from's text model; with model.config put the "
                            "vision section inside model.config.")
        if self.model.vision_tower and self.model.vision is None:
            raise UserError("model.vision_tower needs model.vision too: at least its image_token_id (the placeholder "
                            "token id), e.g. vision: {image_token_id: 4}; the tower's sizes come from its config.json.")
        if self.model.config is not None and not self.data.tokenizer:
            raise UserError("a fresh model (model.config) needs data.tokenizer: the tokenizer.json it reads with.")
        if self.train_tower and self.stage != "instruct":
            raise UserError(f"train_tower applies to stage instruct (stage 2); stage {self.stage} keeps the tower frozen.")
        if self.lora is not None and self.stage != "instruct":
            raise UserError(f"lora applies to stage instruct (stage 2), where the language model trains; stage {self.stage} "
                            "trains " + ("the projector only." if self.stage == "align" else "the language model in full."))
        if self.train.parallel.tp > 1 or self.train.parallel.pp > 1:
            raise UserError("vision-language training runs data parallel only; set train.parallel.tp and pp to 1.")
