"""Small random models and their inputs, shared by the tests."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from maskedconv import PixelCNN, sample


def brute_groups(channels: int, sizes: list[int]) -> list[int]:
    """Group of each channel, blocked: the sizes' pattern with every entry repeated
    (written from the definition, not from maskedconv)."""
    scale = channels // sum(sizes)
    return [g for g, size in enumerate(sizes) for _ in range(size * scale)]


def perturb_(module: nn.Module, scale: float) -> nn.Module:
    """Add N(0, scale^2) noise to every parameter, in place (from the global RNG): no
    weight keeps its tidy initial value, and zero-initialised conditioning matters."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module


def random_inputs(
    model: Any, height: int, width: int, cond_size: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """Two seeded images for ``model``, with the labels and map it was built to take."""
    gen = torch.Generator().manual_seed(1)
    shape = (2, model.in_channels, height, width)
    inputs = {"x": torch.randint(0, model.levels, shape, generator=gen)}
    if model.num_classes:
        inputs["labels"] = torch.tensor([0, 1])
    if model.cond_channels:
        size = cond_size or (height, width)
        inputs["cond"] = torch.randn(2, model.cond_channels, *size, generator=gen)
    return inputs


def build(cfg: dict, dtype: torch.dtype = torch.float32, perturb: bool = False) -> PixelCNN:
    """A seeded PixelCNN from a hypothesis-drawn config (6 hidden channels per image channel).

    ``perturb`` adds noise to every parameter, biases and norms included, so that no
    weight keeps its tidy initial value.
    """
    torch.manual_seed(0)
    c = cfg["in_channels"]
    model = PixelCNN(
        c,
        cfg["levels"],
        hidden_channels=6 * c,
        num_layers=cfg["num_layers"],
        kernel_size=cfg["kernel_size"],
        color_groups=c if cfg["grouped"] else 1,
        group_layout=cfg["group_layout"],
        block=cfg["block"],
    )
    if perturb:
        perturb_(model, 0.3)
    return model.to(dtype)


def cached_and_naive(
    model: Any,
    shape: tuple[int, ...],
    complete: bool,
    gen: torch.Generator,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Draws of both sampling paths with the same seed: whole images of ``shape``, or, with
    ``complete``, completions of random images with about 40% of the sub-pixels known
    (drawn from ``gen``). Returns both and the keyword arguments they were given."""
    if complete:
        kwargs["x"] = torch.randint(0, model.levels, shape, generator=gen)
        kwargs["known"] = torch.rand(shape, generator=gen) < 0.4
    else:
        kwargs["shape"] = shape
    fast = sample(model, generator=torch.Generator().manual_seed(3), method="cached", **kwargs)
    slow = sample(model, generator=torch.Generator().manual_seed(3), method="naive", **kwargs)
    return fast, slow, kwargs


def decode_like_a_decoder(
    model: Any, x: torch.Tensor, tol: float, schedule: Any = "auto", **kwargs: Any
) -> int:
    """Walk ``x`` step by step as an entropy decoder would: every group's parameters must
    equal the full forward's at the step's positions while the later groups hold garbage.
    Returns the number of steps."""
    from maskedconv import IncrementalEvaluator

    batch, c, height, width = x.shape
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        full = model(x, **kwargs)
        ev = IncrementalEvaluator(model, batch, (height, width), schedule=schedule, **kwargs)
        while not ev.done:
            rows, cols = ev.rows, ev.cols
            values = torch.randint(0, model.levels, (batch, c, len(rows)), generator=gen)
            for chans in ev.groups:
                params = ev.params(values)  # (B, C, K, n) or (B, P, n)
                ref = full[..., rows, cols]
                if model.color_groups > 1:  # the categorical head: by channel
                    params, ref = params[:, chans], ref[:, chans]
                torch.testing.assert_close(params, ref, rtol=0, atol=tol)
                values[:, chans] = x[:, chans][..., rows, cols]
            ev.advance(values)
        return len(ev.schedule)
