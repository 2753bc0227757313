"""Causal masks for masked convolutions.

A mask is a ``(out_channels, in_channels, kh, kw)`` tensor of zeros and ones that
is multiplied into a convolution's weight. It is the product of two independent
choices (van den Oord et al., "Pixel Recurrent Neural Networks", 2016):

* a *spatial* causal mask: every tap above the centre row and left of the centre
  on the centre row is kept; every tap below or to the right is dropped;
* a *channel-group order* at the centre tap: with ``color_groups`` G, output group
  g sees input groups ``< g`` (mask type A) or ``<= g`` (mask type B).

For G = 1 this reduces to the familiar pictures (7x7, type B; type A also zeroes
the centre)::

    1 1 1 1 1 1 1
    1 1 1 1 1 1 1
    1 1 1 1 1 1 1
    1 1 1 1 0 0 0
    0 0 0 0 0 0 0
    0 0 0 0 0 0 0
    0 0 0 0 0 0 0

A third spatial context, **checkerboard** (He et al., CVPR 2021), orders the pixels in
two passes instead: the *anchors* (``r + c`` even) first, then the rest. Its mask keeps
the taps at an odd offset (the other colour of the board: anchors around a non-anchor)
and, at the centre, the groups before g (5x5)::

    0 1 0 1 0
    1 0 1 0 1
    0 1 0 1 0
    1 0 1 0 1
    0 1 0 1 0

Around an anchor those taps are non-anchors, which an anchor must not see: a
``MaskedConv2d`` with this mask feeds its taps the anchors only (the layer's rule, not the
mask's), so an anchor sees no other pixel and a non-anchor sees its anchor neighbours.

**Group checkerboard** (ELIC's space-channel context, He et al., CVPR 2022) decodes the
channel groups one after another, each in the two passes of the checkerboard: 2G steps.
Its mask keeps, for output group g, every tap of the input groups before g (they are
decoded everywhere by then) and the odd taps of group g itself (read from the anchors
only, as above); nothing of the groups after g.

``color_groups`` is a count G of equal groups or, for **uneven groups** (ELIC, He et
al., CVPR 2022), a list of group sizes such as ``[1, 1, 2]``: a layer of C channels then
splits in the same proportions, each group ``size * C / sum(sizes)`` channels (blocked
layout only).

Everything here is a pure function returning a new tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from ._checks import int_pair

__all__ = [
    "MaskFunction",
    "make_mask",
    "mask_a",
    "mask_b",
    "mask_checkerboard",
    "mask_group_checkerboard",
]

GROUP_LAYOUTS = ("blocked", "interleaved")


class MaskFunction(Protocol):
    """What ``mask_type`` may be: a function building a mask of the weight's shape.

    It is called with keywords and returns a ``(out_channels, in_channels, kh, kw)``
    tensor of zeros and ones (``bool`` or any real dtype).
    """

    def __call__(
        self,
        *,
        out_channels: int,
        in_channels: int,
        kernel_size: tuple[int, int],
        color_groups: ColorGroups,
        group_layout: str,
    ) -> Tensor: ...


def check_group_layout(group_layout: object) -> str:
    """Return ``group_layout`` if it names a known layout, else raise ``ValueError``."""
    if group_layout not in GROUP_LAYOUTS:
        raise ValueError(f"group_layout must be one of {GROUP_LAYOUTS}, but got {group_layout!r}")
    return str(group_layout)


def group_split_error(
    name: str, channels: int, divisor: int, divisor_text: str | None = None
) -> ValueError:
    """The error for a channel count that does not split into equal colour groups."""
    below = channels - channels % divisor
    above = below + divisor
    nearest = f"{above}" if below == 0 else f"{below} or {above}"
    what = divisor_text or f"color_groups={divisor}"
    return ValueError(
        f"{name} must be divisible by {what} so that every colour group gets the "
        f"same number of channels, but got {channels}; nearest valid values: {nearest}"
    )


ColorGroups = int | tuple[int, ...] | list[int]
"""``color_groups``: a count G of equal groups, or the sizes of uneven ones."""


def group_sizes(color_groups: object) -> tuple[int, ...]:
    """``color_groups`` as sizes: ``3`` -> ``(1, 1, 1)``, ``[16, 16, 32]`` kept (equal sizes
    as ones: ``[2, 2]`` -> ``(1, 1)``).

    Raises:
        ValueError: for anything but a positive int or a non-empty list of them.
    """
    if isinstance(color_groups, int) and not isinstance(color_groups, bool) and color_groups >= 1:
        return (1,) * color_groups
    sizes = list(color_groups) if isinstance(color_groups, (list, tuple)) else []
    if sizes and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes):
        # Equal sizes are G equal groups: [2, 2] splits 6 channels as 2 does.
        return (1,) * len(sizes) if len(set(sizes)) == 1 else tuple(sizes)
    raise ValueError(
        f"color_groups must be a positive int (equal groups) or a non-empty list of positive "
        f"group sizes (uneven groups, e.g. [1, 1, 2]), but got {color_groups!r}"
    )


def normal_color_groups(color_groups: object) -> int | list[int]:
    """``color_groups`` as an int G for equal groups, a list of sizes for uneven ones."""
    sizes = group_sizes(color_groups)
    return len(sizes) if len(set(sizes)) == 1 else list(sizes)


def group_unit(color_groups: object) -> int:
    """What a channel count must be a multiple of to split into ``color_groups``:
    G for equal groups, the sum of the sizes for uneven ones."""
    return sum(group_sizes(color_groups))


def check_color_groups(color_groups: object, group_layout: str, **channels: int) -> tuple[int, ...]:
    """Check that each named channel count splits into ``color_groups``; return the sizes.

    Raises:
        ValueError: for a bad ``color_groups``, uneven groups with the interleaved layout,
            or a count that does not split.
    """
    sizes = group_sizes(color_groups)
    check_group_layout(group_layout)
    uneven = len(set(sizes)) > 1
    if uneven and group_layout != "blocked":
        raise ValueError(
            f"uneven color_groups={list(sizes)} need group_layout='blocked' (each group a "
            f"contiguous block of channels), but got group_layout={group_layout!r}"
        )
    unit = sum(sizes)  # G for equal groups (their sizes are ones)
    for name, value in channels.items():
        if value % unit:
            text = f"sum(color_groups)={unit} (the groups' sizes {list(sizes)})" if uneven else None
            raise group_split_error(name, value, unit, text)
    return sizes


def channel_groups(
    channels: int, color_groups: ColorGroups, group_layout: str = "blocked"
) -> Tensor:
    """Colour group of each channel.

    Args:
        channels: number of channels C; must split into ``color_groups``.
        color_groups: number of autoregressively ordered groups G, or their sizes
            (uneven groups: group g gets ``sizes[g] * C / sum(sizes)`` channels).
        group_layout: ``"blocked"`` (channels ``[g*C/G, (g+1)*C/G)`` form group g)
            or ``"interleaved"`` (channel c is in group ``c % G``).

    Returns:
        ``(C,)`` int64 tensor with values in ``[0, G)``.

    Raises:
        ValueError: if the layout is unknown or C does not split into the groups.
    """
    sizes = check_color_groups(color_groups, group_layout, channels=channels)
    index = torch.arange(channels)
    if group_layout == "interleaved":
        return index % len(sizes)
    scale = channels // sum(sizes)
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes) * scale)


def group_slices(
    channels: int, color_groups: ColorGroups, group_layout: str = "blocked"
) -> list[slice]:
    """The channels of each colour group, as slices (the grouping of ``channel_groups``).

    Returns:
        One slice per group: contiguous blocks, or every G-th channel when interleaved.
    """
    sizes = check_color_groups(color_groups, group_layout, channels=channels)
    if group_layout == "interleaved":
        return [slice(g, None, len(sizes)) for g in range(len(sizes))]
    scale = channels // sum(sizes)
    ends = [scale * sum(sizes[: g + 1]) for g in range(len(sizes))]
    return [slice(end - scale * size, end) for end, size in zip(ends, sizes, strict=True)]


def spatial_mask(kernel_size: tuple[int, int], *, include_center: bool) -> Tensor:
    """The ``(kh, kw)`` causal mask: rows above the centre, and the centre row left of it.

    Args:
        kernel_size: odd ``(kh, kw)``.
        include_center: whether the centre tap is kept.

    Returns:
        ``(kh, kw)`` bool tensor.
    """
    kh, kw = kernel_size
    mask = torch.zeros(kh, kw, dtype=torch.bool)
    mask[: kh // 2, :] = True
    mask[kh // 2, : kw // 2 + int(include_center)] = True
    return mask


def _ordered_mask(
    *,
    out_channels: int,
    in_channels: int,
    kernel_size: tuple[int, int],
    color_groups: ColorGroups,
    group_layout: str,
    include_own_group: bool,
) -> Tensor:
    # Strictly earlier pixels are always visible; at the centre tap the
    # channel-group order decides.
    out_groups = channel_groups(out_channels, color_groups, group_layout)
    in_groups = channel_groups(in_channels, color_groups, group_layout)
    if include_own_group:
        center = out_groups[:, None] >= in_groups[None, :]
    else:
        center = out_groups[:, None] > in_groups[None, :]
    kh, kw = kernel_size
    mask = (
        spatial_mask(kernel_size, include_center=False)
        .expand(out_channels, in_channels, kh, kw)
        .clone()
    )
    mask[:, :, kh // 2, kw // 2] = center
    return mask


def mask_a(
    *,
    out_channels: int,
    in_channels: int,
    kernel_size: tuple[int, int],
    color_groups: ColorGroups = 1,
    group_layout: str = "blocked",
) -> Tensor:
    """Mask type A: output group g at pixel p sees input groups ``< g`` at p.

    Used by the first layer, whose input is the image itself: with G = 1 the centre
    tap is dropped, so a pixel never sees its own value.

    Returns:
        ``(out_channels, in_channels, kh, kw)`` bool tensor.
    """
    return _ordered_mask(
        out_channels=out_channels,
        in_channels=in_channels,
        kernel_size=kernel_size,
        color_groups=color_groups,
        group_layout=group_layout,
        include_own_group=False,
    )


def mask_b(
    *,
    out_channels: int,
    in_channels: int,
    kernel_size: tuple[int, int],
    color_groups: ColorGroups = 1,
    group_layout: str = "blocked",
) -> Tensor:
    """Mask type B: output group g at pixel p sees input groups ``<= g`` at p.

    Used by every layer after the first: its input at (p, g) already depends only on
    what (p, g) may see, so passing it on keeps the model causal.

    Returns:
        ``(out_channels, in_channels, kh, kw)`` bool tensor.
    """
    return _ordered_mask(
        out_channels=out_channels,
        in_channels=in_channels,
        kernel_size=kernel_size,
        color_groups=color_groups,
        group_layout=group_layout,
        include_own_group=True,
    )


def is_anchor(rows: Tensor, cols: Tensor) -> Tensor:
    """Whether each ``(row, col)`` is a checkerboard anchor (``row + col`` even), broadcast."""
    return (rows + cols) % 2 == 0


def checkerboard_taps(kernel_size: tuple[int, int]) -> Tensor:
    """The ``(kh, kw)`` taps at an odd offset from the centre: the other colour of the board."""
    kh, kw = kernel_size
    rows = torch.arange(kh).view(-1, 1) - kh // 2
    cols = torch.arange(kw).view(1, -1) - kw // 2
    return (rows + cols) % 2 == 1


def mask_checkerboard(
    *,
    out_channels: int,
    in_channels: int,
    kernel_size: tuple[int, int],
    color_groups: ColorGroups = 1,
    group_layout: str = "blocked",
) -> Tensor:
    """The checkerboard mask (He et al., CVPR 2021): the taps at an odd offset, every
    channel; at the centre, output group g sees input groups ``< g`` (as type A).

    The mask alone is not causal: around an anchor its taps are non-anchors. A
    ``MaskedConv2d(mask_type="checkerboard")`` feeds those taps the anchors only; given
    as a callable, this function builds a plain translation-invariant conv (in which an
    anchor sees its non-anchor neighbours, as ``assert_causal`` shows).

    Returns:
        ``(out_channels, in_channels, kh, kw)`` bool tensor.
    """
    centre = mask_a(
        out_channels=out_channels,
        in_channels=in_channels,
        kernel_size=(1, 1),
        color_groups=color_groups,
        group_layout=group_layout,
    )
    kh, kw = kernel_size
    mask = checkerboard_taps(kernel_size).expand(out_channels, in_channels, kh, kw).clone()
    mask[:, :, kh // 2, kw // 2] = centre[:, :, 0, 0]
    return mask


def mask_group_checkerboard(
    *,
    out_channels: int,
    in_channels: int,
    kernel_size: tuple[int, int],
    color_groups: ColorGroups = 1,
    group_layout: str = "blocked",
) -> Tensor:
    """The group-checkerboard mask (ELIC, He et al., CVPR 2022): output group g sees every
    tap of the input groups ``< g`` and the odd taps of group g; nothing of later groups.

    As for the checkerboard, the mask alone is not causal: a
    ``MaskedConv2d(mask_type="group-checkerboard")`` reads group g's odd taps from the
    anchors only (``anchor_only_taps``). With G = 1 it is the checkerboard mask.

    Returns:
        ``(out_channels, in_channels, kh, kw)`` bool tensor.
    """
    earlier, same = _group_relation(out_channels, in_channels, color_groups, group_layout)
    kh, kw = kernel_size
    return earlier.expand(-1, -1, kh, kw) | (same & checkerboard_taps(kernel_size))


def _group_relation(
    out_channels: int, in_channels: int, color_groups: ColorGroups, group_layout: str
) -> tuple[Tensor, Tensor]:
    """``(O, I, 1, 1)`` bool: whether input channel i is in a group before output channel
    o's, and whether it is in the same group."""
    out_groups = channel_groups(out_channels, color_groups, group_layout)[:, None]
    in_groups = channel_groups(in_channels, color_groups, group_layout)[None, :]
    shape = (out_channels, in_channels, 1, 1)
    return (out_groups > in_groups).view(shape), (out_groups == in_groups).view(shape)


def anchor_only_taps(
    mask_type: object, mask: Tensor, color_groups: ColorGroups, group_layout: str
) -> Tensor | None:
    """The entries of a board mask whose taps read the anchors only, as a bool tensor of
    the mask's shape; ``None`` for a mask type without that rule (A, B, a callable).

    ``"checkerboard"``: every odd tap; ``"group-checkerboard"``: the odd taps of the
    output's own group (the earlier groups are read everywhere).
    """
    if mask_type not in BOARD_MASK_TYPES:
        return None
    out_channels, in_channels, kh, kw = mask.shape
    gated = mask.bool() & checkerboard_taps((kh, kw))
    if mask_type == "group-checkerboard":
        gated &= _group_relation(out_channels, in_channels, color_groups, group_layout)[1]
    return gated


MASK_TYPES: dict[str, MaskFunction] = {
    "A": mask_a,
    "B": mask_b,
    "checkerboard": mask_checkerboard,
    "group-checkerboard": mask_group_checkerboard,
}
BOARD_MASK_TYPES = ("checkerboard", "group-checkerboard")
"""The mask types whose odd taps read the anchors only (a layer's rule)."""


def resolve_mask_type(mask_type: str | Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Map ``"A"``/``"B"`` to their mask functions; pass a callable through as-is."""
    if isinstance(mask_type, str):
        if mask_type not in MASK_TYPES:
            raise ValueError(
                f"mask_type must be one of {tuple(MASK_TYPES)} or a callable, but got {mask_type!r}"
            )
        return MASK_TYPES[mask_type]
    if callable(mask_type):
        return mask_type
    raise TypeError(
        f"mask_type must be one of {tuple(MASK_TYPES)} or a callable, "
        f"but got {type(mask_type).__name__} {mask_type!r}"
    )


def make_mask(
    mask_type: str | Callable[..., Tensor],
    *,
    out_channels: int,
    in_channels: int,
    kernel_size: int | tuple[int, int],
    color_groups: ColorGroups = 1,
    group_layout: str = "blocked",
) -> Tensor:
    """Build and check a mask of shape ``(out_channels, in_channels, kh, kw)``.

    Args:
        mask_type: ``"A"``, ``"B"`` or a ``MaskFunction``.
        out_channels: rows of the weight.
        in_channels: columns of the weight (``in_channels // groups`` for a grouped conv).
        kernel_size: ``(kh, kw)``, or one odd int k for ``(k, k)`` as ``nn.Conv2d`` takes.
        color_groups: number of channel groups G.
        group_layout: ``"blocked"`` or ``"interleaved"``.

    Returns:
        float32 tensor of zeros and ones.

    Raises:
        ValueError: if a callable returns the wrong shape or values other than 0 and 1.
        TypeError: if a callable returns something other than a tensor.
    """
    fn = resolve_mask_type(mask_type)
    try:
        kernel = int_pair("kernel_size", kernel_size)
    except (TypeError, ValueError):
        kernel = (0, 0)  # refused just below, with one message for every bad kernel_size
    if min(kernel) < 1:
        raise ValueError(
            f"kernel_size must be a positive int or a pair (kh, kw) of them, but got "
            f"{kernel_size!r}"
        )
    if isinstance(mask_type, str) and any(k % 2 == 0 for k in kernel):
        raise ValueError(
            f"kernel_size must be odd for mask type {mask_type!r} so that the kernel has a "
            f"centre tap (an even one would mask off-centre), but got {kernel_size!r}"
        )
    mask = fn(
        out_channels=out_channels,
        in_channels=in_channels,
        kernel_size=kernel,
        color_groups=color_groups,
        group_layout=group_layout,
    )
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"mask_type callable must return a torch.Tensor, but got {type(mask).__name__}"
        )
    expected = (out_channels, in_channels, *kernel)
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"mask_type callable must return a mask of the weight's shape {expected}, "
            f"but got {tuple(mask.shape)}"
        )
    if mask.is_complex():
        raise ValueError(
            "mask_type callable must return a real mask of 0s and 1s, but got a complex tensor"
        )
    mask = mask.detach().to(torch.float32)
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        value = mask[bad][0].item()
        raise ValueError(
            f"mask_type callable must return only 0s and 1s, but got the value {value}"
        )
    return mask
