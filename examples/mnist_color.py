"""PixelCNN on coloured MNIST (4 levels per RGB channel) with R -> G -> B ordered masks.

The coloured data is made from MNIST by a seeded, deterministic generator: each digit
gets one colour, on a background of randomly coloured 7x7 patches (see
``mnist_data.colorize``). It follows the spirit of the Berkeley course's
``mnist_colored.pkl`` but is not that file; pass ``--pickle mnist_colored.pkl`` to
train on the course's file instead. The defaults reproduce the design blog: 8 layers,
120 filters, 7x7 kernels, 4 levels, batch 128, Adam lr 1e-3, clipping at 1, 10 epochs.

    python examples/mnist_color.py --data-dir ../shared/data/mnist
    torchrun --nproc_per_node=4 examples/mnist_color.py --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mnist_common import Experiment, run
from mnist_data import colorize


def colored(gray: np.ndarray, split: str) -> np.ndarray:
    """Three channels of 4 levels; the colours are drawn with a seed per split."""
    rgb = colorize(gray, seed=0 if split == "train" else 1)  # (N, 28, 28, 3)
    return np.moveaxis(rgb, 3, 1)


COLOR = Experiment(
    "color",
    # the data: coloured MNIST
    images=colored,
    channels=3,
    levels=4,
    # the model (each flag's default): R -> G -> B masks, one colour group per channel
    model="pixelcnn",
    hidden_channels=120,
    num_layers=8,
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
    raise SystemExit(run(COLOR, __doc__))
