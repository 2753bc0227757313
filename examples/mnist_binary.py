"""PixelCNN on binarized MNIST (pixels > 127.5), as in the design blog and the Berkeley course.

Defaults reproduce the blog: 5 layers (a 7x7 type-A conv and 4 residual blocks), 64
filters, 7x7 kernels, 2 levels, batch 128, Adam lr 1e-3, gradient clipping at 1, 10
epochs. Writes the NLL curve, a 10x10 sample grid, a completion grid, metrics and a
checkpoint to --out-dir.

    python examples/mnist_binary.py --data-dir ../shared/data/mnist
    torchrun --nproc_per_node=4 examples/mnist_binary.py --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mnist_common import BINARY, run

if __name__ == "__main__":
    raise SystemExit(run(BINARY, __doc__))
