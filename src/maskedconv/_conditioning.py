"""Conditioning: class labels and spatial maps, added as a bias before a nonlinearity.

A model built with ``num_classes=N`` takes ``labels`` (int64, ``(B,)``), and each of its
conditioned layers learns one bias vector per class; with ``cond_channels=M`` it takes
``cond`` (float, ``(B, M, h, w)``), resized to the image's ``H x W``, and each layer
learns a 1x1 projection of it (van den Oord et al., "Conditional Image Generation with
PixelCNN Decoders", 2016). Conditioning may reach every output; it never carries an
image pixel, so causality is untouched.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__: list[str] = []  # nothing public: see maskedconv/__init__.py


class Conditioning(NamedTuple):
    """What a conditioned layer reads: labels ``(B,)`` and maps ``(B, M, H, W)``."""

    labels: Tensor | None
    maps: Tensor | None


def prepare_conditioning(
    labels: Tensor | None,
    cond: Tensor | None,
    *,
    num_classes: int | None,
    cond_channels: int | None,
    batch: int,
    size: tuple[int, int],
    dtype: torch.dtype,
) -> Conditioning | None:
    """Check ``labels`` and ``cond`` against the model and resize ``cond`` to ``size``.

    A map smaller or larger than the image is resized with nearest-neighbour
    interpolation: with an integer factor each cell covers a block of pixels (VQ-VAE-2's
    top map at half the size of the bottom one covers 2x2 blocks).

    Raises:
        ValueError: for conditioning the model was not built for, missing conditioning
            it needs, wrong shapes, labels outside ``[0, num_classes)``, or a map
            holding inf or NaN.
        TypeError: for float labels or integer maps.
    """
    if num_classes is None and labels is not None:
        raise ValueError(
            "labels must be None: this model was built without num_classes (pass "
            "num_classes=N when building it to condition on class labels)"
        )
    if cond_channels is None and cond is not None:
        raise ValueError(
            "cond must be None: this model was built without cond_channels (pass "
            "cond_channels=M when building it to condition on a map)"
        )
    if num_classes is not None:
        if labels is None:
            raise ValueError(
                f"labels are required: this model was built with num_classes={num_classes}; "
                f"pass labels=, an int64 tensor of shape ({batch},)"
            )
        if (
            not isinstance(labels, Tensor)
            or labels.is_floating_point()
            or labels.dtype == torch.bool
        ):
            raise TypeError(
                f"labels must be an integer tensor of shape ({batch},), but got "
                f"{type(labels).__name__} {getattr(labels, 'dtype', '')}"
            )
        if tuple(labels.shape) != (batch,):
            raise ValueError(f"labels must have shape ({batch},), but got {tuple(labels.shape)}")
        if labels.numel() and not torch.compiler.is_compiling():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= num_classes:
                raise ValueError(
                    f"labels must be in [0, {num_classes}) (num_classes={num_classes}), but got "
                    f"values in [{lo}, {hi}]"
                )
        labels = labels.long()
    if cond_channels is not None:
        if cond is None:
            raise ValueError(
                f"cond is required: this model was built with cond_channels={cond_channels}; "
                f"pass cond=, a float tensor of shape ({batch}, {cond_channels}, h, w)"
            )
        if not isinstance(cond, Tensor) or not cond.is_floating_point():
            raise TypeError(
                f"cond must be a float tensor ({batch}, {cond_channels}, h, w), but got "
                f"{type(cond).__name__} {getattr(cond, 'dtype', '')}"
            )
        if cond.dim() != 4 or cond.shape[:2] != (batch, cond_channels):
            raise ValueError(
                f"cond must have shape ({batch}, {cond_channels}, h, w), but got "
                f"{tuple(cond.shape)}"
            )
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(cond).all()):
            raise ValueError("cond must be finite, but it holds inf or NaN")
        cond = cond.to(dtype)
        if tuple(cond.shape[-2:]) != tuple(size):
            cond = F.interpolate(cond, size=size, mode="nearest")
    if labels is None and cond is None:
        return None
    return Conditioning(labels, cond)


class ConditionBias(nn.Module):
    """A layer's conditioning bias: a learned vector per class plus a 1x1 projection of the map.

    Returns ``(B, C, 1, 1)`` (labels only) or ``(B, C, H, W)``; added to the layer's
    pre-activation. Both start at zero, drawing nothing from the random number
    generator: a conditioned model starts as its unconditioned twin (the same seed gives
    the same other weights) and learns what the conditioning adds.
    """

    def __init__(self, channels: int, num_classes: int | None, cond_channels: int | None) -> None:
        super().__init__()
        self.embed = (
            nn.Parameter(torch.zeros(num_classes, channels)) if num_classes else None
        )  # (N, C)
        self.project = (
            nn.Parameter(torch.zeros(channels, cond_channels)) if cond_channels else None
        )  # (C, M)

    def forward(self, conditioning: Conditioning) -> Tensor:
        out: Tensor | None = None
        if self.embed is not None and conditioning.labels is not None:
            out = self.embed[conditioning.labels][:, :, None, None]
        if self.project is not None and conditioning.maps is not None:
            projected = torch.einsum("cm,bmhw->bchw", self.project, conditioning.maps)
            out = projected if out is None else out + projected
        if out is None:
            raise ValueError("a conditioned layer was called without conditioning")
        return out


def make_condition_bias(
    channels: int, num_classes: int | None, cond_channels: int | None
) -> ConditionBias | None:
    """A ``ConditionBias``, or ``None`` for an unconditioned model."""
    if num_classes is None and cond_channels is None:
        return None
    return ConditionBias(channels, num_classes, cond_channels)
