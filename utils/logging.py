"""Training logs: a tqdm progress bar and console lines on rank 0, a JSONL metrics file in
the run directory, and (optionally) TensorBoard scalars.

Every record is one JSON object per line: ``{"step": 12, "loss": 3.1, ...}`` for metrics,
``{"step": 12, "event": "nonfinite", ...}`` for events (skipped steps, spikes, rollbacks).
Only rank 0 writes; other ranks get a logger whose methods do nothing.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

from utils.errors import UserError

METRICS_FILE = "metrics.jsonl"


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return f"{key} n/a"
    if isinstance(value, float):
        if key == "lr" or (value != 0 and abs(value) < 1e-3):
            return f"{key} {value:.2e}"
        if key in ("tok_per_s",):
            return f"{key} {value:,.0f}"
        if key == "mfu":
            return f"{key} {100 * value:.1f}%"
        return f"{key} {value:.4f}"
    return f"{key} {value}"


def read_records(path: str | Path, max_step: Optional[int] = None) -> list[dict]:
    """Metric records (not events) of a JSONL file, optionally up to and including max_step."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
        if "event" in rec or (max_step is not None and rec.get("step", 0) > max_step):
            continue
        out.append(rec)
    return out


class MetricsLogger:
    """``log(record)`` appends to metrics.jsonl; ``console(record)`` prints a line;
    ``event(step, kind, **info)`` does both for noteworthy events."""

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, tensorboard: bool = False,
                 total_steps: int = 0, start_step: int = 0, progress: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / METRICS_FILE
        self._file = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self._file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("train.tensorboard=true needs the tensorboard package: pip install tensorboard "
                                "(or set train.tensorboard=false).") from None
            self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
        if progress and total_steps > 0:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                             file=sys.stderr, mininterval=1.0)

    def _truncate_after(self, step: int) -> None:
        """On resume from step k, drop lines of steps > k written by the interrupted run."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
        self.path.write_text("".join(k + "\n" for k in keep))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        clean.setdefault("time", round(time.time(), 3))
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in record:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                    self._tb.add_scalar(k, v, record["step"])

    def advance(self, record: dict) -> None:
        """Move the progress bar one step and show the headline numbers."""
        if self._bar is not None:
            self._bar.update(1)
            shown = {k: record[k] for k in ("loss", "lr") if k in record}
            self._bar.set_postfix({k: (f"{v:.3e}" if k == "lr" else f"{v:.4f}") for k, v in shown.items() if v is not None},
                                  refresh=False)

    def console(self, record: dict, keys: Optional[list[str]] = None) -> None:
        if not self.enabled:
            return
        keys = keys or [k for k in record if k not in ("time",)]
        self.print(" | ".join(_fmt(k, record.get(k)) for k in keys if k in record))

    def event(self, step: int, kind: str, **info: Any) -> None:
        if not self.enabled:
            return
        self.log({"step": step, "event": kind, **info})
        details = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        self.print(f"[step {step}] {kind}: {details}")

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        self._bar = self._file = self._tb = None
