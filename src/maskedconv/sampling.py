"""Autoregressive sampling in raster order.

The sampler works with any model that follows this protocol:

* ``model(x)`` takes ``(B, C, H, W)`` int64 images with values in ``[0, K)`` and
  returns ``(B, C, K, H, W)`` logits, where the logits of sub-pixel (c, i, j)
  depend only on pixels before (i, j) and on earlier colour groups at (i, j);
* optional attributes: ``color_groups`` (G, default 1) and ``group_layout``
  (default ``"blocked"``) say which channels are drawn together; ``causal_rows =
  True`` says that output rows ``<= r`` depend only on input rows ``<= r`` (true for
  any stack of masked convolutions), so the sampler may feed only the rows it needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._cached import CachedPixelCNN, NoCachedPathError
from .masks import group_slices

__all__ = ["sample"]

_METHODS = ("auto", "cached", "naive")


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def _check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float > 0, but got {type(temperature).__name__}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite float > 0, but got {temperature}")
    return float(temperature)


def _start_images(
    shape: Sequence[int] | None, x: Tensor | None, known: Tensor | None, device: torch.device
) -> tuple[Tensor, Tensor]:
    if x is None and known is None:
        if shape is None:
            raise ValueError("give either shape=(B, C, H, W) or a partial image x= with known=")
        dims = tuple(shape)
        if len(dims) != 4 or any(
            not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in dims
        ):
            raise ValueError(f"shape must be 4 positive ints (B, C, H, W), but got {shape}")
        return (
            torch.zeros(dims, dtype=torch.long, device=device),
            torch.zeros(dims, dtype=torch.bool, device=device),
        )
    if x is None or known is None:
        raise ValueError(
            "x and known go together: x holds the known sub-pixels and known (bool, same "
            f"shape) marks them, but got x={'None' if x is None else 'a tensor'} and "
            f"known={'None' if known is None else 'a tensor'}"
        )
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"x must be an integer image tensor, but got dtype {x.dtype}")
    if known.dtype != torch.bool:
        raise TypeError(f"known must be a bool tensor, but got dtype {known.dtype}")
    if x.dim() != 4 or known.shape != x.shape:
        raise ValueError(
            f"x must be (B, C, H, W) and known must have its shape, but got x {tuple(x.shape)} "
            f"and known {tuple(known.shape)}"
        )
    if shape is not None and tuple(shape) != tuple(x.shape):
        raise ValueError(f"shape {tuple(shape)} does not match x's shape {tuple(x.shape)}")
    known = known.to(device)
    # Unknown entries start at 0; by causality their value never reaches a logit
    # before they are drawn.
    images = torch.where(known, x.to(device=device, dtype=torch.long), 0)
    return images, known


@torch.no_grad()
def sample(
    model: nn.Module,
    shape: Sequence[int] | None = None,
    *,
    x: Tensor | None = None,
    known: Tensor | None = None,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    color_groups: int | None = None,
    group_layout: str | None = None,
    method: str = "auto",
) -> Tensor:
    """Draw integer images from an autoregressive model, one sub-pixel group at a time.

    Pixels are visited in raster order and, within a pixel, colour groups in order;
    each step computes the logits of the group's channels and draws them from
    ``softmax(logits / temperature)``.

    Two ways to compute the logits give the same samples for the same generator seed:

    * ``"naive"``: run the whole model at each step (van den Oord et al., 2016). Exact
      for any model that follows the protocol in this module's docstring.
    * ``"cached"``: for a :class:`~maskedconv.PixelCNN` built from the library's blocks,
      compute every layer at the current pixel only, from cached activations
      (Ramachandran et al., 2017): about one forward pass per colour group in all,
      instead of H*W*G. The caches hold about ``kh // 2 + 1`` rows of each kxk conv's
      input.

    ``"auto"`` (the default) takes ``"cached"`` where the model has it, else ``"naive"``.

    Args:
        model: the model; see the protocol above.
        shape: ``(B, C, H, W)`` of the images to draw; omit when ``x`` is given.
        x: ``(B, C, H, W)`` integer image to complete; its entries where ``known`` is
            True come back unchanged and condition the rest.
        known: ``(B, C, H, W)`` bool tensor marking the given sub-pixels of ``x``.
        generator: the source of randomness, on the model's device; the global RNG is
            never touched (without one, a fresh generator is seeded from the OS).
        temperature: > 0; divides the logits. Below 1 sharpens towards the mode.
        color_groups: G; defaults to ``model.color_groups``, else 1.
        group_layout: defaults to ``model.group_layout``, else ``"blocked"``.
        method: ``"auto"``, ``"cached"`` or ``"naive"``.

    Returns:
        ``(B, C, H, W)`` int64 images on the model's device.

    Raises:
        ValueError: for a bad shape, temperature, ``x``/``known`` pair, a known value
            outside ``[0, K)``, a generator on another device, an unknown ``method``, or
            ``method="cached"`` for a model without a cached path.
        TypeError: for a non-integer ``x``, a non-bool ``known`` or a non-numeric temperature.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> images = sample(model, (16, 1, 28, 28), generator=g)
    """
    temperature = _check_temperature(temperature)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, but got {method!r}")
    device = _model_device(model)
    if generator is None:
        generator = torch.Generator(device=device)
        generator.seed()
    elif generator.device.type != device.type:
        raise ValueError(
            f"generator must be on the model's device {device}, but got a generator on "
            f"{generator.device}"
        )
    images, known = _start_images(shape, x, known, device)
    batch, channels, height, width = images.shape
    groups = color_groups if color_groups is not None else getattr(model, "color_groups", 1)
    layout = group_layout if group_layout is not None else getattr(model, "group_layout", "blocked")
    members = group_slices(channels, groups, layout)  # slices: cheaper to index than lists
    completing = bool(known.any())
    crop = bool(getattr(model, "causal_rows", False))

    levels = getattr(model, "levels", None)
    if isinstance(levels, int):
        _check_known_values(images, known, levels)
    checked_known = isinstance(levels, int)

    cached = None
    if method != "naive":
        try:
            cached = CachedPixelCNN(model, batch, width)
        except NoCachedPathError as reason:
            if method == "cached":
                raise ValueError(
                    f"method='cached' needs a PixelCNN built from the library's blocks, "
                    f"but {reason}; use method='naive'"
                ) from None

    was_training = model.training
    model.eval()
    try:
        for row in range(height):
            if cached is not None:
                cached.start_row(row)
            visible = images[:, :, : row + 1] if crop else images
            for col in range(width):
                last_step = -1  # the last group whose logits were computed at this pixel
                for group, chans in enumerate(members):
                    if completing:
                        wanted = ~known[:, chans, row, col]  # (B, n)
                        if not bool(wanted.any()):
                            continue
                    if cached is not None:
                        logits = cached.step(images[:, :, row, col], col)[:, chans]  # (B, n, K)
                    else:
                        logits = model(visible)[:, chans, :, row, col]  # (B, n, K)
                    if not checked_known:
                        _check_known_values(images, known, logits.shape[-1])
                        checked_known = True
                    draw = _draw(logits, temperature, generator)
                    if completing:
                        draw = torch.where(wanted, draw, images[:, chans, row, col])
                    images[:, chans, row, col] = draw
                    last_step = group
                if cached is not None:
                    # After the last group's step every cached activation at this pixel
                    # is final (none sees the last group's own input); otherwise
                    # recompute the pixel from its final values.
                    if last_step == groups - 1:
                        cached.write_pixel(images[:, :, row, col], col)
                    else:
                        cached.step(images[:, :, row, col], col)
    finally:
        model.train(was_training)
    return images


def _draw(logits: Tensor, temperature: float, generator: torch.Generator) -> Tensor:
    """One draw per row of ``(B, n, K)`` logits from ``softmax(logits / temperature)``.

    Inverse-CDF sampling: one uniform per draw, the index of the first cumulative
    probability above it. Same distribution as ``torch.multinomial``, at a fraction
    of its per-call cost for small batches.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(dtype)
    if temperature != 1.0:
        logits = logits / temperature
    cdf = torch.softmax(logits, dim=-1).cumsum_(-1)  # (B, n, K)
    u = torch.rand((*cdf.shape[:-1], 1), generator=generator, device=cdf.device, dtype=dtype)
    # Rounding can leave the last cumulative value just below u: clamp to K - 1.
    return (cdf <= u).sum(-1).clamp_(max=logits.shape[-1] - 1)


def _check_known_values(images: Tensor, known: Tensor, levels: int) -> None:
    given = images[known]
    if given.numel() and (int(given.min()) < 0 or int(given.max()) >= levels):
        raise ValueError(
            f"x must have values in [0, {levels}) where known is True (the model has "
            f"{levels} levels), but got values in [{int(given.min())}, {int(given.max())}]"
        )
