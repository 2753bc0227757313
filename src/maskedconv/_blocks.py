"""Blocks built from ``MaskedConv2d`` that keep causality.

Each block maps ``(B, C, H, W)`` to ``(B, C, H, W)`` and, like a type-B layer, lets
group g at pixel p see groups ``<= g`` at p and everything before p. Each also runs one
position at a time (``incremental``), for the fast sampler and for decoders.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from ._conditioning import BiasAt, ConditionBias, Conditioning, make_condition_bias
from ._conv import MaskedConv2d
from ._incremental import IncrementalStep, Pointwise, SequentialStep, cache_bytes
from ._masks import check_group_layout, group_split_error

__all__ = ["BottleneckBlock", "GroupLayerNorm", "ResidualBlock"]


class _SkipBlock(nn.Module):
    """``x + self.body(x)``: the skip is added here, once.

    With conditioning, the bias is added to the body's output at ``_cond_at`` (after
    the kxk conv, before its nonlinearity).
    """

    body: nn.Sequential
    condition: ConditionBias | None
    _cond_at: int

    def forward(self, x: Tensor, cond: Conditioning | None = None) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``.

        Args:
            x: ``(B, C, H, W)``.
            cond: the model's conditioning; required if and only if the block was built
                with ``num_classes`` or ``cond_channels``.
        """
        if self.condition is None:
            if cond is not None:
                raise ValueError(
                    f"{type(self).__name__} was built without conditioning: cond must be None"
                )
            out: Tensor = x + self.body(x)
            return out
        if cond is None:
            raise ValueError(f"{type(self).__name__} was built with conditioning: pass cond=")
        layers = list(self.body)
        h = x
        for layer in layers[: self._cond_at]:
            h = layer(h)
        h = h + self.condition(cond)
        for layer in layers[self._cond_at :]:
            h = layer(h)
        return torch.add(x, h)

    def incremental(
        self, batch: int, width: int, cond: Conditioning | None = None
    ) -> IncrementalStep:
        """This block evaluated one position at a time; see ``IncrementalStep``."""
        if self.condition is None:
            return _SkipStep(SequentialStep(self.body, batch, width))
        if cond is None:
            raise ValueError(f"{type(self).__name__} was built with conditioning: pass cond=")
        layers = list(self.body)
        return _ConditionedSkipStep(
            SequentialStep(layers[: self._cond_at], batch, width),
            BiasAt(self.condition(cond)),
            SequentialStep(layers[self._cond_at :], batch, width),
        )


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


class _ConditionedSkipStep:
    def __init__(self, before: SequentialStep, bias: BiasAt, after: SequentialStep) -> None:
        self.before, self.bias, self.after = before, bias, after

    def start_row(self, row: int) -> None:
        self.before.start_row(row)
        self.bias.start_row(row)
        self.after.start_row(row)

    def step(self, x: Tensor, col: int) -> Tensor:
        h = self.before.step(x, col) + self.bias.at(col)
        return x + self.after.step(h, col)

    def write(self, x: Tensor, col: int) -> None:
        self.before.write(x, col)

    def cache_bytes(self) -> int:
        return cache_bytes(self.before) + cache_bytes(self.after)


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
        num_classes: N, to condition on class labels (a learned bias per class, added
            after the kxk conv).
        cond_channels: M, to condition on a map (a learned 1x1 projection, added there).
    """

    _cond_at = 3

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        *,
        color_groups: int = 1,
        group_layout: str = "blocked",
        num_classes: int | None = None,
        cond_channels: int | None = None,
    ) -> None:
        super().__init__()
        conv = partial(
            MaskedConv2d, mask_type="B", color_groups=color_groups, group_layout=group_layout
        )
        self.condition = make_condition_bias(channels, num_classes, cond_channels)
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
    ``GroupLayerNorm`` (Berkeley CS294-158, homework 1).

    Args:
        channels: C, divisible by ``2 * color_groups``.
        kernel_size: odd size of the middle convolution.
        color_groups: number of ordered channel groups G.
        group_layout: ``"blocked"`` or ``"interleaved"``.
        num_classes: N, to condition on class labels (a learned bias per class, added
            after the kxk conv).
        cond_channels: M, to condition on a map (a learned 1x1 projection, added there).
    """

    _cond_at = 5

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        *,
        color_groups: int = 1,
        group_layout: str = "blocked",
        num_classes: int | None = None,
        cond_channels: int | None = None,
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
        self.condition = make_condition_bias(half, num_classes, cond_channels)
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
