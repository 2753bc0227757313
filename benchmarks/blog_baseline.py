"""A faithful re-implementation of the design blog's PixelCNN, as the baseline.

Everything the blog does that costs time is kept: the mask is multiplied into
``weight.data`` at every forward (in place, outside autograd), the full kxk kernel is
convolved, inputs are floats, and sampling runs one full forward of the whole image
per sub-pixel. Written for this project from the blog's description; used only by the
benchmarks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def blog_mask(kind: str, out_c: int, in_c: int, k: int, groups: int) -> Tensor:
    """The blog's single-channel mask, plus its RGB thirds rule when ``groups == 3``."""
    mask = torch.zeros(out_c, in_c, k, k)
    c = k // 2
    mask[:, :, :c, :] = 1
    mask[:, :, c, : c + (kind == "B")] = 1
    if groups == 3:
        i3, o3 = in_c // 3, out_c // 3
        mask[:, :, c, c] = 0
        for g in range(3):
            seen = g + 1 if kind == "B" else g
            mask[g * o3 : (g + 1) * o3 if g < 2 else out_c, : seen * i3, c, c] = 1
    return mask


class BlogMaskedConv2d(nn.Conv2d):
    def __init__(self, kind: str, in_c: int, out_c: int, k: int, groups: int = 1) -> None:
        super().__init__(in_c, out_c, k, padding=k // 2)
        self.register_buffer("mask", blog_mask(kind, out_c, in_c, k, groups))

    def forward(self, x: Tensor) -> Tensor:
        self.weight.data *= self.mask
        return super().forward(x)


class BlogResBlock(nn.Module):
    def __init__(self, channels: int, k: int, groups: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            BlogMaskedConv2d("B", channels, channels, 1, groups),
            nn.ReLU(),
            BlogMaskedConv2d("B", channels, channels, k, groups),
            nn.ReLU(),
            BlogMaskedConv2d("B", channels, channels, 1, groups),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class BlogPixelCNN(nn.Module):
    """The blog's model: float input ``(B, C, H, W)``, log-probs ``(B, C, K, H, W)``."""

    def __init__(self, channels: int, levels: int, filters: int, layers: int, k: int = 7) -> None:
        super().__init__()
        self.channels, self.levels = channels, levels
        groups = 3 if channels == 3 else 1
        self.net = nn.Sequential(
            BlogMaskedConv2d("A", channels, filters, k, groups),
            nn.ReLU(),
            *(BlogResBlock(filters, k, groups) for _ in range(layers - 1)),
            BlogMaskedConv2d("B", filters, filters, 1, groups),
            nn.ReLU(),
            BlogMaskedConv2d("B", filters, levels * channels, 1, groups),
        )

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        out = self.net(x).view(b, self.channels, self.levels, h, w)
        return torch.log_softmax(out, dim=2)

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.nll_loss(self(x).transpose(1, 2), y, reduction="sum")

    @torch.no_grad()
    def sample(self, n: int, size: int, rows: int | None = None) -> Tensor:
        """The blog's loop: one full forward per sub-pixel. ``rows`` stops early."""
        images = torch.zeros(n, self.channels, size, size, device=self.net[0].weight.device)
        for row in range(size if rows is None else rows):
            for col in range(size):
                for ch in range(self.channels):
                    probs = self(images)[:, ch, :, row, col].exp()
                    images[:, ch, row, col] = torch.multinomial(probs, 1)[:, 0].float()
        return images
