"""maskedconv: masked convolutions and PixelCNNs for autoregressive image models.

Every public name is here; the modules behind them are private and may change.
"""

from __future__ import annotations

from ._blocks import BottleneckBlock, GroupLayerNorm, ResidualBlock
from ._causality import allowed_dependencies, assert_causal, receptive_field
from ._conv import MaskedConv2d, masked_conv2d
from ._formulations import chosen_formulations, set_conv_autotune
from ._gated import GatedPixelCNN, GatedPixelCNNConfig
from ._heads import Categorical, DiscretizedLogisticMixture
from ._incremental import IncrementalStep
from ._masks import MaskFunction, make_mask, mask_a, mask_b
from ._models import PixelCNN, PixelCNNConfig, nll_per_dim
from ._sampling import IncrementalEvaluator, sample
from ._version import __version__ as __version__

__all__ = [
    "BottleneckBlock",
    "Categorical",
    "DiscretizedLogisticMixture",
    "GatedPixelCNN",
    "GatedPixelCNNConfig",
    "GroupLayerNorm",
    "IncrementalEvaluator",
    "IncrementalStep",
    "MaskFunction",
    "MaskedConv2d",
    "PixelCNN",
    "PixelCNNConfig",
    "ResidualBlock",
    "allowed_dependencies",
    "assert_causal",
    "chosen_formulations",
    "make_mask",
    "mask_a",
    "mask_b",
    "masked_conv2d",
    "nll_per_dim",
    "receptive_field",
    "sample",
    "set_conv_autotune",
]
