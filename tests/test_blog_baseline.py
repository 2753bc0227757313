"""The benchmarks' baseline computes what our PixelCNN computes: like is compared with like."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from blog_baseline import BlogMaskedConv2d, BlogPixelCNN

from maskedconv import MaskedConv2d, PixelCNN


@pytest.mark.parametrize(("channels", "levels", "filters"), [(1, 2, 8), (3, 4, 12)])
def test_blog_model_equals_ours_with_the_same_weights(
    channels: int, levels: int, filters: int
) -> None:
    torch.manual_seed(0)
    ours = PixelCNN(channels, levels, hidden_channels=filters, num_layers=3).double()
    blog = BlogPixelCNN(channels, levels, filters, 3).double()
    mine = [m for m in ours.modules() if isinstance(m, MaskedConv2d)]
    theirs = [m for m in blog.modules() if isinstance(m, BlogMaskedConv2d)]
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs, strict=True):
        assert torch.equal(a.mask, b.mask)  # the same masks, drawn by two hands
        b.load_state_dict(a.state_dict(), strict=False)
    x = torch.randint(0, levels, (2, channels, 6, 6))
    ref = blog(ours.stem(x))  # (B, C, K, H, W) log-probs
    torch.testing.assert_close(torch.log_softmax(ours(x), dim=2), ref, rtol=0, atol=1e-10)
