"""Causal units: the blocks a trunk is declared from, each with its forward and its step.

* ``ConvUnit``: a masked conv, its conditioning bias and a ReLU;
* ``ResidualBlock`` and ``BottleneckBlock``: ``x + f(x)`` with a kxk type-B conv inside;
* ``GatedBlock``: the gated PixelCNN's layer over (vertical, horizontal, skip);
* ``SkipSum``: the end of a gated stack, ``relu(skip)``.

Each maps ``(B, C, H, W)`` images in ``forward`` and ``(B, n, C)`` positions in its step
(see ``maskedconv._steps``); like a type-B layer, each lets group g at pixel p see groups
``<= g`` at p and everything before p.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._conditioning import ConditionBias, Conditioning, make_condition_bias
from ._conv import MaskedConv2d
from ._masks import (
    ColorGroups,
    check_color_groups,
    group_slices,
    group_split_error,
    group_unit,
    normal_color_groups,
)
from ._schedules import Positions, link_rows
from ._steps import (
    BiasStep,
    CausalUnit,
    ConvStep,
    NoIncrementalPathError,
    RowStream,
    StepContext,
    UnitStep,
    masked_weight,
)

__all__ = [
    "BottleneckBlock",
    "ConvUnit",
    "GatedBlock",
    "GroupLayerNorm",
    "ResidualBlock",
    "SkipSum",
]


def _bias(condition: ConditionBias | None, cond: Conditioning | None) -> Tensor | int:
    """The conditioning bias to add (0 for an unconditioned unit or call)."""
    return 0 if condition is None or cond is None else condition(cond)


def _bias_step(condition: ConditionBias | None, context: StepContext) -> BiasStep | None:
    if condition is None or context.cond is None:
        return None
    return BiasStep(condition(context.cond))


class ConvUnit(CausalUnit):
    """``relu(conv(x) + bias(cond))``, or without the ReLU (the last layer).

    Args:
        conv: the masked conv.
        condition: its conditioning bias, or ``None``.
        relu: apply a ReLU after the bias.
    """

    def __init__(
        self, conv: nn.Conv2d, condition: ConditionBias | None = None, *, relu: bool = True
    ) -> None:
        super().__init__()
        self.conv = conv
        self.condition = condition
        self.relu = relu

    def forward(
        self, x: Tensor, rows: Tensor | None = None, cond: Conditioning | None = None
    ) -> tuple[Tensor, Tensor | None]:
        h = self.conv(x) + _bias(self.condition, cond)
        return (F.relu(h) if self.relu else h), rows

    def incremental(self, context: StepContext, rows: RowStream | None) -> UnitStep:
        return _ConvUnitStep(self, context, rows)

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


class _ConvUnitStep(UnitStep):
    def __init__(self, unit: ConvUnit, context: StepContext, rows: RowStream | None) -> None:
        self.rows = rows
        self.schedule = context.schedule
        self.conv = ConvStep(unit.conv, context)
        self.bias = _bias_step(unit.condition, context)
        self.relu = unit.relu

    def step(self, x: Tensor, t: int) -> Tensor:
        at = self.schedule[t]
        if self.bias is None:
            return self.conv(x, at, relu=self.relu)
        h = self.conv(x, at)
        h += self.bias(at)
        return h.relu_() if self.relu else h

    def write(self, x: Tensor, t: int) -> None:
        self.conv.write(x, self.schedule[t])

    @property
    def stateless(self) -> bool:
        return not self.conv.spatial and self.rows is None

    def cache_bytes(self) -> int:
        return self.conv.cache_bytes()


class ResidualBlock(CausalUnit):
    """The PixelCNN residual block: ``x + relu(B1x1(relu(Bkxk(relu(B1x1(x))) + bias)))``.

    Each convolution is type B with ``channels`` in and out (van den Oord et al.,
    "Pixel Recurrent Neural Networks", 2016, Figure 5, with the kxk conv of the design
    blog in place of 3x3); with conditioning, a bias is added after the kxk conv.

    Args:
        channels: C, divisible by ``color_groups``.
        kernel_size: odd size of the middle convolution.
        color_groups: number of ordered channel groups G.
        group_layout: ``"blocked"`` or ``"interleaved"``.
        num_classes: N, to condition on class labels (a learned bias per class).
        cond_channels: M, to condition on a map (a learned 1x1 projection).
    """

    renamed_0_2: ClassVar[dict[str, str]] = {
        "body.0.": "conv_in.",
        "body.2.": "conv_mid.",
        "body.4.": "conv_out.",
    }
    """0.2 parameter names (``body.<i>``) and their names now, for old checkpoints."""

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        *,
        color_groups: ColorGroups = 1,
        group_layout: str = "blocked",
        num_classes: int | None = None,
        cond_channels: int | None = None,
    ) -> None:
        super().__init__()
        opts: dict[str, Any] = dict(
            mask_type="B", color_groups=color_groups, group_layout=group_layout
        )
        self.conv_in = MaskedConv2d(channels, channels, 1, **opts)
        self.conv_mid = MaskedConv2d(channels, channels, kernel_size, **opts)
        self.conv_out = MaskedConv2d(channels, channels, 1, **opts)
        self.condition = make_condition_bias(channels, num_classes, cond_channels)

    def forward(
        self, x: Tensor, rows: Tensor | None = None, cond: Conditioning | None = None
    ) -> tuple[Tensor, Tensor | None]:
        h = F.relu(self.conv_in(x))
        h = F.relu(self.conv_mid(h) + _bias(self.condition, cond))
        return x + F.relu(self.conv_out(h)), rows

    def incremental(self, context: StepContext, rows: RowStream | None) -> UnitStep:
        return _SkipBlockStep(self, context, rows)


class GroupLayerNorm(nn.Module):
    """LayerNorm over the channels of one colour group at one pixel.

    Normalising across all channels would mix group g with later groups at the same
    pixel and break the channel order; normalising within each group keeps it.

    Args:
        channels: C, divisible by ``color_groups`` (uneven: by the sum of the sizes).
        color_groups: number of ordered channel groups G, or their uneven sizes.
        group_layout: ``"blocked"`` or ``"interleaved"``.
        eps: added to the variance.
    """

    def __init__(
        self,
        channels: int,
        *,
        color_groups: ColorGroups = 1,
        group_layout: str = "blocked",
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        check_color_groups(color_groups, group_layout, channels=channels)
        color_groups = normal_color_groups(color_groups)
        self.channels = channels
        self.color_groups = color_groups
        self.group_layout = group_layout
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, dim: int = 1) -> Tensor:
        """``(B, C, *S) -> (B, C, *S)``; ``dim``: where the channels are (-1: last)."""
        x = x.movedim(dim, 1)
        b, c, *spatial = x.shape
        g = self.color_groups
        if not isinstance(g, int):  # uneven groups, blocked: each block on its own
            normed = torch.cat([self._standardise(x[:, s], 1) for s in group_slices(c, g)], 1)
        elif self.group_layout == "blocked":
            normed = self._standardise(x.reshape(b, g, c // g, *spatial), 2)  # (B, G, C/G, *S)
        else:
            normed = self._standardise(x.reshape(b, c // g, g, *spatial), 1)  # (B, C/G, G, *S)
        trailing = (1,) * len(spatial)
        out = normed.reshape(x.shape) * self.weight.view(c, *trailing)
        out = out + self.bias.view(c, *trailing)
        return out.movedim(1, dim)

    def _standardise(self, x: Tensor, axis: int) -> Tensor:
        """``x`` less its mean along ``axis``, over its standard deviation (biased, + eps)."""
        mean = x.mean(axis, keepdim=True)
        var = x.var(axis, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, color_groups={self.color_groups}, "
            f"group_layout={self.group_layout}, eps={self.eps}"
        )


class BottleneckBlock(CausalUnit):
    """The course solution's residual block: C -> C/2 -> C/2 -> C, with a group LayerNorm.

    ``x + B1x1(relu(Bkxk(relu(B1x1(relu(norm(x))))) + bias))`` where ``norm`` is a
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

    renamed_0_2: ClassVar[dict[str, str]] = {
        "body.0.": "norm.",
        "body.2.": "conv_in.",
        "body.4.": "conv_mid.",
        "body.6.": "conv_out.",
    }
    """0.2 parameter names (``body.<i>``) and their names now, for old checkpoints."""
    channel_multiple = 2
    """``channels`` must be a multiple of this times ``color_groups`` (it halves them)."""

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        *,
        color_groups: ColorGroups = 1,
        group_layout: str = "blocked",
        num_classes: int | None = None,
        cond_channels: int | None = None,
    ) -> None:
        super().__init__()
        unit = group_unit(color_groups)
        if channels % (2 * unit):
            raise group_split_error(
                "channels",
                channels,
                2 * unit,
                f"2 * {unit} = {2 * unit} (color_groups={color_groups}; the bottleneck halves it)",
            )
        half = channels // 2
        opts: dict[str, Any] = dict(
            mask_type="B", color_groups=color_groups, group_layout=group_layout
        )
        self.norm = GroupLayerNorm(channels, color_groups=color_groups, group_layout=group_layout)
        self.conv_in = MaskedConv2d(channels, half, 1, **opts)
        self.conv_mid = MaskedConv2d(half, half, kernel_size, **opts)
        self.conv_out = MaskedConv2d(half, channels, 1, **opts)
        self.condition = make_condition_bias(half, num_classes, cond_channels)

    def forward(
        self, x: Tensor, rows: Tensor | None = None, cond: Conditioning | None = None
    ) -> tuple[Tensor, Tensor | None]:
        h = F.relu(self.conv_in(F.relu(self.norm(x))))
        h = F.relu(self.conv_mid(h) + _bias(self.condition, cond))
        return x + self.conv_out(h), rows

    def incremental(self, context: StepContext, rows: RowStream | None) -> UnitStep:
        return _SkipBlockStep(self, context, rows)


class _SkipBlockStep(UnitStep):
    """The step of ``ResidualBlock`` and ``BottleneckBlock``: the same sums at positions."""

    def __init__(
        self,
        block: ResidualBlock | BottleneckBlock,
        context: StepContext,
        rows: RowStream | None,
    ) -> None:
        self.rows = rows
        self.schedule = context.schedule
        self.norm = block.norm if isinstance(block, BottleneckBlock) else None
        self.conv_in = ConvStep(block.conv_in, context)
        self.conv_mid = ConvStep(block.conv_mid, context)
        self.conv_out = ConvStep(block.conv_out, context)
        self.bias = _bias_step(block.condition, context)

    def step(self, x: Tensor, t: int) -> Tensor:
        at = self.schedule[t]
        h = x if self.norm is None else F.relu(self.norm(x, dim=-1))
        h = self.conv_in(h, at, relu=True)
        if self.bias is None:
            h = self.conv_mid(h, at, relu=True)
        else:
            h = self.conv_mid(h, at)
            h += self.bias(at)
            h.relu_()
        return self.conv_out(h, at, relu=self.norm is None).add_(x)

    @property
    def stateless(self) -> bool:
        return not self.conv_mid.spatial and self.rows is None

    def cache_bytes(self) -> int:
        return self.conv_mid.cache_bytes()


# --- the gated PixelCNN's layer -------------------------------------------------------------


def _vertical_mask(include_centre_row: bool) -> Any:
    def mask(
        *,
        out_channels: int,
        in_channels: int,
        kernel_size: tuple[int, int],
        color_groups: ColorGroups,
        group_layout: str,
    ) -> Tensor:
        kh, kw = kernel_size
        out = torch.zeros(out_channels, in_channels, kh, kw, dtype=torch.bool)
        out[:, :, : kh // 2 + int(include_centre_row)] = True
        return out

    mask.__name__ = "vertical_with_centre_row" if include_centre_row else "vertical_above"
    return mask


vertical_above = _vertical_mask(False)
"""Mask of the first vertical conv: every kernel row above the centre, full width."""
vertical_with_centre_row = _vertical_mask(True)
"""Mask of later vertical convs: the rows above and the centre row, full width."""


def gate(
    x: Tensor, color_groups: ColorGroups = 1, group_layout: str = "blocked", dim: int = 1
) -> Tensor:
    """``tanh(a) * sigmoid(b)``: ``(B, 2h, *S) -> (B, h, *S)``, group by group.

    Group g's halves a and b are both taken from group g's channels, so the colour
    order holds: blocked, each group's block is halved; interleaved, the first and
    second h channels hold every group equally already. ``dim``: the channel dim.
    """
    if color_groups == 1 or group_layout == "interleaved":
        a, b = x.chunk(2, dim=dim)
    elif not isinstance(color_groups, int):  # uneven groups: halve each group's block
        pairs = [
            x.narrow(dim, s.start, s.stop - s.start).chunk(2, dim=dim)
            for s in group_slices(x.shape[dim], color_groups)
        ]
        a, b = (torch.cat(parts, dim=dim) for parts in zip(*pairs, strict=True))
    else:
        x = x.movedim(dim, 1)
        n, c, *spatial = x.shape
        halves = x.reshape(n, color_groups, 2, c // (2 * color_groups), *spatial)
        a = halves[:, :, 0].reshape(n, c // 2, *spatial).movedim(1, dim)
        b = halves[:, :, 1].reshape(n, c // 2, *spatial).movedim(1, dim)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedBlock(CausalUnit):
    """One gated layer (van den Oord et al., "Conditional Image Generation with PixelCNN
    Decoders", 2016): main stream ``h`` (or ``(h, skip)``), row stream ``v``.

    * the **vertical stack** (the row stream) sees every row above across the kernel's
      full width, never its own row: the first layer's conv keeps the kernel rows above
      the centre, later ones the rows up to the centre of a stack that already excludes
      the current row;
    * the **horizontal stack** sees the current row to the left, and the centre by mask
      type A (first layer) or B, in colour-group order; the vertical stack's
      pre-activations reach it through a 1x1 conv (``link``) at the same position.

    Each stack is gated, ``tanh(a) * sigmoid(b)``. The horizontal stack is residual after
    the first layer; each layer's gated output also adds to a skip sum.

    Args:
        in_channels: channels of v and h coming in (the stem's for the first layer).
        channels: h, the width of both stacks; divisible by ``color_groups``.
        kernel_size: odd k >= 3.
        first: the first layer (it reads the stem's output as both stacks' input).
        color_groups: ordered channel groups G of the horizontal stack.
        group_layout: ``"blocked"`` or ``"interleaved"``.
        num_classes: N, to condition on class labels (a bias per class on both stacks).
        cond_channels: M, to condition on a map (a 1x1 projection on both stacks).
    """

    v_condition: ConditionBias | None
    h_condition: ConditionBias | None

    def __init__(
        self,
        in_channels: int,
        channels: int,
        kernel_size: int = 7,
        *,
        first: bool = False,
        color_groups: ColorGroups = 1,
        group_layout: str = "blocked",
        num_classes: int | None = None,
        cond_channels: int | None = None,
    ) -> None:
        super().__init__()
        check_color_groups(color_groups, group_layout, channels=channels)
        self.first = first
        self.channels = channels
        self.color_groups = normal_color_groups(color_groups)
        self.group_layout = group_layout
        two = 2 * channels
        vertical = vertical_above if first else vertical_with_centre_row
        self.v_conv = MaskedConv2d(in_channels, two, kernel_size, mask_type=vertical)
        self.h_conv = MaskedConv2d(
            in_channels,
            two,
            (1, kernel_size),
            mask_type="A" if first else "B",
            color_groups=color_groups,
            group_layout=group_layout,
        )
        # The vertical stack sees only rows above: every group of h may read it.
        self.link = nn.Conv2d(two, two, 1)
        opts: dict[str, Any] = dict(color_groups=color_groups, group_layout=group_layout)
        self.h_out = MaskedConv2d(channels, channels, 1, mask_type="B", **opts)
        self.skip = MaskedConv2d(channels, channels, 1, mask_type="B", **opts)
        self.v_condition = make_condition_bias(two, num_classes, cond_channels)
        self.h_condition = make_condition_bias(two, num_classes, cond_channels)

    def forward(
        self, x: Any, rows: Tensor | None = None, cond: Conditioning | None = None
    ) -> tuple[tuple[Tensor, Tensor], Tensor]:
        """``x``: the stem's ``(B, F, H, W)`` (first layer) or ``(h, skip)``;
        ``rows``: the vertical stack ``v`` (``None`` for the first layer).

        Returns:
            ``((h', skip'), v')``.
        """
        h, skip = (x, None) if self.first else x
        v_pre = self.v_conv(x if self.first else rows) + _bias(self.v_condition, cond)
        h_pre = self.h_conv(h) + self.link(v_pre) + _bias(self.h_condition, cond)
        gated = gate(h_pre, self.color_groups, self.group_layout)
        h_out = self.h_out(gated)
        h_next = h_out if self.first else h + h_out
        skip_next = self.skip(gated) if skip is None else skip + self.skip(gated)
        return (h_next, skip_next), gate(v_pre)

    def incremental(self, context: StepContext, rows: RowStream | None) -> UnitStep:
        return _GatedStep(self, context, rows)

    def row_reads(self) -> tuple[tuple[int, ...], int, int]:
        """The vertical conv's reach: the rows above (``d``), the columns left and right."""
        kh, kw = self.v_conv.kernel_size
        taps = torch.nonzero(self.v_conv.mask.ne(0).any(0).any(0)).tolist()
        rows = tuple(sorted({kh // 2 - i for i, _ in taps}))
        if rows and rows[0] < 0:
            raise NoIncrementalPathError("a vertical conv that reads rows below its own")
        columns = [j - kw // 2 for _, j in taps]
        return rows, max([-c for c in columns] + [0]), max([*columns, 0])


class _GatedStep(UnitStep):
    """A gated layer at a schedule's steps.

    The vertical stack runs as a row stream: each of its outputs is computed at the first
    step at which the rows above it are final (whole rows at a time in raster order),
    and its ``link`` into the horizontal stack is stored per position then, so that a
    main step adds it with one gather.
    """

    def __init__(self, block: GatedBlock, context: StepContext, rows: RowStream | None) -> None:
        schedule = context.schedule
        self.schedule = schedule
        self.first = block.first
        self.channels = block.channels
        self.color_groups, self.group_layout = block.color_groups, block.group_layout
        self.source = None if block.first else rows
        self.rows: RowStream = context.next_row_stream()
        written = schedule if self.source is None else self.source.plan
        self.v_conv = ConvStep(block.v_conv, context, whole_rows=(written, self.rows.plan))
        self.h_conv = ConvStep(block.h_conv, context)
        self.v_bias = _bias_step(block.v_condition, context)
        self.h_bias = _bias_step(block.h_condition, context)
        self.link = ConvStep(block.link, context)
        # h_out and skip read the same gated vector: one matmul for both, (h, 2h).
        both = [masked_weight(c)[:, :, 0, 0] for c in (block.h_out, block.skip)]
        self.out_weight = torch.cat(both).t().contiguous()
        self.out_bias = torch.cat(
            [
                c.bias.detach() if c.bias is not None else both[0].new_zeros(len(both[0]))
                for c in (block.h_out, block.skip)
            ]
        )
        # The links, computed with the row stream and read at the main step: each keeps
        # a row of its own only until then.
        self.compact = context.compact_caches
        if self.compact:
            self.link_rows, count = link_rows(schedule, self.rows.plan)
        else:
            count = schedule.height * schedule.width
            self.link_rows = torch.arange(count)
        self.linked = block.link.weight.new_zeros(context.batch, count, block.link.out_channels)

    def advance_rows(self, t: int, rows: Tensor | None) -> Tensor:
        if self.source is not None and rows is not None and rows.shape[1]:
            self.v_conv.write(rows, self.source.plan[t])
        at = self.rows.plan[t]
        if not len(at):
            return self.linked.new_zeros(self.linked.shape[0], 0, self.channels)
        v_pre = self.v_conv.read(at)  # (B, n, 2h)
        if self.v_bias is not None:
            v_pre += self.v_bias(at)
        linked = self.link(v_pre, at)
        if self.h_bias is not None:
            linked += self.h_bias(at)
        self.linked.index_copy_(1, self._link_index(at), linked)
        return gate(v_pre, dim=-1)

    def _link_index(self, at: Positions) -> Tensor:
        """The rows of ``self.linked`` that hold the links at ``at``."""
        rows = self.link_rows
        key = ("link", id(self.rows.plan), self.compact)
        return at.derived(key, self.linked.device, lambda p: rows[p.flat])

    def step(self, x: Any, t: int) -> tuple[Tensor, Tensor]:
        at = self.schedule[t]
        if self.first:
            h, skip = x, None
            self.v_conv.write(x, at)
        else:
            h, skip = x
        h_pre = self.h_conv(h, at) + self.linked.index_select(1, self._link_index(at))
        gated = gate(h_pre, self.color_groups, self.group_layout, dim=-1)
        batch, n = gated.shape[:2]
        out = torch.addmm(self.out_bias, gated.reshape(batch * n, -1), self.out_weight)
        out = out.view(batch, n, -1)
        h_out, contribution = out[..., : self.channels], out[..., self.channels :]
        h_next = h_out if self.first else h + h_out
        return h_next, (contribution if skip is None else skip + contribution)

    def write(self, x: Any, t: int) -> None:
        if not self.first:
            self.step(x, t)
            return
        at = self.schedule[t]
        self.v_conv.write(x, at)
        self.h_conv.write(x, at)

    def cache_bytes(self) -> int:
        own = self.linked.numel() * self.linked.element_size()
        return int(own) + self.v_conv.cache_bytes() + self.h_conv.cache_bytes()


class SkipSum(CausalUnit):
    """The end of a gated stack: ``(h, skip) -> relu(skip)``; the row stream ends here."""

    def forward(
        self, x: tuple[Tensor, Tensor], rows: Tensor | None = None, cond: Conditioning | None = None
    ) -> tuple[Tensor, None]:
        return F.relu(x[1]), None

    def incremental(self, context: StepContext, rows: RowStream | None) -> UnitStep:
        return _SkipSumStep()


class _SkipSumStep(UnitStep):
    def advance_rows(self, t: int, rows: Any) -> None:
        return None

    def step(self, x: tuple[Tensor, Tensor], t: int) -> Tensor:
        return F.relu(x[1])


BLOCKS: dict[str, type[CausalUnit]] = {"residual": ResidualBlock, "bottleneck": BottleneckBlock}
"""The blocks ``PixelCNN(block=...)`` knows by name; a ``CausalUnit`` class is taken as is."""
