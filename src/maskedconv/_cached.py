"""The exact cached sampling path: every layer computed at one position per step.

By causality, a layer's activation at pixel p is final once every input before p, and
the groups before g at p, are known (Ramachandran et al., "Fast Generation for
Convolutional Autoregressive Models", 2017). So instead of running the network on the
whole image for every sub-pixel, each step runs every layer at the current pixel only,
reading the rows above and the pixels to the left from per-layer caches:

* a kxk masked conv keeps its input for the ``kh // 2`` rows above and the current
  row. At the start of a row, the rows above are final, so their contribution to every
  column is one small convolution; each step adds the centre row's taps at one pixel.
* 1x1 convs, ReLUs, group LayerNorms and residual sums need no cache.

The work per image is then about one forward pass per colour group. Everything here
is built from the modules the library ships; anything else has no cached path and is
sampled by the plain loop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import BottleneckBlock, GroupLayerNorm, ResidualBlock
from .conv import MaskedConv2d
from .pixelcnn import PixelCNN

__all__ = ["CachedPixelCNN", "NoCachedPathError"]


class NoCachedPathError(Exception):
    """The model has a part without an incremental path; its reason is the message."""


class _Op:
    def start_row(self, row: int) -> None:
        """Prepare for row ``row``, whose rows above are now final."""

    def step(self, v: Tensor, col: int) -> Tensor:
        """Map this op's input at (row, col), ``(B, C_in)``, to its output ``(B, C_out)``."""
        raise NotImplementedError

    def cache_bytes(self) -> int:
        return 0


class _Pointwise(_Op):
    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn = fn

    def step(self, v: Tensor, col: int) -> Tensor:
        return self.fn(v)


class _Linear(_Op):
    """A 1x1 masked conv at one pixel: ``v @ (weight * mask)^T + bias``, maybe a ReLU."""

    def __init__(self, conv: MaskedConv2d) -> None:
        weight = (conv.weight * conv.mask).detach()
        self.weight = weight[:, :, 0, 0].t().contiguous()  # (I, O)
        bias = conv.bias.detach() if conv.bias is not None else weight.new_zeros(weight.shape[0])
        self.bias = bias
        self.relu = False  # set by _compile when a ReLU follows

    def step(self, v: Tensor, col: int) -> Tensor:
        out = torch.addmm(self.bias, v, self.weight)
        return out.relu_() if self.relu else out


class _Spatial(_Op):
    """A kxk causal masked conv with a cache of its input's last ``kh // 2 + 1`` rows."""

    def __init__(self, conv: MaskedConv2d, batch: int, width: int) -> None:
        if conv.dilation != (1, 1) or conv.groups != 1:
            raise NoCachedPathError("a MaskedConv2d with dilation or groups has no cached path")
        kh, kw = conv.kernel_size
        ch, cw = kh // 2, kw // 2
        mask = conv.mask
        if bool(mask[:, :, ch + 1 :].any()) or bool(mask[:, :, ch, cw + 1 :].any()):
            raise NoCachedPathError("a MaskedConv2d whose mask sees below or right of the centre")
        weight = (conv.weight * mask).detach()  # (O, I, kh, kw)
        out_c, in_c = weight.shape[:2]
        self.ch, self.cw = ch, cw
        self.above = weight[:, :, :ch].contiguous() if ch else None  # (O, I, ch, kw)
        # Centre row, taps left of and at the centre, as ((cw + 1) * I, O): the order
        # of a (B, cw + 1, I) patch of the channels-last cache, flattened.
        centre = weight[:, :, ch, : cw + 1].permute(0, 2, 1)  # (O, cw + 1, I)
        self.centre = centre.reshape(out_c, -1).t().contiguous()
        self.bias = None if conv.bias is None else conv.bias.detach()
        self.relu = False  # set by _compile when a ReLU follows
        # Input rows row-ch .. row, zero-padded by cw columns on each side, channels
        # last so that a patch of the current row is a view, not a copy.
        self.cache = weight.new_zeros(batch, ch + 1, width + 2 * cw, in_c)
        self.row = weight.new_zeros(width, batch, out_c)
        # Per column, views into the caches: where the input goes, the centre-row patch
        # that ends at it (B, (cw + 1) * I), and the rows-above sum. Made once, so a
        # step is two tensor ops.
        current = self.cache[:, ch]  # (B, W + 2cw, I)
        self.views = [
            (current[:, col + cw], current[:, col : col + cw + 1].flatten(1), self.row[col])
            for col in range(width)
        ]

    def start_row(self, row: int) -> None:
        ch = self.ch
        if ch:
            self.cache[:, :ch] = self.cache[:, 1:].clone()
        self.cache[:, ch].zero_()
        if self.above is not None:
            rows = self.cache[:, :ch].permute(0, 3, 1, 2)  # (B, I, ch, W + 2cw)
            above = F.conv2d(rows, self.above)  # (B, O, 1, W)
            self.row.copy_(above[:, :, 0].permute(2, 0, 1))  # (W, B, O)
        else:
            self.row.zero_()
        if self.bias is not None:
            self.row += self.bias

    def step(self, v: Tensor, col: int) -> Tensor:
        slot, patch, above = self.views[col]
        slot.copy_(v)
        out = torch.addmm(above, patch, self.centre)
        return out.relu_() if self.relu else out

    def write(self, v: Tensor, col: int) -> None:
        """Store the input at (row, col) without computing anything."""
        self.views[col][0].copy_(v)

    def cache_bytes(self) -> int:
        return int(self.cache.numel() + self.row.numel()) * self.cache.element_size()


class _Residual(_Op):
    def __init__(self, body: list[_Op]) -> None:
        self.body = body

    def start_row(self, row: int) -> None:
        for op in self.body:
            op.start_row(row)

    def step(self, v: Tensor, col: int) -> Tensor:
        h = v
        for op in self.body:
            h = op.step(h, col)
        return v + h

    def cache_bytes(self) -> int:
        return sum(op.cache_bytes() for op in self.body)


def _at_pixel(module: nn.Module) -> Callable[[Tensor], Tensor]:
    # A per-pixel module applied to a (B, C) vector, seen as a 1x1 image.
    return lambda v: module(v[:, :, None, None])[:, :, 0, 0]


def _compile(module: nn.Module, batch: int, width: int) -> list[_Op]:
    kind = type(module)
    if kind is nn.Sequential:
        ops: list[_Op] = []
        for child in module.children():
            if type(child) is nn.ReLU and ops and isinstance(ops[-1], (_Linear, _Spatial)):
                ops[-1].relu = True  # fused: in place on the conv's fresh output
                continue
            ops.extend(_compile(child, batch, width))
        return ops
    if kind is MaskedConv2d:
        assert isinstance(module, MaskedConv2d)
        if module.kernel_size == (1, 1):
            return [_Linear(module)]
        return [_Spatial(module, batch, width)]
    if kind is nn.ReLU:
        return [_Pointwise(torch.relu)]
    if kind is GroupLayerNorm:
        return [_Pointwise(_at_pixel(module))]
    if kind in (ResidualBlock, BottleneckBlock):
        assert isinstance(module, (ResidualBlock, BottleneckBlock))
        return [_Residual(_compile(module.body, batch, width))]
    raise NoCachedPathError(f"{kind.__name__} has no cached path")


class CachedPixelCNN:
    """A :class:`PixelCNN` evaluated one pixel at a time from cached activations.

    Call :meth:`start_row` at the start of every row, in order from row 0; then
    :meth:`step` for the pixels of that row from left to right, once or more each.
    """

    def __init__(self, model: nn.Module, batch: int, width: int) -> None:
        if not isinstance(model, PixelCNN) or (
            type(model).forward is not PixelCNN.forward
            or type(model).forward_scaled is not PixelCNN.forward_scaled
        ):
            raise NoCachedPathError(f"{type(model).__name__} is not a PixelCNN")
        self.model = model
        self.ops = _compile(model.net, batch, width)
        # Scaled value of every level: one lookup per step instead of three ops.
        device = next(model.parameters()).device
        self.scaled = model.scale(torch.arange(model.levels, device=device))
        self.first = self.ops[0] if isinstance(self.ops[0], _Spatial) else None

    def cache_bytes(self) -> int:
        """Memory held by the caches, in bytes."""
        return sum(op.cache_bytes() for op in self.ops)

    def start_row(self, row: int) -> None:
        for op in self.ops:
            op.start_row(row)

    def step(self, pixel: Tensor, col: int) -> Tensor:
        """Logits at (row, col) from the image's values there.

        Args:
            pixel: ``(B, C)`` integer values at (row, col); entries the logits must
                not see may hold anything.
            col: the column.

        Returns:
            ``(B, C, K)`` logits.
        """
        model = self.model
        v = self.scaled[pixel]
        for op in self.ops:
            v = op.step(v, col)
        if model.group_layout == "blocked":
            return v.view(-1, model.in_channels, model.levels)
        return v.view(-1, model.levels, model.in_channels).transpose(1, 2)

    def write_pixel(self, pixel: Tensor, col: int) -> None:
        """Store the final values at (row, col) where only the image input needs them."""
        if self.first is not None:
            self.first.write(self.scaled[pixel], col)
