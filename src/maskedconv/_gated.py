"""The gated PixelCNN: a vertical and a horizontal stack, gated, with no blind spot.

van den Oord et al., "Conditional Image Generation with PixelCNN Decoders", 2016.
Stacked raster masks never see a wedge of pixels above and to the right of each output
(the blind spot, see ``receptive_field``); the two stacks of ``GatedBlock`` remove it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch  # noqa: F401  (the docstring's example)
from torch import nn

from ._blocks import ConvUnit, GatedBlock, SkipSum
from ._conv import MaskedConv2d
from ._heads import OutputHead
from ._models import AutoregressiveModel, ModelConfig

__all__ = ["GatedPixelCNN", "GatedPixelCNNConfig"]


@dataclass(frozen=True)
class GatedPixelCNNConfig(ModelConfig):
    """Everything needed to rebuild a ``GatedPixelCNN``; plain values, safe to save."""

    num_layers: int = 8  # gated layers

    def _check_trunk(self, groups: int | list[int]) -> None:
        super()._check_trunk(groups)
        if self.kernel_size < 3:
            raise ValueError(
                f"kernel_size must be >= 3 for the gated PixelCNN: with 1 the stacks see no "
                f"other pixel, but got {self.kernel_size}"
            )


class GatedPixelCNN(AutoregressiveModel):
    """The gated PixelCNN, with no blind spot (van den Oord et al., 2016).

    The trunk: ``num_layers`` x ``GatedBlock`` (a vertical stack, the row stream, and a
    horizontal stack with a skip sum) -> ``SkipSum`` (ReLU of the skip sum) ->
    ``ConvUnit`` 1x1 B (+ bias, ReLU) -> ``ConvUnit`` 1x1 B -> head. The same surface as
    ``PixelCNN``: heads, stems, conditioning, ``log_prob``, ``sample``, the config round
    trip. Its wavefront is steeper than the plain model's: the vertical stack of L layers
    reaches ``L * (k // 2)`` columns right in the row above, so the slope is
    ``L * (k // 2) + 1``.

    Args:
        in_channels: image channels C.
        levels: values a sub-pixel takes, K >= 2.
        hidden_channels: width h of both stacks; divisible by ``color_groups``.
        num_layers: gated layers.
        kernel_size: odd k >= 3: the vertical stack's width and the horizontal reach.
        color_groups: ordered channel groups G; ``None``: the head's choice.
        group_layout: ``"blocked"`` or ``"interleaved"``.
        head: ``"categorical"``, ``"dmol"`` or an ``OutputHead`` instance.
        num_mixtures: mixture components of ``head="dmol"``.
        input: ``"scaled"`` or ``"embedding"``.
        embedding_dim: D of the embedding stem.
        num_classes: N, to condition on class labels ``(B,)``.
        cond_channels: M, to condition on a map ``(B, M, h, w)``.

    Example:
        >>> model = GatedPixelCNN(1, 2, hidden_channels=16, num_layers=3)
        >>> model(torch.randint(0, 2, (4, 1, 8, 8))).shape
        torch.Size([4, 1, 2, 8, 8])
    """

    config_class = GatedPixelCNNConfig
    config: GatedPixelCNNConfig

    def __init__(
        self,
        in_channels: int,
        levels: int,
        *,
        hidden_channels: int = 64,
        num_layers: int = 8,
        kernel_size: int = 7,
        color_groups: int | list[int] | None = None,
        group_layout: str = "blocked",
        head: Literal["categorical", "dmol"] | str | OutputHead = "categorical",
        num_mixtures: int = 5,
        input: Literal["scaled", "embedding"] | str = "scaled",
        embedding_dim: int | None = None,
        num_classes: int | None = None,
        cond_channels: int | None = None,
    ) -> None:
        arguments = dict(locals())
        super().__init__()
        self._build_common(arguments)
        h = hidden_channels
        opts: dict[str, Any] = dict(color_groups=self.color_groups, group_layout=group_layout)
        conditioning: dict[str, Any] = dict(num_classes=num_classes, cond_channels=cond_channels)
        self.trunk = nn.ModuleList(
            [
                GatedBlock(
                    self.stem.out_channels(in_channels),
                    h,
                    kernel_size,
                    first=True,
                    **opts,
                    **conditioning,
                ),
                *(
                    GatedBlock(h, h, kernel_size, **opts, **conditioning)
                    for _ in range(num_layers - 1)
                ),
                SkipSum(),
                ConvUnit(MaskedConv2d(h, h, 1, mask_type="B", **opts), self._condition_bias(h)),
                ConvUnit(MaskedConv2d(h, self.head.num_params(in_channels), 1, **opts), relu=False),
            ]
        )

    def _legacy_names(self) -> list[tuple[str, str]]:
        layers = len(self.trunk) - 3
        return [
            ("layers.", "trunk."),
            ("hidden_conv.", f"trunk.{layers + 1}.conv."),
            ("hidden_condition.", f"trunk.{layers + 1}.condition."),
            ("output_conv.", f"trunk.{layers + 2}.conv."),
        ]
