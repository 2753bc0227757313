"""PixelCNN on coloured MNIST (4 levels per RGB channel) with R -> G -> B ordered masks.

The coloured data is made from MNIST by a seeded, deterministic generator: each digit
gets one colour, on a background of randomly coloured 7x7 patches (see
``mnist_data.colorize``). It follows the spirit of the Berkeley course's
``mnist_colored.pkl`` but is not that file; pass ``--pickle mnist_colored.pkl`` to
train on the course's file instead. Defaults reproduce the design blog: 8 layers, 120
filters, 7x7 kernels, 4 levels, batch 128, Adam lr 1e-3, clipping at 1, 10 epochs.

    python examples/mnist_color.py --data-dir ../shared/data/mnist
    torchrun --nproc_per_node=4 examples/mnist_color.py --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mnist_common import COLOR, run

if __name__ == "__main__":
    raise SystemExit(run(COLOR, __doc__))
