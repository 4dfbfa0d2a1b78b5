"""Loss-curve PNG at the end of a run (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

from utils.fs import atomic_file


def plot_loss_curve(records: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Plot ``loss`` (and any ``val_*loss`` keys) against ``step``; returns the PNG path
    (None when there is nothing to plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None and "step" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*train), label="train loss", linewidth=1.0)
    val_keys = sorted({k for r in records for k in r if k.startswith("val") and k.endswith("loss")})
    for key in val_keys:
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path
