"""The PixelCNN: a type-A conv, residual blocks and two 1x1 convs, declared once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch  # noqa: F401  (the docstring's example)
from torch import nn

from ._blocks import BLOCKS, ConvUnit
from ._conv import MaskedConv2d
from ._heads import OutputHead
from ._masks import group_split_error, group_unit
from ._models import AutoregressiveModel, ModelConfig
from ._steps import CausalUnit

__all__ = ["PixelCNN", "PixelCNNConfig"]

ORDERS = ("raster", "checkerboard", "group-checkerboard")


def _block_class(block: object) -> type[CausalUnit]:
    if isinstance(block, str):
        if block not in BLOCKS:
            raise ValueError(
                f"block must be one of {tuple(BLOCKS)} or a CausalUnit subclass, but got {block!r}"
            )
        return BLOCKS[block]
    if isinstance(block, type) and issubclass(block, CausalUnit):
        return block
    raise TypeError(
        f"block must be one of {tuple(BLOCKS)} or a CausalUnit subclass, but got "
        f"{type(block).__name__} {block!r}"
    )


@dataclass(frozen=True)
class PixelCNNConfig(ModelConfig):
    """Everything needed to rebuild a ``PixelCNN``; plain values, safe to save.

    Defaults are the design blog's binary-MNIST model. A 0.1 config (without the
    head, input and conditioning fields) still loads.
    """

    # "residual" (design blog), "bottleneck" (course solution), or a CausalUnit class
    # built as block(channels, kernel_size, color_groups=, group_layout=, num_classes=,
    # cond_channels=); a class is not saved by save_pretrained.
    block: str | type[CausalUnit] = "residual"
    # "raster" (van den Oord et al.), "checkerboard" (He et al., CVPR 2021: a
    # checkerboard-masked first conv, then pointwise blocks; decoded in 2 steps) or
    # "group-checkerboard" (ELIC: the same, the colour groups one after another; 2G steps).
    order: str = "raster"

    def _check_trunk(self, groups: int | list[int]) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, but got {self.order!r}")
        if self.kernel_size < 3:
            raise ValueError(
                f"kernel_size must be >= 3: with 1 the type-A conv sees no other pixel, so the "
                f"model would never see the image's past, but got {self.kernel_size}"
            )
        block = _block_class(self.block)
        # A block that splits its channels (the bottleneck halves them) says by how much.
        multiple = getattr(block, "channel_multiple", 1) if self.num_layers > 1 else 1
        divisor = multiple * group_unit(groups)
        if self.hidden_channels % divisor:
            text = (
                f"{multiple} * color_groups = {divisor} ({block.__name__} splits it)"
                if multiple != 1
                else None
            )
            raise group_split_error("hidden_channels", self.hidden_channels, divisor, text)


class PixelCNN(AutoregressiveModel):
    """A PixelCNN over integer images with ``levels`` values per sub-pixel.

    Architecture (van den Oord et al., "Pixel Recurrent Neural Networks", 2016, as in
    the design blog), stem -> trunk -> head; the trunk is this list of causal units::

        stem                             scaled levels, or a learned embedding per channel
        ConvUnit: kxk type A, C -> h     + conditioning bias, ReLU
        (num_layers - 1) x block         x + ReLU(1x1 B(ReLU(kxk B(ReLU(1x1 B(x))) + bias)))
        ConvUnit: 1x1 type B, h -> h     + conditioning bias, ReLU
        ConvUnit: 1x1 type B, h -> P     the head's parameters
        head                             softmax over K levels, or a logistic mixture

    ``block="bottleneck"`` swaps in the Berkeley course solution's block
    (``BottleneckBlock``); a ``CausalUnit`` subclass of your own is taken as it is. With
    ``color_groups = C`` channels are generated in order R -> G -> B within each pixel;
    with ``color_groups = 1`` they are independent given the previous pixels (or, with
    ``head="dmol"``, coupled by the head itself). Stacked masks leave a blind spot above
    and to the right (see ``receptive_field``); ``GatedPixelCNN`` has none.

    Args:
        in_channels: image channels C.
        levels: values a sub-pixel takes, K >= 2.
        hidden_channels: width h of the hidden layers; divisible by ``color_groups``.
        num_layers: the first conv plus ``num_layers - 1`` blocks.
        kernel_size: odd size of the type-A conv and the blocks' middle convs.
        color_groups: ordered channel groups G, or a list of uneven group sizes (ELIC:
            ``[1, 1, 2]`` for C = 4: channels 0, 1, then 2-3 together; hidden layers split
            in the same proportions, blocked); ``None``: C for the categorical head,
            1 for the mixture.
        group_layout: ``"blocked"`` or ``"interleaved"``.
        head: ``"categorical"`` (``Categorical``), ``"dmol"``
            (``DiscretizedLogisticMixture``) or an ``OutputHead`` instance.
        num_mixtures: mixture components M of ``head="dmol"``.
        input: ``"scaled"`` (levels are intensities, mapped to ``[-1, 1]``) or
            ``"embedding"`` (levels are unordered codes, each with a learned vector).
        embedding_dim: D, the embedding size per channel; ``None``:
            ``hidden_channels // in_channels``.
        num_classes: N, to condition on class labels ``(B,)``.
        cond_channels: M, to condition on a map ``(B, M, h, w)``.
        block: ``"residual"``, ``"bottleneck"`` or a ``CausalUnit`` subclass.
        order: ``"raster"``, or ``"checkerboard"`` (He et al., CVPR 2021): the first conv
            is ``mask_type="checkerboard"`` (anchors, ``r + c`` even, see no other pixel;
            the rest see their anchor neighbours) and the blocks' middle convs are 1x1,
            so the model decodes in 2 steps (``maskedconv.checkerboard``) instead of
            raster order's H*W, at some cost in likelihood; or ``"group-checkerboard"``
            (ELIC's space-channel context, He et al., CVPR 2022): the same with the
            colour groups decoded one after another, group g seeing every earlier group
            everywhere (``maskedconv.group_checkerboard``, 2G steps).

    Example:
        >>> model = PixelCNN(1, 2, hidden_channels=16, num_layers=2)
        >>> x = torch.randint(0, 2, (4, 1, 8, 8))
        >>> model(x).shape  # (B, C, K, H, W)
        torch.Size([4, 1, 2, 8, 8])
        >>> model.log_prob(x).shape
        torch.Size([4])
    """

    config_class = PixelCNNConfig
    config: PixelCNNConfig

    def __init__(
        self,
        in_channels: int,
        levels: int,
        *,
        hidden_channels: int = 64,
        num_layers: int = 5,
        kernel_size: int = 7,
        color_groups: int | list[int] | None = None,
        group_layout: str = "blocked",
        head: Literal["categorical", "dmol"] | str | OutputHead = "categorical",
        num_mixtures: int = 5,
        input: Literal["scaled", "embedding"] | str = "scaled",
        embedding_dim: int | None = None,
        num_classes: int | None = None,
        cond_channels: int | None = None,
        block: Literal["residual", "bottleneck"] | str | type[CausalUnit] = "residual",
        order: Literal["raster", "checkerboard", "group-checkerboard"] | str = "raster",
    ) -> None:
        arguments = dict(locals())
        super().__init__()
        self._build_common(arguments)
        self.order = order
        # A non-anchor sees the anchors below it: a sampler must feed every row.
        self.causal_rows = order == "raster"
        opts: dict[str, Any] = dict(color_groups=self.color_groups, group_layout=group_layout)
        h = hidden_channels
        block_class = _block_class(block)
        # The checkerboard context is the only spatial layer: a k x k conv after it would
        # let a non-anchor see the other non-anchors of its step.
        first_mask, block_kernel = ("A", kernel_size) if order == "raster" else (order, 1)
        self.trunk = nn.ModuleList(
            [
                ConvUnit(
                    MaskedConv2d(
                        self.stem.out_channels(in_channels),
                        h,
                        kernel_size,
                        mask_type=first_mask,
                        **opts,
                    ),
                    self._condition_bias(h),
                ),
                *(
                    block_class(
                        h,
                        block_kernel,
                        num_classes=num_classes,
                        cond_channels=cond_channels,
                        **opts,
                    )
                    for _ in range(num_layers - 1)
                ),
                ConvUnit(MaskedConv2d(h, h, 1, mask_type="B", **opts), self._condition_bias(h)),
                ConvUnit(MaskedConv2d(h, self.head.num_params(in_channels), 1, **opts), relu=False),
            ]
        )

    def _legacy_names(self) -> list[tuple[str, str]]:
        blocks = len(self.trunk) - 3
        last = blocks + 1
        names = [
            # 0.1: net = [type-A conv, ReLU, *blocks, 1x1 conv, ReLU, 1x1 conv]
            ("net.0.", "trunk.0.conv."),
            (f"net.{blocks + 2}.", f"trunk.{last}.conv."),
            (f"net.{blocks + 4}.", f"trunk.{last + 1}.conv."),
            # 0.2: named layers
            ("input_conv.", "trunk.0.conv."),
            ("input_condition.", "trunk.0.condition."),
            ("hidden_conv.", f"trunk.{last}.conv."),
            ("hidden_condition.", f"trunk.{last}.condition."),
            ("output_conv.", f"trunk.{last + 1}.conv."),
        ]
        for i in range(blocks):
            renamed = getattr(type(self.trunk[1 + i]), "renamed_0_2", {})
            for old_prefix in (f"net.{2 + i}.", f"blocks.{i}."):
                names += [
                    (old_prefix + old, f"trunk.{1 + i}.{new}") for old, new in renamed.items()
                ]
                names.append((old_prefix, f"trunk.{1 + i}."))
        return names
