"""The PixelCNN builder: config -> network -> per-sub-pixel logits."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import BottleneckBlock, ResidualBlock
from .conv import MaskedConv2d
from .masks import check_group_layout, group_split_error

__all__ = ["PixelCNN", "PixelCNNConfig", "nll_per_dim"]

_BLOCKS = {"residual": ResidualBlock, "bottleneck": BottleneckBlock}


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, but got {value!r}")
    return value


@dataclass(frozen=True)
class PixelCNNConfig:
    """Everything needed to rebuild a :class:`PixelCNN`; plain values, safe to save.

    Defaults are the design blog's binary-MNIST model.
    """

    in_channels: int  # image channels C: 1 for MNIST, 3 for RGB
    levels: int  # values a sub-pixel takes, K: 2 for binarized, 4 for 2-bit colour
    hidden_channels: int = 64  # width of every hidden layer; divisible by color_groups
    num_layers: int = 5  # the 7x7 type-A conv plus (num_layers - 1) residual blocks
    kernel_size: int = 7  # size of the type-A conv and of each block's middle conv
    color_groups: int | None = None  # None: one group per channel, R -> G -> B
    group_layout: str = "blocked"  # how channels map to groups; see DESIGN.md
    block: str = "residual"  # "residual" (design blog) or "bottleneck" (course solution)

    def __post_init__(self) -> None:
        _positive_int("in_channels", self.in_channels)
        _positive_int("levels", self.levels, 2)
        _positive_int("hidden_channels", self.hidden_channels)
        _positive_int("num_layers", self.num_layers)
        _positive_int("kernel_size", self.kernel_size)
        if self.kernel_size % 2 == 0:
            raise ValueError(
                "kernel_size must be odd so that the kernel has a centre tap, "
                f"but got {self.kernel_size}"
            )
        groups = self.groups
        _positive_int("color_groups", groups)
        if self.in_channels % groups:
            raise ValueError(
                f"color_groups must divide in_channels={self.in_channels}, but got {groups}; "
                f"use 1 (channels independent given the past) or {self.in_channels} (one group "
                f"per channel)"
            )
        check_group_layout(self.group_layout)
        if self.block not in _BLOCKS:
            raise ValueError(f"block must be one of {tuple(_BLOCKS)}, but got {self.block!r}")
        divisor = 2 * groups if self.block == "bottleneck" and self.num_layers > 1 else groups
        if self.hidden_channels % divisor:
            text = (
                f"2 * color_groups = {divisor} (the bottleneck block halves it)"
                if divisor != groups
                else None
            )
            raise group_split_error("hidden_channels", self.hidden_channels, divisor, text)

    @property
    def groups(self) -> int:
        """The resolved number of colour groups G."""
        return self.in_channels if self.color_groups is None else self.color_groups

    def to_dict(self) -> dict[str, Any]:
        """The config as a dict of plain values (for checkpoints)."""
        return asdict(self)


class PixelCNN(nn.Module):
    """A PixelCNN over integer images with ``levels`` values per sub-pixel.

    Architecture (van den Oord et al., "Pixel Recurrent Neural Networks", 2016, as in
    the design blog)::

        kxk conv, type A, C -> h         ReLU
        (num_layers - 1) x block         [1x1 B -> ReLU -> kxk B -> ReLU -> 1x1 B -> ReLU] + skip
        1x1 conv, type B, h -> h         ReLU
        1x1 conv, type B, h -> K*C       logits

    ``block="bottleneck"`` swaps in the Berkeley course solution's block
    (:class:`~maskedconv.BottleneckBlock`). With ``color_groups = C`` (the default)
    channels are generated in order R -> G -> B within each pixel; with
    ``color_groups = 1`` they are independent given the previous pixels.

    Args:
        in_channels: image channels C.
        levels: values a sub-pixel takes, K >= 2.
        hidden_channels: width h of the hidden layers; divisible by ``color_groups``.
        num_layers: the first conv plus ``num_layers - 1`` blocks.
        kernel_size: odd size of the type-A conv and the blocks' middle convs.
        color_groups: ordered channel groups G; ``None`` means ``in_channels``.
        group_layout: ``"blocked"`` or ``"interleaved"``.
        block: ``"residual"`` or ``"bottleneck"``.

    Example:
        >>> model = PixelCNN(1, 2, hidden_channels=16, num_layers=2)
        >>> x = torch.randint(0, 2, (4, 1, 8, 8))
        >>> model(x).shape  # (B, C, K, H, W)
        torch.Size([4, 1, 2, 8, 8])
        >>> model.log_prob(x).shape
        torch.Size([4])
    """

    causal_rows = True
    """Output rows <= r depend only on input rows <= r, so a sampler may crop below r."""

    def __init__(
        self,
        in_channels: int,
        levels: int,
        *,
        hidden_channels: int = 64,
        num_layers: int = 5,
        kernel_size: int = 7,
        color_groups: int | None = None,
        group_layout: str = "blocked",
        block: Literal["residual", "bottleneck"] | str = "residual",
    ) -> None:
        super().__init__()
        config = PixelCNNConfig(
            in_channels=in_channels,
            levels=levels,
            hidden_channels=hidden_channels,
            num_layers=num_layers,
            kernel_size=kernel_size,
            color_groups=color_groups,
            group_layout=group_layout,
            block=block,
        )
        self.config = config
        self.in_channels = in_channels
        self.levels = levels
        self.color_groups = config.groups
        self.group_layout = group_layout
        opts: dict[str, Any] = dict(color_groups=self.color_groups, group_layout=group_layout)
        block_cls = _BLOCKS[block]
        h = hidden_channels
        self.net = nn.Sequential(
            MaskedConv2d(in_channels, h, kernel_size, mask_type="A", **opts),
            nn.ReLU(),
            *(block_cls(h, kernel_size, **opts) for _ in range(num_layers - 1)),
            MaskedConv2d(h, h, 1, mask_type="B", **opts),
            nn.ReLU(),
            MaskedConv2d(h, levels * in_channels, 1, mask_type="B", **opts),
        )

    @classmethod
    def from_config(cls, config: PixelCNNConfig | dict[str, Any]) -> PixelCNN:
        """Build a model from a :class:`PixelCNNConfig` or its ``to_dict()``."""
        if isinstance(config, dict):
            config = PixelCNNConfig(**config)
        return cls(
            config.in_channels,
            config.levels,
            hidden_channels=config.hidden_channels,
            num_layers=config.num_layers,
            kernel_size=config.kernel_size,
            color_groups=config.color_groups,
            group_layout=config.group_layout,
            block=config.block,
        )

    def _check_images(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, but got {type(x).__name__}")
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(
                f"x must be an integer image tensor with values in [0, {self.levels}), but got "
                f"dtype {x.dtype}; quantize first (e.g. x.round().long()), or call "
                f"forward_scaled() with an already-scaled float input"
            )
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape (B, {self.in_channels}, H, W), but got {tuple(x.shape)}"
            )
        if torch.compiler.is_compiling() or x.numel() == 0:
            return  # a data-dependent check would break the graph
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= self.levels:
            raise ValueError(
                f"x must have values in [0, {self.levels}) (levels={self.levels}), but got "
                f"values in [{lo}, {hi}]"
            )

    def scale(self, x: Tensor) -> Tensor:
        """Map integer levels ``[0, K)`` to floats in ``[-1, 1]``, in the model's dtype."""
        dtype = next(self.parameters()).dtype
        return x.to(dtype) * (2.0 / (self.levels - 1)) - 1.0

    def forward_scaled(self, h: Tensor) -> Tensor:
        """Logits from an already-scaled float input.

        The causality checker and samplers that need a differentiable input use this.

        Args:
            h: ``(B, C, H, W)`` float, as :meth:`scale` makes it.

        Returns:
            ``(B, C, K, H, W)`` logits.
        """
        b, c, height, width = h.shape
        out: Tensor = self.net(h)  # (B, K*C, H, W)
        if self.group_layout == "blocked":
            return out.view(b, c, self.levels, height, width)
        # interleaved: out channel k*C + c belongs to channel c's group (c mod G)
        return out.view(b, self.levels, c, height, width).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        """Per-sub-pixel logits.

        Args:
            x: ``(B, C, H, W)`` integer image with values in ``[0, K)``.

        Returns:
            ``(B, C, K, H, W)`` logits; the logits of sub-pixel (c, i, j) depend only on
            pixels before (i, j) and on earlier colour groups at (i, j).

        Raises:
            TypeError: for a float, bool or complex ``x``.
            ValueError: for a wrong shape or values outside ``[0, K)``.
        """
        self._check_images(x)
        return self.forward_scaled(self.scale(x))

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)`` in nats, one value per image.

        The log-softmax is taken in at least float32, also under autocast.

        Args:
            x: ``(B, C, H, W)`` integer image with values in ``[0, K)``.

        Returns:
            ``(B,)`` log-likelihoods in nats. :func:`nll_per_dim` turns them into
            nats/dim or bits/dim.
        """
        return self.log_prob_from_logits(self(x), x)

    @staticmethod
    def log_prob_from_logits(logits: Tensor, x: Tensor) -> Tensor:
        """``log p(x)`` in nats from logits already computed, e.g. by a DDP wrapper's forward.

        Args:
            logits: ``(B, C, K, H, W)``, as ``model(x)`` returns them.
            x: ``(B, C, H, W)`` integer image with values in ``[0, K)``.

        Returns:
            ``(B,)`` log-likelihoods in nats, computed in at least float32.
        """
        dtype = torch.promote_types(logits.dtype, torch.float32)
        with torch.autocast(logits.device.type, enabled=False):
            nll = F.cross_entropy(logits.to(dtype).transpose(1, 2), x.long(), reduction="none")
        return -nll.sum(dim=(1, 2, 3))

    def sample(
        self,
        num_samples: int | None = None,
        image_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Draw images; see :func:`maskedconv.sample` for the keyword arguments.

        Args:
            num_samples: B; omit when completing an image given as ``x=``.
            image_size: ``(H, W)``; omit when completing an image given as ``x=``.
            **kwargs: ``generator``, ``temperature``, ``x``, ``known``, ``method``.

        Returns:
            ``(B, C, H, W)`` int64 images on the model's device.
        """
        from .sampling import sample

        shape = None
        if num_samples is not None or image_size is not None:
            if num_samples is None or image_size is None:
                raise ValueError(
                    f"num_samples and image_size go together, but got num_samples={num_samples} "
                    f"and image_size={image_size}"
                )
            height, width = image_size
            shape = (num_samples, self.in_channels, height, width)
        return sample(self, shape, **kwargs)


def nll_per_dim(
    log_prob: Tensor, image_shape: Sequence[int], unit: Literal["nats", "bits"] = "nats"
) -> Tensor:
    """Negative log-likelihood per sub-pixel: ``-log p(x) / (C*H*W)``.

    Args:
        log_prob: log-likelihoods in nats, e.g. ``model.log_prob(x)``; any shape.
        image_shape: ``(C, H, W)`` or ``(B, C, H, W)`` of the images.
        unit: ``"nats"`` (what the Berkeley course reports) or ``"bits"``.

    Returns:
        Tensor of ``log_prob``'s shape.
    """
    if unit not in ("nats", "bits"):
        raise ValueError(f"unit must be 'nats' or 'bits', but got {unit!r}")
    dims = list(image_shape)[-3:]
    if len(dims) != 3:
        raise ValueError(
            f"image_shape must be (C, H, W) or (B, C, H, W), but got {tuple(image_shape)}"
        )
    per_dim = -log_prob / math.prod(dims)
    return per_dim / math.log(2) if unit == "bits" else per_dim
