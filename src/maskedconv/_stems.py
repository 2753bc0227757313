"""Stems: how integer images enter a model.

* ``"scaled"``: the levels of each sub-pixel are ordinal (pixel intensities) and map
  linearly onto ``[-1, 1]``; one feature per channel.
* ``"embedding"``: the levels are unordered codes (a VQ-VAE's K = 512 codebook
  indices, say); each channel has its own learned table of K vectors of size D. The
  lookup gathers rows, so memory is linear in K and no one-hot tensor is ever built.

A stem acts on each sub-pixel alone, so it is causal by construction; its features
for channel c are placed in c's colour group of the first layer's input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__: list[str] = []  # nothing public: see maskedconv/__init__.py


class ScaledInput(nn.Module):
    """Ordinal levels ``[0, K)`` to floats in ``[-1, 1]``: ``(B, C, *S) -> (B, C, *S)``."""

    anchor: Tensor

    def __init__(self, levels: int) -> None:
        super().__init__()
        self.levels = levels
        # Follows .to(): the dtype and device the features are made in.
        self.register_buffer("anchor", torch.zeros(()), persistent=False)

    def out_channels(self, channels: int) -> int:
        return channels

    def forward(self, x: Tensor) -> Tensor:
        return x.to(self.anchor.dtype) * (2.0 / (self.levels - 1)) - 1.0

    def extra_repr(self) -> str:
        return f"levels={self.levels}"


class EmbeddingInput(nn.Module):
    """A learned ``D``-vector per (channel, level): ``(B, C, *S) -> (B, C*D, *S)``.

    The features of channel c form c's colour group in the first layer's input:
    ``c*D .. c*D + D - 1`` when blocked, ``d*C + c`` when interleaved.

    Args:
        channels: image channels C.
        levels: K, the number of codes per channel.
        embedding_dim: D.
        group_layout: the trunk's channel layout.
    """

    offsets: Tensor

    def __init__(
        self,
        channels: int,
        levels: int,
        embedding_dim: int,
        group_layout: str,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.levels = levels
        self.embedding_dim = embedding_dim
        self.group_layout = group_layout
        # One table for all channels: channel c's codes are rows c*K .. c*K + K - 1.
        self.weight = nn.Parameter(
            torch.randn(channels * levels, embedding_dim, device=device, dtype=dtype)
        )
        self.register_buffer(
            "offsets", torch.arange(channels, device=device) * levels, persistent=False
        )

    def out_channels(self, channels: int) -> int:
        return channels * self.embedding_dim

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        index = x + self.offsets.view(c, *(1,) * len(spatial))
        vectors = nn.functional.embedding(index, self.weight)  # (B, C, *S, D)
        last = vectors.dim() - 1
        if self.group_layout == "blocked":
            order = (0, 1, last, *range(2, last))  # (B, C, D, *S)
        else:
            order = (0, last, *range(1, last))  # (B, D, C, *S)
        return vectors.permute(order).reshape(b, -1, *spatial)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, levels={self.levels}, "
            f"embedding_dim={self.embedding_dim}, group_layout={self.group_layout}"
        )


STEMS = ("scaled", "embedding")
