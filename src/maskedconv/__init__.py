"""maskedconv: masked convolutions and PixelCNNs for autoregressive image models.

Every public name is here; the modules behind them are private and may change.
"""

from __future__ import annotations

from ._blocks import (
    BottleneckBlock,
    ConvUnit,
    GatedBlock,
    GroupLayerNorm,
    ResidualBlock,
    SkipSum,
)
from ._causality import allowed_dependencies, assert_causal, receptive_field
from ._conv import MaskedConv2d, masked_conv2d
from ._evaluation import Evaluator, FullForwardEvaluator, IncrementalEvaluator, sample
from ._export import CachedDecodeStep, DecodeStep
from ._formulations import chosen_formulations, set_conv_autotune
from ._gated import GatedPixelCNN, GatedPixelCNNConfig
from ._heads import Categorical, DiscretizedLogisticMixture, OutputHead
from ._masks import (
    MaskFunction,
    make_mask,
    mask_a,
    mask_b,
    mask_checkerboard,
    mask_group_checkerboard,
)
from ._models import nll_per_dim
from ._pixelcnn import PixelCNN, PixelCNNConfig
from ._schedules import (
    Positions,
    Schedule,
    checkerboard,
    group_checkerboard,
    model_slope,
    raster,
    wavefront,
)
from ._steps import CausalUnit, ConvStep, NoIncrementalPathError, StepContext, UnitStep
from ._version import __version__ as __version__

__all__ = [
    "BottleneckBlock",
    "CachedDecodeStep",
    "Categorical",
    "CausalUnit",
    "ConvStep",
    "ConvUnit",
    "DecodeStep",
    "DiscretizedLogisticMixture",
    "Evaluator",
    "FullForwardEvaluator",
    "GatedBlock",
    "GatedPixelCNN",
    "GatedPixelCNNConfig",
    "GroupLayerNorm",
    "IncrementalEvaluator",
    "MaskFunction",
    "MaskedConv2d",
    "NoIncrementalPathError",
    "OutputHead",
    "PixelCNN",
    "PixelCNNConfig",
    "Positions",
    "ResidualBlock",
    "Schedule",
    "SkipSum",
    "StepContext",
    "UnitStep",
    "allowed_dependencies",
    "assert_causal",
    "checkerboard",
    "chosen_formulations",
    "group_checkerboard",
    "make_mask",
    "mask_a",
    "mask_b",
    "mask_checkerboard",
    "mask_group_checkerboard",
    "masked_conv2d",
    "model_slope",
    "nll_per_dim",
    "raster",
    "receptive_field",
    "sample",
    "set_conv_autotune",
    "wavefront",
]
