"""The examples' figures: NLL curves and image grids, written as PNG atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from files import atomic_write_bytes
from torch import Tensor

__all__ = ["image_grid", "save_grid", "save_nll_plot", "save_png"]


def save_nll_plot(
    path: Path, train: list[tuple[int, float]], test: list[dict[str, float]], steps_per_epoch: int
) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        steps, values = zip(*train, strict=True)
        ax.plot(np.array(steps) / steps_per_epoch, values, lw=0.6, alpha=0.7, label="train")
    if test:
        ax.plot(
            [t["step"] / steps_per_epoch for t in test],
            [t["nats_per_dim"] for t in test],
            "o-",
            label="test",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("NLL (nats/dim)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)


def image_grid(images: Tensor, levels: int, rows: int) -> np.ndarray:
    """``(N, C, H, W)`` levels -> one ``(rows*H', cols*W', 3)`` float RGB array."""
    n, c, h, w = images.shape
    cols = -(-n // rows)
    pad = 1
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 0.5)
    pics = images.float().cpu().numpy() / (levels - 1)  # (N, C, H, W) in [0, 1]
    for i in range(n):
        r, col = divmod(i, cols)
        pic = pics[i].transpose(1, 2, 0)
        if c == 1:
            pic = pic.repeat(3, axis=2)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = pic
    return grid


def save_grid(path: Path, images: Tensor, levels: int, rows: int, title: str) -> None:
    import matplotlib.pyplot as plt

    grid = image_grid(images, levels, rows)
    fig, ax = plt.subplots(figsize=(8, 8 * grid.shape[0] / grid.shape[1] + 0.4))
    ax.imshow(grid, interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")
    fig.tight_layout()
    save_png(fig, path)


def save_png(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
