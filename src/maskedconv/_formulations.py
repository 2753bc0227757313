"""How ``MaskedConv2d`` convolves: three formulations of one masked convolution.

A causal mask keeps only the kernel rows at and above the centre, so every formulation
convolves only the taps the mask keeps, in one or two pieces:

- ``"crop"``: the kept rows and columns as one kernel, symmetric padding, and a slice of
  the (taller) output;
- ``"pad"``: the kept rows and columns as one kernel, the input padded asymmetrically
  (``F.pad``) so that the output is exactly H x W;
- ``"split"``: the rows above the centre and the centre row as two kernels (for 7x7
  type B: 3x7 and 1x4, 25 taps instead of the crop's 28), each padded as in ``"pad"``,
  summed.

All three give the full masked convolution, forward and backward, up to float rounding.
Which is fastest depends on the CPU (the crop's backward ran 0.65x dense on an AMD EPYC
and 0.85-1.0x on an Intel Xeon), the memory format and the shape. By default the layer
uses ``"pad"``; ``set_conv_autotune(True)`` makes it time the candidates once per kind of
call instead, as ``torch.backends.cudnn.benchmark`` does, and cache the fastest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["chosen_formulations", "set_conv_autotune"]

FORMULATIONS = ("crop", "pad", "split")
DEFAULT = "pad"


@dataclass(frozen=True)
class Piece:
    """One convolution over a block of kernel taps: ``rows`` x ``cols`` of the kernel,
    the input padded by ``pad`` (``F.pad`` order: left, right, top, bottom), the conv's
    own symmetric ``padding``, and the ``offset`` at which the H x W output starts when
    the output is larger (``None``: it is exactly H x W)."""

    rows: slice
    cols: slice
    pad: tuple[int, int, int, int]
    padding: tuple[int, int]
    offset: tuple[int, int] | None = None


Plan = tuple[Piece, ...]


def _kept(mask: Tensor, dim: int) -> tuple[int, int] | None:
    """First and last index along ``dim`` (2: rows, 3: cols) where ``mask`` has a 1."""
    other = tuple(d for d in range(4) if d != dim)
    kept = torch.nonzero(mask.amax(dim=other)).flatten()
    if kept.numel() == 0:
        return None
    return int(kept[0]), int(kept[-1])


def _padded_piece(mask: Tensor, rows: tuple[int, int], dilation: tuple[int, int]) -> Piece | None:
    """The taps of kernel rows ``rows`` (inclusive) that the mask keeps, as a ``"pad"`` piece."""
    block = mask[:, :, rows[0] : rows[1] + 1]
    row_span, col_span = _kept(block, 2), _kept(block, 3)
    if row_span is None or col_span is None:
        return None
    first_row, last_row = rows[0] + row_span[0], rows[0] + row_span[1]
    centre_row, centre_col = mask.shape[2] // 2, mask.shape[3] // 2
    # Output (i, j) reads input (i + (r - centre_row) * d, ...) for kept taps r: pad the
    # top by how far above the centre the first kept row is, the bottom by how far below
    # the last is (negative: crop), and the same for the columns.
    top, bottom = (centre_row - first_row) * dilation[0], (last_row - centre_row) * dilation[0]
    left, right = (centre_col - col_span[0]) * dilation[1], (col_span[1] - centre_col) * dilation[1]
    padding = [0, 0]
    if top == bottom:
        padding[0], top, bottom = top, 0, 0
    if left == right:
        padding[1], left, right = left, 0, 0
    # A negative pad (a mask that keeps nothing on one side of the centre) would crop
    # the input, which fails on inputs narrower than the crop: pad zero there and crop
    # the output instead.
    offset = (max(-top, 0), max(-left, 0)) if min(top, bottom, left, right) < 0 else None
    return Piece(
        slice(first_row, last_row + 1),
        slice(col_span[0], col_span[1] + 1),
        (max(left, 0), max(right, 0), max(top, 0), max(bottom, 0)),
        (padding[0], padding[1]),
        offset,
    )


def plan(mask: Tensor, dilation: tuple[int, int], formulation: str) -> Plan | None:
    """The pieces of ``formulation`` for ``mask``; ``()`` if the mask keeps nothing, and
    ``None`` if the formulation is the same as ``"pad"`` for this mask (``"crop"`` of a
    kernel whose kept taps are symmetric about the centre, such as 1x1; ``"split"`` of a
    mask with nothing above or nothing at the centre row)."""
    row_span, col_span = _kept(mask, 2), _kept(mask, 3)
    if row_span is None or col_span is None:
        return ()
    if formulation == "crop":
        slices, padding, offsets = [], [], []
        for (first, last), size, dil in zip(
            (row_span, col_span), mask.shape[2:], dilation, strict=True
        ):
            centre = size // 2
            # Pad symmetrically enough for both ends of the kept span, skip the excess.
            pad = max(centre - first, last - centre, 0) * dil
            slices.append(slice(first, last + 1))
            padding.append(pad)
            offsets.append(pad + (first - centre) * dil)
        # A span symmetric about the centre needs no slice: that is "pad" again.
        exact = all(
            first - centre == centre - last
            for (first, last), centre in zip(
                (row_span, col_span), (c // 2 for c in mask.shape[2:]), strict=True
            )
        )
        offset = None if exact else (offsets[0], offsets[1])
        crop = Piece(slices[0], slices[1], (0, 0, 0, 0), (padding[0], padding[1]), offset)
        return None if crop == _padded_piece(mask, row_span, dilation) else (crop,)
    if formulation == "pad":
        padded = _padded_piece(mask, row_span, dilation)
        return () if padded is None else (padded,)
    if formulation == "split":
        centre = mask.shape[2] // 2
        if not row_span[0] < centre <= row_span[1]:
            return None
        pieces = [_padded_piece(mask, (row_span[0], centre - 1), dilation)]
        pieces.append(_padded_piece(mask, (centre, row_span[1]), dilation))
        return tuple(p for p in pieces if p is not None)
    raise ValueError(f"formulation must be one of {FORMULATIONS}, but got {formulation!r}")


def run(
    pieces: Plan,
    input: Tensor,
    weight: Tensor,
    mask: Tensor,
    bias: Tensor | None,
    dilation: tuple[int, int],
    groups: int,
) -> Tensor:
    """The masked convolution by ``pieces`` (non-empty), the bias added once."""
    height, width = input.shape[-2:]
    out: Tensor | None = None
    for piece in pieces:
        taps = weight[:, :, piece.rows, piece.cols] * mask[:, :, piece.rows, piece.cols]
        x = F.pad(input, piece.pad) if any(piece.pad) else input
        y = F.conv2d(x, taps, bias if out is None else None, 1, piece.padding, dilation, groups)
        if piece.offset is not None:
            top, left = piece.offset
            y = y[..., top : top + height, left : left + width]
        out = y if out is None else out + y
    assert out is not None
    return out


# --- choosing one ------------------------------------------------------------------------

_autotune = False
_chosen: dict[tuple[Any, ...], str] = {}


def set_conv_autotune(enabled: bool) -> bool:
    """Choose each ``MaskedConv2d``'s formulation by timing, or by the fixed rule.

    Off (the default), every layer uses ``"pad"``: asymmetric padding of the input and a
    convolution with only the kernel rows the mask keeps. On, the first call of each
    kind (input shape, dtype, device, memory format, layer shape, mask, and whether
    gradients are needed) times ``"crop"``, ``"pad"`` and ``"split"`` (forward, plus
    backward when gradients are needed) and caches the fastest for later calls, as
    ``torch.backends.cudnn.benchmark`` does. All give the same result up to float
    rounding; the first call of each kind takes a few extra passes. Calls under
    ``torch.compile``, ``torch.export`` or tracing use the cached choice or the rule.

    Args:
        enabled: ``True`` to time and cache, ``False`` for the fixed rule.

    Returns:
        The previous setting.

    Raises:
        TypeError: if ``enabled`` is not a bool.

    Example:
        >>> import torch
        >>> from maskedconv import MaskedConv2d, chosen_formulations, set_conv_autotune
        >>> previous = set_conv_autotune(True)
        >>> _ = MaskedConv2d(8, 8, 7)(torch.randn(2, 8, 12, 12))
        >>> set(chosen_formulations().values()) <= {"crop", "pad", "split"}
        True
        >>> _ = set_conv_autotune(previous)
    """
    global _autotune
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, but got {type(enabled).__name__} {enabled!r}")
    previous, _autotune = _autotune, enabled
    return previous


def chosen_formulations() -> dict[str, str]:
    """What autotuning chose so far: a readable description of each kind of call, and
    its formulation (``"crop"``, ``"pad"`` or ``"split"``). Empty while it is off."""
    return {_describe(key): name for key, name in _chosen.items()}


def _describe(key: tuple[Any, ...]) -> str:
    shape, dtype, device, channels_last, weight_shape, mask, dilation, groups, grads = key
    return (
        f"input {tuple(shape)} {str(dtype).removeprefix('torch.')} on {device}"
        f"{' channels_last' if channels_last else ''}, weight {tuple(weight_shape)}, "
        f"{mask[0]}"
        f"{f', dilation {dilation}' if dilation != (1, 1) else ''}"
        f"{f', groups {groups}' if groups != 1 else ''}, {grads}"
    )


def _tracing(input: Tensor) -> bool:
    compiler = torch.compiler
    return (
        compiler.is_compiling()
        or compiler.is_exporting()
        or torch._C._get_tracing_state() is not None  # torch.jit.trace
        or type(input) not in (Tensor, torch.nn.Parameter)
        or input.device.type == "meta"
    )


class ConvArgs(NamedTuple):
    """One masked conv call: what ``run`` takes after the pieces."""

    input: Tensor
    weight: Tensor
    mask: Tensor
    bias: Tensor | None
    dilation: tuple[int, int]
    groups: int


def choose(plans: dict[str, Plan], mask_id: tuple[str, str], args: ConvArgs) -> Plan:
    """The plan to use for this call: the rule's, or the cached or newly timed fastest.
    ``mask_id``: the layer's mask description and digest."""
    input, weight, bias = args.input, args.weight, args.bias
    if not _autotune or len(plans) == 1 or _tracing(input):
        return plans[DEFAULT]
    grads = torch.is_grad_enabled() and (
        input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    key = (
        input.shape,
        input.dtype,
        str(input.device),
        input.dim() == 4
        and not input.is_contiguous()
        and input.is_contiguous(memory_format=torch.channels_last),
        weight.shape,
        mask_id,
        args.dilation,
        args.groups,
        ("forward+backward" if grads else "forward"),
    )
    name = _chosen.get(key)
    if name is None:
        name = _time(plans, args, grads)
        _chosen[key] = name
    return plans[name]


def _time(plans: dict[str, Plan], args: ConvArgs, grads: bool, rounds: int = 5) -> str:
    """The fastest plan by the minimum over interleaved rounds, on detached copies (no
    gradient reaches the real parameters)."""

    def leaf(t: Tensor) -> Tensor:
        return t.detach().requires_grad_(grads and t.requires_grad)

    copies = args._replace(
        input=leaf(args.input),
        weight=leaf(args.weight),
        bias=None if args.bias is None else leaf(args.bias),
    )
    params: Sequence[Tensor] = [
        t for t in (copies.input, copies.weight, copies.bias) if t is not None and t.requires_grad
    ]

    def call(pieces: Plan) -> Callable[[], None]:
        def go() -> None:
            with torch.enable_grad() if grads else torch.no_grad():
                out = run(pieces, *copies)
                if grads:
                    torch.autograd.grad(out, params, torch.ones_like(out))
            if out.device.type != "cpu":  # wait for an asynchronous device (CUDA, MPS, XPU)
                torch.accelerator.synchronize(out.device)

        return go

    calls = {name: call(pieces) for name, pieces in plans.items()}
    best = dict.fromkeys(calls, float("inf"))
    for fn in calls.values():  # warm-up: allocator, kernels chosen by the backend
        fn()
    for _ in range(rounds):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return min(best, key=best.__getitem__)
