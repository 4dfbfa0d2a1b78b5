"""Checkpoints: safe, self-describing, portable.

A checkpoint is a directory that the next stage rebuilds from alone:

    model.safetensors     weights (tied lm_head stored once, as the embedding)
    model_config.json     the ModelConfig
    recipe.yaml           the stage recipe that produced it (optional)
    train_state.pt        optimizer / scheduler / RNG / data position (optional), read with weights_only=True
    meta.json             step, tokens seen, kind ("model" or "adapter"), free-form extras,
                          checksums (sha256 of the weights and train state), healthy (step checkpoints)
    tokenizer.json        copied beside the weights (optional), with its companions (tokenizer_config.json,
                          special_tokens_map.json, chat_template.jinja, generation_config.json) when present

It is written into a temporary sibling directory, fsynced and renamed (utils/fs.py), so a crash
mid-write never leaves a half checkpoint that later loads, and a save that returned survives a
power cut. The checksums catch what atomicity cannot: bytes changed later on disk or in a copy.
Loading verifies them (``LLM_VERIFY_CHECKSUMS=0`` skips it, for very large checkpoints; the
files still have to parse). A run directory keeps the last K checkpoints as ``step_00000100/``,
plus the newest one saved while the run was healthy, and a ``latest`` file naming the newest.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from utils.errors import UserError
from utils.fs import atomic_dir, atomic_file, read_json_object

WEIGHTS, MODEL_CONFIG, RECIPE, TRAIN_STATE, META, TOKENIZER = (
    "model.safetensors", "model_config.json", "recipe.yaml", "train_state.pt", "meta.json", "tokenizer.json",
)
CHECKSUMMED = (WEIGHTS, TRAIN_STATE)  # the binary files, where flipped bytes would load silently
# What travels with tokenizer.json: an imported model's special tokens, chat template and stop ids.
TOKENIZER_COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json")


def copy_tokenizer_files(tokenizer_path: str | os.PathLike, dest: Path) -> None:
    """Copy tokenizer.json and whichever of its companion files sit beside it into ``dest``."""
    src = Path(tokenizer_path)
    shutil.copyfile(src, dest / TOKENIZER)
    for name in TOKENIZER_COMPANIONS:
        if (src.parent / name).is_file():
            shutil.copyfile(src.parent / name, dest / name)


def model_state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What to save of ``model``: its ``weights()`` (the project's models store tied tensors once,
    as safetensors refuses aliases), else the plain state dict as CPU copies."""
    if callable(getattr(model, "weights", None)):
        return model.weights()
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    *,
    recipe: Any = None,
    train_state: Optional[dict] = None,
    meta: Optional[dict] = None,
    tokenizer_path: Optional[str | os.PathLike] = None,
    weights: Optional[dict[str, torch.Tensor]] = None,
) -> Path:
    """Write a checkpoint directory atomically. ``weights`` overrides the model's state
    (e.g. LoRA adapters only); ``model.cfg`` is always stored."""
    from safetensors.torch import save_file

    from utils.config import save_yaml

    path = Path(path)
    state = weights if weights is not None else model_state_for_saving(model)
    with atomic_dir(path) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / MODEL_CONFIG).write_text(json.dumps(model.cfg.to_dict(), indent=2))
        if recipe is not None:
            save_yaml(recipe, tmp / RECIPE)
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
        checksums = {name: file_sha256(tmp / name) for name in CHECKSUMMED if (tmp / name).is_file()}
        meta = {"kind": "model", **(meta or {}), "checksums": checksums}
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
        if tokenizer_path is not None and Path(tokenizer_path).is_file():
            copy_tokenizer_files(tokenizer_path, tmp)
    return path


def file_sha256(file: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a file's bytes (the same hex ``sha256sum`` prints)."""
    with open(file, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def verify_checksum(path: str | os.PathLike, name: str) -> None:
    """Compare ``path/name`` with the checksum meta.json recorded at save; UserError naming the
    file when they differ. Nothing to compare (a checkpoint from before checksums, or from
    another tool) or ``LLM_VERIFY_CHECKSUMS=0`` passes."""
    if os.environ.get("LLM_VERIFY_CHECKSUMS", "1").strip().lower() in ("0", "false", "no"):
        return
    expected = read_meta(path).get("checksums", {})
    expected = expected.get(name) if isinstance(expected, dict) else None
    file = Path(path) / name
    if expected is None or not file.is_file():
        return
    if file_sha256(file) != expected:
        raise UserError(
            f"{file} does not match the checksum recorded when it was saved; its bytes changed on disk or in a copy, "
            "so it is damaged. Use an earlier checkpoint (or a fresh copy) or re-run the stage that wrote it."
        )


def read_meta(path: str | os.PathLike) -> dict:
    """meta.json of a checkpoint ({} when absent); UserError when it is not a JSON object."""
    file = Path(path) / META
    return read_json_object(file, "; the checkpoint is damaged") if file.is_file() else {}


def read_config_dict(path: str | os.PathLike) -> dict:
    """model_config.json as a plain dict (model/load.py turns it into a ModelConfig)."""
    file = Path(path) / MODEL_CONFIG
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise UserError(f"checkpoint {str(path)!r} has no {MODEL_CONFIG}; it is incomplete or not a checkpoint directory.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{file} is not valid JSON ({err}); the checkpoint is damaged.") from None
    if not isinstance(data, dict):
        raise UserError(f"{file} must hold a JSON object of model settings; the checkpoint is damaged.")
    return data


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path) / WEIGHTS
    verify_checksum(path, WEIGHTS)
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(
            f"{file} cannot be read ({err}); the file is truncated or damaged. "
            "Use an earlier checkpoint or re-run the stage that wrote it."
        ) from None


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights with a clear error when they belong to another architecture."""
    own = model.state_dict()
    tied = getattr(model, "tied_weights", {})  # aliases are stored once, under their source's name
    missing = [k for k in own if k not in state and k not in tied]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
        if wrong_shape:
            parts.append(f"shape mismatch {wrong_shape[:3]}")
        raise UserError(
            f"weights in {source} do not fit this model ({'; '.join(parts)}). "
            "The checkpoint was written for a different architecture; check the recipe's model section "
            "or point at a checkpoint of the same model."
        )
    model.load_state_dict(state, strict=False)  # a tied alias shares storage: loading one fills both


def load_train_state(path: str | os.PathLike) -> Optional[dict]:
    file = Path(path) / TRAIN_STATE
    if not file.is_file():
        return None
    verify_checksum(path, TRAIN_STATE)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged pickle raises many types; all mean the same to the user
        raise UserError(f"{file} cannot be read ({type(err).__name__}: {err}); the checkpoint is damaged.") from None


# ----------------------------------------------------------------------------- run directories

_STEP_DIR = re.compile(r"^step_(\d+)$")
_UNFINISHED = re.compile(r"^\.(step_\d+|final|latest)\.(tmp|old)-")  # what a killed save leaves (utils/fs.py)


class CheckpointManager:
    """Keeps ``run_dir/step_XXXXXXXX`` checkpoints: the last ``keep_last`` of them (0: all) and,
    always, the newest one saved while the run was healthy (meta.json ``healthy``), so a rollback
    after a divergence has somewhere good to go. A ``latest`` file names the newest complete one."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 3):
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.run_dir / f"step_{step:08d}"

    def save(self, step: int, model: torch.nn.Module, *, healthy: bool = True, **kwargs) -> Path:
        meta = {"step": step, **kwargs.pop("meta", {}), "healthy": healthy}
        path = save_checkpoint(self.path_for(step), model, meta=meta, **kwargs)
        with atomic_file(self.run_dir / "latest") as f:
            f.write(path.name + "\n")
        self._prune()
        return path

    def latest(self, healthy: bool = False) -> Optional[Path]:
        """The newest complete checkpoint; ``healthy=True``: the newest saved while the run was healthy."""
        if healthy:
            for step in reversed(self.steps()):
                try:
                    if self.is_healthy(self.path_for(step)):
                        return self.path_for(step)
                except UserError:
                    continue  # a damaged meta.json: not a place to go back to
            return None
        marker = self.run_dir / "latest"
        if marker.is_file():
            candidate = self.run_dir / marker.read_text().strip()
            if (candidate / WEIGHTS).is_file():
                return candidate
        steps = self.steps()
        return self.path_for(steps[-1]) if steps else None

    @staticmethod
    def is_healthy(path: Path) -> bool:
        """meta.json's ``healthy`` (checkpoints written before it existed count as healthy); a
        damaged meta.json is a UserError."""
        return read_meta(path).get("healthy", True) is True

    def steps(self) -> list[int]:
        if not self.run_dir.is_dir():
            return []
        found = [int(m.group(1)) for p in self.run_dir.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / WEIGHTS).is_file()]
        return sorted(found)

    def remove_unfinished(self) -> tuple[int, int]:
        """Delete the temporary directories and files of saves that were killed before their rename
        (``.step_*.tmp-*`` and the like). Returns (entries removed, bytes freed). Call it only when no
        save is running: at the start of a run, on the one process that writes."""
        count = size = 0
        if not self.run_dir.is_dir():
            return 0, 0
        for entry in self.run_dir.iterdir():
            if not _UNFINISHED.match(entry.name):
                continue
            files = [entry] if not entry.is_dir() else [f for f in entry.rglob("*") if f.is_file()]
            size += sum(f.lstat().st_size for f in files)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            count += 1
        return count, size

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        steps = self.steps()
        newest_healthy = self.latest(healthy=True)
        for step in steps[: -self.keep_last]:
            if self.path_for(step) != newest_healthy:
                shutil.rmtree(self.path_for(step), ignore_errors=True)
