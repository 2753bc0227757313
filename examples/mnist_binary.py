"""PixelCNN on binarized MNIST (pixels > 127.5), as in the design blog and the Berkeley course.

The defaults reproduce the blog: 5 layers (a 7x7 type-A conv and 4 residual blocks), 64
filters, 7x7 kernels, 2 levels, batch 128, Adam lr 1e-3, gradient clipping at 1, 10
epochs. Writes the NLL curve, a 10x10 sample grid, a completion grid, metrics and a
checkpoint to --out-dir.

    python examples/mnist_binary.py --data-dir ../shared/data/mnist
    torchrun --nproc_per_node=4 examples/mnist_binary.py --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mnist_common import Experiment, run
from mnist_data import binarize


def binarized(gray: np.ndarray, split: str) -> np.ndarray:
    """One channel, 1 where a pixel is above 127.5 (the same for both splits)."""
    return binarize(gray)[:, None]


BINARY = Experiment(
    "binary",
    # the data: binarized MNIST
    images=binarized,
    channels=1,
    levels=2,
    # the model (each flag's default): a 7x7 type-A conv and 4 residual blocks
    model="pixelcnn",
    hidden_channels=64,
    num_layers=5,
    kernel_size=7,
    # the recipe: the blog's
    epochs=10,
    batch_size=128,
    lr=1e-3,
    clip=1.0,
)
# What a run writes to --out-dir: nll.png, metrics.json / .csv, samples.png,
# completion.png, checkpoint.pt (resumed by --resume) and the model (model/).

if __name__ == "__main__":
    raise SystemExit(run(BINARY, __doc__))
