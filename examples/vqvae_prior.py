"""A PixelCNN prior over the discrete codes of a VQ-VAE, on MNIST, end to end.

Stage 1 trains a small VQ-VAE: 28x28 grayscale digits -> a 7x7 map of codes from a
codebook of K = 512 (vector-quantize-pytorch's EMA codebook, with dead-code
replacement), then encodes the train and test sets once. Stage 2 trains a
class-conditional ``GatedPixelCNN(1, K, input="embedding", num_classes=10)`` over the
code maps: a code is looked up in an embedding table, never one-hot encoded. Stage 3
draws code maps per class with the cached sampler, decodes them, and writes the grids,
the metrics and the final models. ``--hierarchy 2`` adds VQ-VAE-2's second level: a
14x14 bottom map whose prior is conditioned on the top map through ``cond=``, sampled
top first, then bottom. ``--order checkerboard`` trains a checkerboard prior instead
(``PixelCNN(..., order="checkerboard")``: anchors first, then the rest, so a map is drawn
or decoded in 2 steps rather than one per code), to weigh its NLL against its speed.

    pip install -e ".[examples]"
    python examples/vqvae_prior.py --data-dir ../shared/data/mnist
    python examples/vqvae_prior.py --data-dir ../shared/data/mnist --hierarchy 2

Every stage keeps an atomic checkpoint in --out-dir; Ctrl-C stops after the current
step and ``--resume`` continues where the run stopped, in whichever stage. The final
models go to OUT_DIR/models.pt (plain tensors and numbers: ``torch.load(...,
weights_only=True)`` reads it, and :func:`load_models` rebuilds the modules).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vqvae_common import VQExperiment, load_models, run

PRIOR = VQExperiment(
    # stage 1: a VQ-VAE, 28x28 -> 7x7 codes of a codebook of 512 vectors of 64 numbers
    hierarchy=1,
    vq_channels=64,
    code_dim=64,
    codebook_size=512,
    vq_steps=1500,
    vq_lr=2e-3,
    # stage 2: a class-conditional gated PixelCNN prior over the code maps
    order="raster",
    prior_channels=64,
    prior_layers=6,
    prior_kernel=3,
    prior_steps=2000,
    prior_lr=1e-3,
    batch_size=128,
)
# What a run writes to --out-dir: samples.png, reconstructions.png, curves.png,
# metrics.json, models.pt (read back by load_models), prior_top/ (and prior_bottom/),
# and a checkpoint per stage (resumed by --resume).

__all__ = ["PRIOR", "load_models"]

if __name__ == "__main__":
    raise SystemExit(run(PRIOR, __doc__ or ""))
