"""``MaskedConv2d``: a causal ``nn.Conv2d``, and its functional twin."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, TypeAlias, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from ._checks import as_int, int_pair
from ._formulations import DEFAULT as DEFAULT_FORMULATION
from ._formulations import FORMULATIONS, ConvArgs
from ._formulations import choose as choose_formulation
from ._formulations import plan as formulation_plan
from ._formulations import run as run_formulation
from ._masks import (
    BOARD_MASK_TYPES,
    ColorGroups,
    anchor_only_taps,
    check_color_groups,
    is_anchor,
    make_mask,
    normal_color_groups,
    resolve_mask_type,
)

__all__ = ["MaskedConv2d", "masked_conv2d"]

_Size2: TypeAlias = "int | tuple[int, int]"


def masked_conv2d(
    input: Tensor,
    weight: Tensor,
    mask: Tensor,
    bias: Tensor | None = None,
    padding: _Size2 = 0,
    dilation: _Size2 = 1,
    groups: int = 1,
) -> Tensor:
    """Convolve ``input`` with ``weight * mask`` (stride 1).

    The product is taken inside the autograd graph, so ``weight.grad`` is exactly
    zero wherever ``mask`` is zero, and ``weight`` itself is never modified.

    Args:
        input: ``(B, C_in, H, W)``.
        weight: ``(C_out, C_in // groups, kh, kw)``.
        mask: zeros and ones, broadcastable to ``weight``.
        bias: ``(C_out,)`` or ``None``.
        padding: zero padding, as in ``torch.nn.functional.conv2d``.
        dilation: as in ``torch.nn.functional.conv2d``.
        groups: as in ``torch.nn.functional.conv2d``.

    Returns:
        ``(B, C_out, H', W')``; with ``padding = dilation * (k - 1) // 2`` the input's
        height and width are kept.

    Raises:
        ValueError: for a mask with a value other than 0 and 1.
    """
    if not torch.compiler.is_compiling() and bool(((mask != 0) & (mask != 1)).any()):
        odd = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
        raise ValueError(
            f"mask must hold only zeros and ones (another value scales the tap instead of "
            f"masking it), but got {odd:g}"
        )
    return F.conv2d(input, weight * mask, bias, 1, padding, dilation, groups)


def _mask_bits(mask: Tensor) -> bytes:
    """Which taps a mask keeps, as bytes (for comparing two masks of any dtype or device)."""
    return bytes(mask.detach().ne(0).to(torch.uint8).cpu().numpy().tobytes())


def refuse_torchscript(self: nn.Module) -> Any:
    """``torch.jit.script`` calls this first on every module: refuse with a clear message."""
    raise TypeError(
        f"torch.jit.script is not supported for {type(self).__name__} (TorchScript is in "
        f"maintenance mode; this library's annotations and checks are plain Python): use "
        f"torch.compile(model) or torch.export.export(model, (x,)), which are tested, or "
        f"torch.jit.trace"
    )


def _accept_without_extra_state(
    module: MaskedConv2d, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    # A plain nn.Conv2d's (or a 0.1) state_dict has no mask description: it loads as
    # before, into whatever mask this layer has.
    state_dict.setdefault(prefix + "_extra_state", module.get_extra_state())


class MaskedConv2d(nn.Conv2d):
    """A 2-D convolution that sees only the causal past of each output.

    With ``color_groups`` G, input and output channels are split into G ordered
    groups (``group_layout`` says how). Output group g at pixel p sees every input at
    pixels before p in raster order, and at p the input groups ``< g``
    (``mask_type="A"``) or ``<= g`` (``mask_type="B"``). For G = 3 this is the
    R -> G -> B ordering of PixelCNN (van den Oord et al., 2016).

    ``mask_type="checkerboard"`` (He et al., CVPR 2021) keeps the taps at an odd offset and
    reads them from the anchors only (pixels with ``row + col`` even; the others' inputs
    count as zero), with the type-A group rule at the centre: an anchor sees no other
    pixel, a non-anchor its anchor neighbours. Decode such a model with
    ``maskedconv.checkerboard``: anchors first, then the rest.

    ``mask_type="group-checkerboard"`` (ELIC's space-channel context, He et al., CVPR
    2022) decodes the colour groups one after another, each as a checkerboard: output
    group g sees the input groups before g at every tap (read as they are) and its own
    group at the odd taps (read from the anchors only). Decode it with
    ``maskedconv.group_checkerboard``: 2G steps.

    The mask is a non-persistent buffer ``.mask`` of the weight's shape, fixed at
    construction and multiplied into the weight inside ``forward``. Only the kernel
    rows and columns the mask keeps are convolved (for a causal mask, the rows at and
    above the centre: about half the multiply-adds of the full kernel), with the same
    result as the full masked convolution (how, and how to let the layer time the ways
    of doing it: ``maskedconv.set_conv_autotune``); masked weights are zeroed at construction,
    get exactly zero gradient, and a ``state_dict`` stays that of a plain
    ``nn.Conv2d``. Output height and width equal the input's.

    Args:
        in_channels: input channels; divisible by ``color_groups``.
        out_channels: output channels; divisible by ``color_groups``.
        kernel_size: odd int or pair of odd ints.
        stride: must be 1 (a strided causal conv would skip pixels it must emit).
        padding: ``None`` or ``"same"`` (default: keep H and W), or the explicit
            value that keeps them, ``dilation * (k - 1) // 2``.
        dilation: as in ``nn.Conv2d``.
        groups: as in ``nn.Conv2d``; only 1 when ``color_groups > 1``.
        bias: as in ``nn.Conv2d``.
        padding_mode: must be ``"zeros"``: reflected or circular padding copies
            future pixels into the past.
        mask_type: ``"A"``, ``"B"``, ``"checkerboard"``, ``"group-checkerboard"`` or a
            callable (see
            ``maskedconv.MaskFunction``) returning a 0/1 mask.
        color_groups: number of ordered channel groups G (1 for binary or grayscale), or
            a list of uneven group sizes (``[1, 1, 2]``: group g takes
            ``sizes[g] * C / sum(sizes)`` of C channels; blocked layout only).
        group_layout: ``"blocked"`` (contiguous thirds for RGB) or ``"interleaved"``
            (channel c in group ``c % G``).
        device: as in ``nn.Conv2d``.
        dtype: as in ``nn.Conv2d``.

    Raises:
        ValueError: for an unknown mask type, an even kernel size, channels that do not
            split into ``color_groups``, ``stride != 1``, a padding that changes the
            size, a ``padding_mode`` other than ``"zeros"``, ``groups > 1`` with
            ``color_groups > 1``, or a callable mask of the wrong shape or values.
        TypeError: if ``mask_type`` is neither a string nor a callable.

    Example:
        >>> conv = MaskedConv2d(3, 48, 7, mask_type="A", color_groups=3)
        >>> conv(torch.randn(2, 3, 28, 28)).shape
        torch.Size([2, 48, 28, 28])
    """

    mask: Tensor

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _Size2,
        stride: _Size2 = 1,
        padding: _Size2 | str | None = None,
        dilation: _Size2 = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        mask_type: str | Callable[..., Tensor] = "B",
        color_groups: ColorGroups = 1,
        group_layout: str = "blocked",
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        resolve_mask_type(mask_type)
        kernel = int_pair("kernel_size", kernel_size)
        dilation2 = int_pair("dilation", dilation)
        in_channels = as_int("in_channels", in_channels)
        out_channels = as_int("out_channels", out_channels)
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if value < 1:
                raise ValueError(f"{name} must be a positive int, but got {value!r}")
        if any(k < 1 for k in kernel):
            raise ValueError(f"kernel_size must be positive and odd, but got {kernel_size}")
        if any(k % 2 == 0 for k in kernel):
            raise ValueError(
                "kernel_size must be odd so that the kernel has a centre tap, "
                f"but got {kernel_size}"
            )
        if any(d < 1 for d in dilation2):
            raise ValueError(f"dilation must be a positive int or pair, but got {dilation}")
        if _pair(stride) != (1, 1):
            raise ValueError(
                f"stride must be 1: a strided masked conv cannot emit every pixel, but got {stride}"
            )
        same = (dilation2[0] * (kernel[0] - 1) // 2, dilation2[1] * (kernel[1] - 1) // 2)
        if padding is None or padding == "same":
            padding = same
        elif isinstance(padding, str) or _pair(padding) != same:
            raise ValueError(
                f"padding must be None, 'same' or {same} (the padding that keeps the "
                f"height and width for kernel_size={kernel}, dilation={dilation2}), "
                f"but got {padding!r}"
            )
        if padding_mode != "zeros":
            raise ValueError(
                f"padding_mode must be 'zeros': {padding_mode!r} padding copies pixels from "
                f"the bottom and right edges into the visible past, but got {padding_mode!r}"
            )
        sizes = check_color_groups(
            color_groups, group_layout, in_channels=in_channels, out_channels=out_channels
        )
        color_groups = normal_color_groups(sizes)
        if mask_type in BOARD_MASK_TYPES and any(d % 2 == 0 for d in dilation2):
            raise ValueError(
                f"dilation must be odd for mask_type={mask_type!r}: an even dilation puts "
                f"every tap on the centre's own colour of the board, but got {dilation}"
            )
        if groups != 1 and len(sizes) != 1:
            raise ValueError(
                f"groups must be 1 when color_groups > 1: a grouped convolution cuts the "
                f"channels into blocks that do not follow the colour-group order, but got "
                f"groups={groups} with color_groups={color_groups}"
            )
        super().__init__(
            in_channels,
            out_channels,
            kernel,
            stride=1,
            padding=_pair(padding),
            dilation=dilation2,
            groups=groups,
            bias=bias,
            padding_mode="zeros",
            device=device,
            dtype=dtype,
        )
        self.mask_type = mask_type
        self.color_groups = color_groups
        self.group_layout = group_layout
        with torch.device("cpu"):  # real values even under `with torch.device("meta")`
            mask = make_mask(
                mask_type,
                out_channels=out_channels,
                in_channels=in_channels // groups,
                kernel_size=kernel,
                color_groups=color_groups,
                group_layout=group_layout,
            )
        # The mask is rebuilt from this copy whenever the module's tensors are (see
        # _apply): `.to_empty()` would otherwise leave it uninitialised memory.
        self._mask_source = mask
        self.register_buffer(
            "mask", mask.to(device=self.weight.device, dtype=self.weight.dtype), persistent=False
        )
        # A board mask's taps that read the anchors only (a float mask; None otherwise).
        gated = anchor_only_taps(mask_type, mask, color_groups, group_layout)
        self._anchor_source = None if gated is None else gated.to(mask.dtype)
        self.register_buffer(
            "anchor_mask",
            None if gated is None else gated.to(self.weight.device, self.weight.dtype),
            persistent=False,
        )
        self._mask_bits = _mask_bits(mask)
        self._mask_seen = (id(self.mask), self.mask._version)
        with torch.no_grad():
            self.weight.mul_(self.mask)
        self._plans = {
            name: pieces
            for name in FORMULATIONS
            if (pieces := formulation_plan(mask, dilation2, name)) is not None
        }
        kh, kw = kernel
        self._centre_kept = bool(mask[:, :, kh // 2, kw // 2].any())
        # Whether the taps read as they are (a board mask's) are at the centre alone.
        rest = mask if gated is None else mask * (1 - gated.to(mask.dtype))
        rest_taps = rest.ne(0).any(0).any(0)
        rest_taps[kh // 2, kw // 2] = False
        self._rest_centre_only = not bool(rest_taps.any())
        digest = hashlib.sha256(f"{tuple(mask.shape)}".encode() + mask.numpy().tobytes())
        self._mask_digest = digest.hexdigest()
        self._mask_id = (self._mask_description(), self._mask_digest)
        self.register_load_state_dict_pre_hook(_accept_without_extra_state)  # type: ignore[no-untyped-call]

    __prepare_scriptable__ = refuse_torchscript

    def _mask_description(self) -> str:
        kind = self.mask_type
        name = kind if isinstance(kind, str) else getattr(kind, "__name__", type(kind).__name__)
        out_channels, in_channels, height, width = self.weight.shape
        return (
            f"mask_type={name!r}, color_groups={self.color_groups}, "
            f"group_layout={self.group_layout!r}, a {height}x{width} kernel of "
            f"{in_channels} -> {out_channels} channels"
        )

    def get_extra_state(self) -> dict[str, str]:
        """What the mask is, saved in the ``state_dict`` beside the weights.

        Weights trained under one mask give other outputs under another, so loading them
        into a layer with another mask (type A into B, another ``color_groups`` or
        ``group_layout``) is refused. A ``state_dict`` without it (a plain
        ``nn.Conv2d``'s, or one from maskedconv 0.1) loads as before: to load weights
        into another mask on purpose, drop the ``_extra_state`` entries first. Into a
        plain ``nn.Conv2d``, load with ``strict=False``.
        """
        return {"mask": self._mask_description(), "mask_sha256": self._mask_digest}

    def set_extra_state(self, state: Any) -> None:
        """Check a saved mask description against this layer's mask."""
        if not isinstance(state, dict) or "mask_sha256" not in state:
            raise ValueError(
                f"the state_dict's extra state for a MaskedConv2d must be the dict that "
                f"get_extra_state() gives, but got {state!r}"
            )
        if state["mask_sha256"] != self._mask_digest:
            raise ValueError(
                f"these weights were saved from a MaskedConv2d with {state.get('mask')}, but "
                f"this layer has {self._mask_description()}: the masks differ, so the same "
                f"weights would give other outputs; build the model as it was saved"
            )

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> MaskedConv2d:
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        source = getattr(self, "_mask_source", None)  # absent while nn.Conv2d.__init__ runs
        if source is not None:
            self.mask = source.to(device=self.weight.device, dtype=self.weight.dtype)
        anchors = getattr(self, "_anchor_source", None)
        if anchors is not None:
            self.anchor_mask = anchors.to(device=self.weight.device, dtype=self.weight.dtype)
        return self

    def check_mask_unchanged(self) -> None:
        """Raise ``ValueError`` if ``.mask`` was edited in place since the layer was built.

        The layer plans which kernel rows and columns to convolve (and its steps which taps
        to gather) from the mask it was built with, so an in-place edit would take effect
        for some taps and not others. Build a new layer with the mask you want instead.
        """
        mask = self.mask
        if torch.compiler.is_compiling() or self._mask_seen == (id(mask), mask._version):
            return
        # A new tensor (moved, copied) or a new version of it: compare its values once.
        if _mask_bits(mask) == self._mask_bits:
            self._mask_seen = (id(mask), mask._version)
            return
        raise ValueError(
            "the mask of this MaskedConv2d was edited in place; its fast paths were planned "
            "from the mask it was built with, so the edit would take effect for some taps "
            "and not others: build a new MaskedConv2d with mask_type=<a function returning "
            "the mask you want> (see maskedconv.MaskFunction)"
        )

    def reset_parameters(self) -> None:
        """Re-initialise as ``nn.Conv2d`` does, then zero the masked weights again."""
        super().reset_parameters()
        mask = getattr(self, "mask", None)  # absent while nn.Conv2d.__init__ runs
        if mask is not None:
            with torch.no_grad():
                self.weight.mul_(mask)

    def forward(self, input: Tensor) -> Tensor:
        """Apply the masked convolution.

        Args:
            input: ``(B, in_channels, H, W)``.

        Returns:
            ``(B, out_channels, H, W)``.
        """
        self.check_mask_unchanged()
        if input.dim() != 4 or input.shape[1] != self.in_channels:
            raise ValueError(
                f"input must have shape (B, {self.in_channels}, H, W) (in_channels="
                f"{self.in_channels}), but got {tuple(input.shape)}"
            )
        dilation = cast("tuple[int, int]", self.dilation)
        if self.anchor_mask is not None:
            return self._board(input, dilation)
        if not self._plans[DEFAULT_FORMULATION]:  # the mask keeps nothing: the output is the bias
            padding = cast("tuple[int, int]", self.padding)  # always explicit, set in __init__
            return masked_conv2d(
                input, self.weight, self.mask, self.bias, padding, dilation, self.groups
            )
        args = ConvArgs(input, self.weight, self.mask, self.bias, dilation, self.groups)
        return run_formulation(choose_formulation(self._plans, self._mask_id, args), *args)

    def _board(self, input: Tensor, dilation: tuple[int, int]) -> Tensor:
        # The gated taps read the anchors only (r + c even, in image coordinates): around
        # a non-anchor they are its anchor neighbours, around an anchor non-anchors, zeroed.
        # The other taps (the centre's earlier groups; a group checkerboard's earlier
        # groups everywhere) read the input as it is.
        assert self.anchor_mask is not None
        height, width = input.shape[-2:]
        rows = torch.arange(height, device=input.device).view(-1, 1)
        cols = torch.arange(width, device=input.device).view(1, -1)
        anchors = is_anchor(rows, cols).to(input.dtype)
        padding = cast("tuple[int, int]", self.padding)
        gated = self.anchor_mask
        out = masked_conv2d(
            input * anchors, self.weight, gated, self.bias, padding, dilation, self.groups
        )
        if not self._rest_centre_only:
            rest = self.mask - gated
            return out + masked_conv2d(
                input, self.weight, rest, None, padding, dilation, self.groups
            )
        if self._centre_kept:  # the centre alone, as a 1x1 conv
            i, j = (k // 2 for k in self.weight.shape[-2:])
            centre = (self.weight * self.mask)[:, :, i : i + 1, j : j + 1]
            out = out + F.conv2d(input, centre, None, 1, 0, 1, self.groups)
        return out

    def extra_repr(self) -> str:
        kind = (
            self.mask_type
            if isinstance(self.mask_type, str)
            else getattr(self.mask_type, "__name__", type(self.mask_type).__name__)
        )
        base = super().extra_repr()  # type: ignore[no-untyped-call]
        return (
            f"{base}, mask_type={kind}, color_groups={self.color_groups}, "
            f"group_layout={self.group_layout}"
        )
