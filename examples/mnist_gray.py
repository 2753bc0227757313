"""Gated PixelCNN on 8-bit grayscale MNIST (256 levels per pixel).

Defaults: the gated PixelCNN (vertical and horizontal stacks, no blind spot), 8 layers,
64 filters, 7x7 kernels, a softmax over the 256 levels; --head dmol swaps in
PixelCNN++'s discretized logistic mixture (5 components: 15 numbers per pixel instead
of 256). Batch 128, Adam lr 1e-3, clipping at 1, 10 epochs. Writes the NLL curve, a
sample grid, a completion grid, metrics and a checkpoint to --out-dir.

    python examples/mnist_gray.py --data-dir ../shared/data/mnist
    python examples/mnist_gray.py --data-dir ../shared/data/mnist --head dmol --conditional
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mnist_common import Experiment, run


def gray(digits: np.ndarray, split: str) -> np.ndarray:
    """MNIST as it is: one channel of 256 levels."""
    return digits[:, None]


GRAY = Experiment(
    "gray",
    # the data: 8-bit MNIST
    images=gray,
    channels=1,
    levels=256,
    # the model (each flag's default): gated, no blind spot
    model="gated",
    hidden_channels=64,
    num_layers=8,
    kernel_size=7,
    # the recipe
    epochs=10,
    batch_size=128,
    lr=1e-3,
    clip=1.0,
)
# What a run writes to --out-dir: nll.png, metrics.json / .csv, samples.png,
# completion.png, checkpoint.pt (resumed by --resume) and the model (model/).

if __name__ == "__main__":
    raise SystemExit(run(GRAY, __doc__))
