"""Blocks built from :class:`~maskedconv.MaskedConv2d` that keep causality.

Each block maps ``(B, C, H, W)`` to ``(B, C, H, W)`` and, like a type-B layer, lets
group g at pixel p see groups ``<= g`` at p and everything before p. Each also runs one
position at a time (``incremental``), for the fast sampler and for decoders.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from ._conv import MaskedConv2d
from ._incremental import IncrementalStep, Pointwise, SequentialStep, cache_bytes
from ._masks import check_group_layout, group_split_error

__all__ = ["BottleneckBlock", "GroupLayerNorm", "ResidualBlock"]


class _SkipBlock(nn.Module):
    """``x + self.body(x)``: the skip is added here, once."""

    body: nn.Sequential

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``.

        Args:
            x: ``(B, C, H, W)``.
            cond: conditioning input; reserved, must be ``None`` in this release.
        """
        if cond is not None:
            raise ValueError(
                f"{type(self).__name__} takes no conditioning input yet: cond must be None, "
                f"but got a {type(cond).__name__}"
            )
        out: Tensor = x + self.body(x)
        return out

    def incremental(self, batch: int, width: int) -> _SkipStep:
        """This block evaluated one position at a time; see :class:`IncrementalStep`."""
        return _SkipStep(SequentialStep(self.body, batch, width))


class _SkipStep:
    def __init__(self, body: SequentialStep) -> None:
        self.body = body

    def start_row(self, row: int) -> None:
        self.body.start_row(row)

    def step(self, x: Tensor, col: int) -> Tensor:
        return x + self.body.step(x, col)

    def write(self, x: Tensor, col: int) -> None:
        self.body.write(x, col)

    def cache_bytes(self) -> int:
        return cache_bytes(self.body)


class ResidualBlock(_SkipBlock):
    """The PixelCNN residual block: ``x + relu(B1x1(relu(Bkxk(relu(B1x1(x))))))``.

    Each convolution is type B with ``channels`` in and out (van den Oord et al.,
    "Pixel Recurrent Neural Networks", 2016, Figure 5, with the kxk conv of the
    design blog in place of 3x3).

    Args:
        channels: C, divisible by ``color_groups``.
        kernel_size: odd size of the middle convolution.
        color_groups: number of ordered channel groups G.
        group_layout: ``"blocked"`` or ``"interleaved"``.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        *,
        color_groups: int = 1,
        group_layout: str = "blocked",
    ) -> None:
        super().__init__()
        conv = partial(
            MaskedConv2d, mask_type="B", color_groups=color_groups, group_layout=group_layout
        )
        self.body = nn.Sequential(
            conv(channels, channels, 1),
            nn.ReLU(),
            conv(channels, channels, kernel_size),
            nn.ReLU(),
            conv(channels, channels, 1),
            nn.ReLU(),
        )


class GroupLayerNorm(nn.Module):
    """LayerNorm over the channels of one colour group at one pixel.

    Normalising across all channels would mix group g with later groups at the same
    pixel and break the channel order; normalising within each group keeps it.

    Args:
        channels: C, divisible by ``color_groups``.
        color_groups: number of ordered channel groups G.
        group_layout: ``"blocked"`` or ``"interleaved"``.
        eps: added to the variance.
    """

    def __init__(
        self,
        channels: int,
        *,
        color_groups: int = 1,
        group_layout: str = "blocked",
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        check_group_layout(group_layout)
        if channels % color_groups:
            raise group_split_error("channels", channels, color_groups)
        self.channels = channels
        self.color_groups = color_groups
        self.group_layout = group_layout
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, *S) -> (B, C, *S)``: an image ``(B, C, H, W)`` or one position ``(B, C)``."""
        b, c, *spatial = x.shape
        g = self.color_groups
        if self.group_layout == "blocked":
            grouped = x.reshape(b, g, c // g, *spatial)  # (B, G, C/G, *S)
            dim = 2
        else:
            grouped = x.reshape(b, c // g, g, *spatial)  # (B, C/G, G, *S)
            dim = 1
        mean = grouped.mean(dim, keepdim=True)
        var = grouped.var(dim, unbiased=False, keepdim=True)
        normed = ((grouped - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        trailing = (1,) * len(spatial)
        return normed * self.weight.view(c, *trailing) + self.bias.view(c, *trailing)

    def incremental(self, batch: int, width: int) -> IncrementalStep:
        """Normalisation at one position: the same ``forward`` on a ``(B, C)`` vector."""
        return Pointwise(self.forward)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, color_groups={self.color_groups}, "
            f"group_layout={self.group_layout}, eps={self.eps}"
        )


class BottleneckBlock(_SkipBlock):
    """The course solution's residual block: C -> C/2 -> C/2 -> C, with a group LayerNorm.

    ``x + B1x1(relu(Bkxk(relu(B1x1(relu(norm(x)))))))`` where ``norm`` is a
    :class:`GroupLayerNorm` (Berkeley CS294-158, homework 1).

    Args:
        channels: C, divisible by ``2 * color_groups``.
        kernel_size: odd size of the middle convolution.
        color_groups: number of ordered channel groups G.
        group_layout: ``"blocked"`` or ``"interleaved"``.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        *,
        color_groups: int = 1,
        group_layout: str = "blocked",
    ) -> None:
        super().__init__()
        if channels % (2 * color_groups):
            raise group_split_error(
                "channels",
                channels,
                2 * color_groups,
                f"2 * color_groups = {2 * color_groups} (the bottleneck halves it)",
            )
        half = channels // 2
        conv = partial(
            MaskedConv2d, mask_type="B", color_groups=color_groups, group_layout=group_layout
        )
        self.body = nn.Sequential(
            GroupLayerNorm(channels, color_groups=color_groups, group_layout=group_layout),
            nn.ReLU(),
            conv(channels, half, 1),
            nn.ReLU(),
            conv(half, half, kernel_size),
            nn.ReLU(),
            conv(half, channels, 1),
        )
