"""The gated PixelCNN: a vertical and a horizontal stack, gated, with no blind spot.

van den Oord et al., "Conditional Image Generation with PixelCNN Decoders", 2016.
Stacked raster masks never see a wedge of pixels above and to the right of each output
(the blind spot, see ``receptive_field``). Two stacks remove it:

* the **vertical stack** sees every row above, across the kernel's full width, and
  never its own row: its first conv keeps only the kernel rows above the centre (the
  image shifted down one row), later ones the rows up to the centre of a stack that
  already excludes the current row. Being strictly above, it needs no colour order;
* the **horizontal stack** sees the current row to the left, and the centre by mask
  type A (first layer) or B, in colour-group order; the vertical stack's
  pre-activations reach it through a 1x1 conv at the same position.

Each stack is gated, ``tanh(a) * sigmoid(b)``, where group g's halves a and b both come
from group g's channels. The horizontal stack is residual; each layer's gated output
also feeds a skip sum that goes to the head. Every conv convolves only the kernel rows
and columns its mask keeps (k//2 x k or (k//2 + 1) x k vertical, 1 x (k//2 + 1)
horizontal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._conditioning import BiasAt, ConditionBias, Conditioning, make_condition_bias
from ._conv import MaskedConv2d, _SpatialStep
from ._heads import OutputHead
from ._incremental import IncrementalStep, cache_bytes, step_of
from ._masks import group_split_error
from ._models import AutoregressiveModel, ModelConfig

__all__ = ["GatedBlock", "GatedPixelCNN", "GatedPixelCNNConfig", "gate"]


def _vertical_mask(include_centre_row: bool) -> Any:
    def mask(
        *,
        out_channels: int,
        in_channels: int,
        kernel_size: tuple[int, int],
        color_groups: int,
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


def gate(x: Tensor, color_groups: int = 1, group_layout: str = "blocked") -> Tensor:
    """``tanh(a) * sigmoid(b)``: ``(B, 2h, *S) -> (B, h, *S)``, group by group.

    Group g's halves a and b are both taken from group g's channels, so the colour
    order holds: blocked, each group's block is halved; interleaved, the first and
    second h channels hold every group equally already.
    """
    if color_groups == 1 or group_layout == "interleaved":
        a, b = x.chunk(2, dim=1)
    else:
        n, c, *spatial = x.shape
        halves = x.view(n, color_groups, 2, c // (2 * color_groups), *spatial)
        a = halves[:, :, 0].reshape(n, c // 2, *spatial)
        b = halves[:, :, 1].reshape(n, c // 2, *spatial)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedBlock(nn.Module):
    """One gated layer: ``(v, h, skip) -> (v', h', skip')``.

    Args:
        in_channels: channels of v and h coming in (the stem's for the first layer).
        channels: h, the width of both stacks; divisible by ``color_groups``.
        kernel_size: odd k >= 3.
        first: the first layer (vertical conv strictly above, horizontal mask type A,
            no residual).
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
        color_groups: int = 1,
        group_layout: str = "blocked",
        num_classes: int | None = None,
        cond_channels: int | None = None,
    ) -> None:
        super().__init__()
        if channels % color_groups:
            raise group_split_error("channels", channels, color_groups)
        self.first = first
        self.channels = channels
        self.color_groups = color_groups
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
        self, v: Tensor, h: Tensor, skip: Tensor | None, cond: Conditioning | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``v, h``: ``(B, in_channels, H, W)``; ``skip``: ``(B, channels, H, W)`` or None."""
        v_pre = self.v_conv(v)
        if cond is not None and self.v_condition is not None:
            v_pre = v_pre + self.v_condition(cond)
        h_pre = self.h_conv(h) + self.link(v_pre)
        if cond is not None and self.h_condition is not None:
            h_pre = h_pre + self.h_condition(cond)
        gated = gate(h_pre, self.color_groups, self.group_layout)
        h_next = self.h_out(gated) if self.first else h + self.h_out(gated)
        skip_next = self.skip(gated) if skip is None else skip + self.skip(gated)
        return gate(v_pre), h_next, skip_next

    def incremental(self, batch: int, width: int, cond: Conditioning | None = None) -> _GatedStep:
        """This layer position by position; see ``_GatedStep``."""
        return _GatedStep(self, batch, width, cond)


class _GatedStep:
    """A gated layer evaluated row by row (vertical stack) and position by position.

    ``vertical(row, v)`` takes the vertical stack's input for ``row`` (``None`` for the
    first layer, which reads the rows above from its own cache) and returns its output
    for ``row``, ``(B, h, W)``; ``step(h, col)`` returns the horizontal stack's output
    and the skip contribution at ``(row, col)``. ``write`` stores a final input of the
    first layer.
    """

    def __init__(
        self, layer: GatedBlock, batch: int, width: int, cond: Conditioning | None
    ) -> None:
        self.layer = layer
        v_conv = layer.v_conv
        kh, kw = v_conv.kernel_size
        rows = kh // 2 + int(not layer.first)  # kept kernel rows
        weight = (v_conv.weight * v_conv.mask).detach()[:, :, :rows]  # (2h, I, rows, kw)
        self.v_weight = weight
        self.v_bias = None if v_conv.bias is None else v_conv.bias.detach()
        self.pad = kw // 2
        in_c = weight.shape[1]
        # The vertical conv's input rows, zero-padded by kw // 2 columns each side.
        self.cache = weight.new_zeros(batch, in_c, rows, width + 2 * self.pad)
        # First layer: the current row's inputs, gathered step by step (B, W, I).
        self.pending = weight.new_zeros(batch, width, in_c) if layer.first else None
        self.link_weight = layer.link.weight.detach()[:, :, 0, 0].t().contiguous()  # (2h, 2h)
        self.link_bias = None if layer.link.bias is None else layer.link.bias.detach()
        h_conv = layer.h_conv.incremental(batch, width)  # a 1 x k conv: one row, no cache above
        assert isinstance(h_conv, _SpatialStep)
        self.h_conv = h_conv
        # h_out and skip read the same gated vector: one matmul for both, (h, 2h).
        outs = [
            (conv.weight * conv.mask).detach()[:, :, 0, 0] for conv in (layer.h_out, layer.skip)
        ]
        self.out_weight = torch.cat(outs).t().contiguous()
        biases = [
            conv.bias.detach() if conv.bias is not None else outs[0].new_zeros(len(outs[0]))
            for conv in (layer.h_out, layer.skip)
        ]
        self.out_bias = torch.cat(biases)
        self.v_bias_map = None
        self.h_bias = None
        if cond is not None and layer.v_condition is not None and layer.h_condition is not None:
            self.v_bias_map = layer.v_condition(cond).detach()  # (B, 2h, 1 | H, 1 | W)
            self.h_bias = BiasAt(layer.h_condition(cond))

    def vertical(self, row: int, v: Tensor | None) -> Tensor:
        layer = self.layer
        cache = self.cache
        if cache.shape[2] > 1:
            cache[:, :, :-1] = cache[:, :, 1:].clone()
        if layer.first:
            # The rows above: the last one is the previous row's inputs.
            assert self.pending is not None
            if row > 0:
                cache[:, :, -1, self.pad : cache.shape[3] - self.pad] = self.pending.permute(
                    0, 2, 1
                )
            self.pending.zero_()
        else:
            assert v is not None
            cache[:, :, -1, self.pad : cache.shape[3] - self.pad] = v
        v_pre = F.conv2d(cache, self.v_weight, self.v_bias)[:, :, 0]  # (B, 2h, W)
        if self.v_bias_map is not None:
            bias = self.v_bias_map[:, :, row if self.v_bias_map.shape[2] > 1 else 0]
            v_pre = v_pre + bias  # (B, 2h, 1 | W)
        rows = v_pre.permute(2, 0, 1)  # (W, B, 2h)
        # The link from the vertical stack and the conditioning bias are known for the
        # whole row: added to the horizontal conv's row outputs once, not per position.
        self.h_conv.start_row(row)
        self.h_conv.add_to_row(torch.matmul(rows, self.link_weight))
        if self.link_bias is not None:
            self.h_conv.add_to_row(self.link_bias)
        if self.h_bias is not None:
            self.h_bias.start_row(row)
            self.h_conv.add_to_row(self.h_bias.row)  # (1 | W, B, 2h)
        return gate(v_pre)

    def step(self, h: Tensor, col: int) -> tuple[Tensor, Tensor]:
        """The horizontal stack's output at ``col`` and the layer's skip contribution
        there (a view the caller may add into)."""
        layer = self.layer
        if self.pending is not None:
            self.pending[:, col] = h
        gated = gate(self.h_conv.step(h, col), layer.color_groups, layer.group_layout)
        out = torch.addmm(self.out_bias, gated, self.out_weight)  # (B, 2h): h_out | skip
        h_out, skip = out[:, : layer.channels], out[:, layer.channels :]
        return (h_out if layer.first else h + h_out), skip

    def write(self, h: Tensor, col: int) -> None:
        if self.pending is not None:
            self.pending[:, col] = h
        self.h_conv.write(h, col)

    def cache_bytes(self) -> int:
        own = self.cache.numel()
        if self.pending is not None:
            own += self.pending.numel()
        return own * self.cache.element_size() + cache_bytes(self.h_conv)


@dataclass(frozen=True)
class GatedPixelCNNConfig(ModelConfig):
    """Everything needed to rebuild a ``GatedPixelCNN``; plain values, safe to save."""

    num_layers: int = 8  # gated layers

    def _check_trunk(self, groups: int) -> None:
        super()._check_trunk(groups)
        if self.kernel_size < 3:
            raise ValueError(
                f"kernel_size must be >= 3 for the gated PixelCNN: with 1 the stacks see no "
                f"other pixel, but got {self.kernel_size}"
            )


class GatedPixelCNN(AutoregressiveModel):
    """The gated PixelCNN, with no blind spot (van den Oord et al., 2016).

    stem -> ``num_layers`` gated layers (a vertical and a horizontal stack, see
    ``maskedconv._gated``) -> ReLU(skip sum) -> 1x1 B -> ReLU -> 1x1 B -> head. The
    same surface as ``PixelCNN``: heads, stems, conditioning, ``log_prob``,
    ``sample`` (with an exact cached path: the vertical stack computed once per row, the
    horizontal stack per position), ``incremental``, the config round trip.

    Args:
        in_channels: image channels C.
        levels: values a sub-pixel takes, K >= 2.
        hidden_channels: width h of both stacks; divisible by ``color_groups``.
        num_layers: gated layers.
        kernel_size: odd k >= 3: the vertical stack's width and the horizontal reach.
        color_groups: ordered channel groups G; ``None``: the head's choice.
        group_layout: ``"blocked"`` or ``"interleaved"``.
        head: ``"categorical"``, ``"dmol"`` or an instance.
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
    hidden_condition: ConditionBias | None

    def __init__(
        self,
        in_channels: int,
        levels: int,
        *,
        hidden_channels: int = 64,
        num_layers: int = 8,
        kernel_size: int = 7,
        color_groups: int | None = None,
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
        opts: dict[str, Any] = dict(
            color_groups=self.color_groups,
            group_layout=group_layout,
            num_classes=num_classes,
            cond_channels=cond_channels,
        )
        h = hidden_channels
        stem_channels = self.stem.out_channels(in_channels)
        self.layers = nn.ModuleList(
            [GatedBlock(stem_channels, h, kernel_size, first=True, **opts)]
            + [GatedBlock(h, h, kernel_size, **opts) for _ in range(num_layers - 1)]
        )
        masked: dict[str, Any] = dict(color_groups=self.color_groups, group_layout=group_layout)
        self.hidden_conv = MaskedConv2d(h, h, 1, mask_type="B", **masked)
        self.hidden_condition = self._condition_bias(h)
        self.output_conv = MaskedConv2d(h, self.head.num_params(in_channels), 1, **masked)

    def forward_features(self, h: Tensor, cond: Conditioning | None = None) -> Tensor:
        """The head's parameters from the stem's output ``(B, F, H, W)``."""
        v, skip = h, None
        for layer in self.layers:
            v, h, skip = layer(v, h, skip, cond)
        assert skip is not None
        out = self.hidden_conv(F.relu(skip))
        if self.hidden_condition is not None and cond is not None:
            out = out + self.hidden_condition(cond)
        out = self.output_conv(F.relu(out))
        return self.head.arrange(out, self.in_channels, self.group_layout)

    def incremental(
        self,
        batch: int,
        width: int,
        *,
        height: int | None = None,
        labels: Tensor | None = None,
        cond: Tensor | None = None,
    ) -> IncrementalStep:
        """This model evaluated one pixel at a time; see ``PixelCNN.incremental``."""
        self._check_own_forward(GatedPixelCNN)
        conditioning = self._step_conditioning(batch, width, height, labels, cond)
        return _GatedPixelCNNStep(self, batch, width, conditioning)


class _GatedPixelCNNStep:
    def __init__(
        self, model: GatedPixelCNN, batch: int, width: int, cond: Conditioning | None
    ) -> None:
        self.model = model
        self.stem = step_of(model.stem, batch, width)
        blocks = cast("list[GatedBlock]", list(model.layers))
        self.layers = [block.incremental(batch, width, cond) for block in blocks]
        self.hidden_conv = step_of(model.hidden_conv, batch, width)
        self.output_conv = step_of(model.output_conv, batch, width)
        self.hidden_bias = (
            BiasAt(model.hidden_condition(cond))
            if model.hidden_condition is not None and cond is not None
            else None
        )

    def start_row(self, row: int) -> None:
        v = None
        for layer in self.layers:
            v = layer.vertical(row, v)
        self.hidden_conv.start_row(row)
        self.output_conv.start_row(row)
        if self.hidden_bias is not None:
            self.hidden_bias.start_row(row)

    def step(self, x: Tensor, col: int) -> Tensor:
        h = self.stem.step(x, col)
        skip = None
        for layer in self.layers:
            h, contribution = layer.step(h, col)
            # The first contribution is a fresh tensor's view that no one else reads.
            skip = contribution if skip is None else skip.add_(contribution)
        assert skip is not None
        out = self.hidden_conv.step(skip.relu_(), col)
        if self.hidden_bias is not None:
            out = out + self.hidden_bias.at(col)
        out = self.output_conv.step(out.relu_(), col)
        model = self.model
        return model.head.arrange(out, model.in_channels, model.group_layout)

    def write(self, x: Tensor, col: int) -> None:
        # Only the first layer sees a pixel's own input (vertically in later rows,
        # horizontally by mask type A); nothing at this pixel sees its last group.
        self.layers[0].write(self.stem.step(x, col), col)

    def cache_bytes(self) -> int:
        return sum(layer.cache_bytes() for layer in self.layers)
