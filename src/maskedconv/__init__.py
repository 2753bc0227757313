"""maskedconv: masked convolutions and PixelCNNs for autoregressive image models."""

from __future__ import annotations

from .blocks import BottleneckBlock, GroupLayerNorm, ResidualBlock
from .causality import allowed_dependencies, assert_causal
from .conv import MaskedConv2d, masked_conv2d
from .masks import MaskFunction, make_mask, mask_a, mask_b
from .pixelcnn import PixelCNN, PixelCNNConfig, nll_per_dim
from .sampling import sample

__version__ = "0.1.0"

__all__ = [
    "BottleneckBlock",
    "GroupLayerNorm",
    "MaskFunction",
    "MaskedConv2d",
    "PixelCNN",
    "PixelCNNConfig",
    "ResidualBlock",
    "allowed_dependencies",
    "assert_causal",
    "make_mask",
    "mask_a",
    "mask_b",
    "masked_conv2d",
    "nll_per_dim",
    "sample",
]
