"""Autoregressive sampling in raster order, and position-by-position evaluation.

The sampler works with any model that follows this protocol:

* ``model(x)`` takes ``(B, C, H, W)`` int64 images with values in ``[0, K)`` and
  returns its output distribution's parameters with the pixels last, ``(B, ..., H,
  W)``, where those of sub-pixel (c, i, j) depend only on pixels before (i, j) and on
  earlier colour groups at (i, j);
* ``model.head``: the output distribution (``Categorical``,
  ``DiscretizedLogisticMixture``); without one, the output is
  taken as ``(B, C, K, H, W)`` logits of a categorical over K levels;
* optional: ``color_groups`` (G, default 1) and ``group_layout`` (default
  ``"blocked"``) say which channels are drawn together; ``causal_rows = True`` says
  that output rows ``<= r`` depend only on input rows ``<= r`` (true for any stack of
  masked convolutions), so the sampler may feed only the rows it needs;
* optional, for the fast exact path: ``model.incremental(batch, width)`` returns an
  ``IncrementalStep`` mapping a pixel's values ``(B, C)`` to the
  head's parameters there.

This module imports no model class: any model offering the protocol is served.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._heads import Categorical, OutputHead
from ._incremental import IncrementalStep, NoIncrementalPathError
from ._masks import group_slices

__all__ = ["IncrementalEvaluator", "sample"]

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


class _NoPathError(ValueError):
    """The model has no incremental path (a ``ValueError`` for the user)."""


class IncrementalEvaluator:
    """A model evaluated position by position in raster order, equal to its forward.

    For decoders (entropy coding with a PixelCNN context model) and custom samplers:
    at each position, ``params`` returns the head's parameters there from
    everything decoded so far, equal to what the full forward pass would give for the
    finished image (float64 to about 1e-10, float32 to about 1e-5); ``advance``
    stores the position's final values and moves on. Each position costs one pass of
    every layer at that pixel, not a forward over the whole image.

    Within a pixel, colour groups come in order: the parameters of group g's channels
    are exact once the pixel's earlier groups hold their final values (later groups
    may hold anything). ``groups`` lists each group's channels.

    Args:
        model: a model with an ``incremental(batch, width)`` method (see
            ``maskedconv._incremental``), e.g. a ``PixelCNN``.
        batch_size: B.
        image_size: ``(H, W)``.
        color_groups: G; defaults to ``model.color_groups``, else 1.
        group_layout: defaults to ``model.group_layout``, else ``"blocked"``.
        labels: ``(B,)`` class labels of a model built with ``num_classes``.
        cond: ``(B, M, h, w)`` map of a model built with ``cond_channels``.

    Raises:
        ValueError: for a bad size, or a model without an incremental path.

    Example:
        A decoder's loop (``decode`` stands for the entropy decoder)::

            ev = IncrementalEvaluator(model, 1, (H, W))
            with torch.no_grad():
                while not ev.done:
                    pixel = torch.zeros(1, C, dtype=torch.long)
                    for channels in ev.groups:
                        params = ev.params(pixel)  # (1, C, K) logits for a Categorical head
                        pixel[:, channels] = decode(params[:, channels])
                    ev.advance(pixel)
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int,
        image_size: tuple[int, int],
        *,
        color_groups: int | None = None,
        group_layout: str | None = None,
        labels: Tensor | None = None,
        cond: Tensor | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, but got {batch_size!r}")
        size = tuple(image_size) if isinstance(image_size, (tuple, list)) else ()
        if len(size) != 2 or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size
        ):
            raise ValueError(
                f"image_size must be (H, W), two positive ints, but got {image_size!r}"
            )
        make = getattr(model, "incremental", None)
        if not callable(make):
            raise _NoPathError(
                f"{type(model).__name__} has no incremental path: it has no incremental() method"
            )
        conditioning = _conditioning_kwargs(labels, cond)
        if conditioning:
            conditioning["height"] = image_size[0]
        try:
            self._stepper: IncrementalStep = make(batch_size, image_size[1], **conditioning)
        except NoIncrementalPathError as reason:
            raise _NoPathError(
                f"{type(model).__name__} has no incremental path: {reason}"
            ) from None
        self.channels = int(getattr(model, "in_channels", 0)) or None
        groups = color_groups if color_groups is not None else getattr(model, "color_groups", 1)
        layout = group_layout if group_layout is not None else getattr(model, "group_layout", None)
        # Each group's channels, once: advance() reads them at every position.
        self._groups = (
            None
            if self.channels is None
            else group_slices(self.channels, int(groups), str(layout or "blocked"))
        )
        self.batch_size = batch_size
        self.height, self.width = image_size
        self.row = self.col = 0
        self._last: Tensor | None = None  # the pixel of the last params() at this position
        self._stepper.start_row(0)

    @property
    def groups(self) -> list[slice]:
        """The channels of each colour group, in the order they are decoded."""
        if self._groups is None:
            raise ValueError("the model has no in_channels attribute: groups are unknown")
        return list(self._groups)

    @property
    def position(self) -> tuple[int, int]:
        """``(row, col)`` of the current position."""
        return self.row, self.col

    @property
    def done(self) -> bool:
        """Whether every position has been advanced past."""
        return self.row >= self.height

    def _check(self, pixel: Tensor) -> None:
        if self.done:
            raise ValueError(f"every position of the {self.height}x{self.width} image is done")
        if not isinstance(pixel, Tensor) or pixel.is_floating_point() or pixel.dtype == torch.bool:
            raise TypeError(
                f"pixel must be an integer tensor (B, C), but got {type(pixel).__name__} "
                f"{getattr(pixel, 'dtype', '')}"
            )
        expected = (self.batch_size, self.channels or pixel.shape[-1])
        if tuple(pixel.shape) != expected:
            raise ValueError(f"pixel must have shape {expected}, but got {tuple(pixel.shape)}")

    def params(self, pixel: Tensor) -> Tensor:
        """The head's parameters at the current position.

        Args:
            pixel: ``(B, C)`` integer values at the current position; the groups before
                the one being decoded must hold their final values.

        Returns:
            What ``model(x)[..., row, col]`` gives for the finished image ``x``:
            ``(B, C, K)`` logits for a categorical head, ``(B, P)`` for the mixture.
        """
        self._check(pixel)
        self._last = pixel.clone()
        return self._stepper.step(pixel, self.col)

    def advance(self, pixel: Tensor) -> None:
        """Store the final values ``(B, C)`` of the current position and move to the next."""
        self._check(pixel)
        last, self._last = self._last, None
        self._finish(pixel, last is not None and self._sees_same(last, pixel))

    def _sees_same(self, last: Tensor, pixel: Tensor) -> bool:
        # Nothing at a position sees its last group: if the last step had every other
        # group's final values, its activations there are final.
        earlier = self._groups[:-1] if self._groups is not None else []
        return all(torch.equal(last[:, chans], pixel[:, chans]) for chans in earlier)

    def _finish(self, pixel: Tensor, computed: bool) -> None:
        if computed:
            self._stepper.write(pixel, self.col)
        else:
            self._stepper.step(pixel, self.col)
        self.col += 1
        if self.col == self.width:
            self.row, self.col = self.row + 1, 0
            if self.row < self.height:
                self._stepper.start_row(self.row)


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
    labels: Tensor | None = None,
    cond: Tensor | None = None,
    progress: bool = False,
) -> Tensor:
    """Draw integer images from an autoregressive model, one sub-pixel group at a time.

    Pixels are visited in raster order and, within a pixel, colour groups in order;
    each step computes the output distribution's parameters at the pixel and draws the
    group's channels from it (``model.head.sample``), with the log-probabilities of the
    levels divided by ``temperature``.

    Two ways to compute the parameters give the same samples for the same generator
    seed:

    * ``"naive"``: run the whole model at each step (van den Oord et al., 2016). Exact
      for any model that follows the protocol in this module's docstring.
    * ``"cached"``: for a model with an ``incremental`` method (every
      ``PixelCNN``), compute every layer at the current pixel only,
      from cached activations (Ramachandran et al., 2017): about one forward pass per
      colour group in all, instead of H*W*G. The caches hold about ``kh // 2 + 1``
      rows of each kxk conv's input.

    ``"auto"`` (the default) takes ``"cached"`` where the model has it, else ``"naive"``.

    Args:
        model: the model; see the protocol above.
        shape: ``(B, C, H, W)`` of the images to draw; omit when ``x`` is given.
        x: ``(B, C, H, W)`` integer image to complete; its entries where ``known`` is
            True come back unchanged and condition the rest.
        known: ``(B, C, H, W)`` bool tensor marking the given sub-pixels of ``x``.
        generator: the source of randomness, on the model's device; the global RNG is
            never touched (without one, a fresh generator is seeded from the OS).
        temperature: > 0; divides the log-probabilities. Below 1 sharpens towards the mode.
        progress: show a progress bar, a step per row (tqdm; without tqdm installed,
            a line per row on stderr).
        color_groups: G; defaults to ``model.color_groups``, else 1.
        group_layout: defaults to ``model.group_layout``, else ``"blocked"``.
        method: ``"auto"``, ``"cached"`` or ``"naive"``.
        labels: ``(B,)`` int64 class labels, for a model built with ``num_classes``
            (with ``num_classes=10``, ``labels=torch.arange(10)`` draws one image per class).
        cond: ``(B, M, h, w)`` float map, for a model built with ``cond_channels``.

    Returns:
        ``(B, C, H, W)`` int64 images on the model's device.

    Raises:
        ValueError: for a bad shape, temperature, ``x``/``known`` pair, a known value
            outside ``[0, K)``, a generator on another device, an unknown ``method``, or
            ``method="cached"`` for a model without an incremental path.
        TypeError: for a non-integer ``x``, a non-bool ``known`` or a non-numeric temperature.

    Example:
        >>> model = PixelCNN(1, 2, hidden_channels=16, num_layers=2)
        >>> g = torch.Generator().manual_seed(0)
        >>> images = sample(model, (16, 1, 28, 28), generator=g)
        >>> images.shape
        torch.Size([16, 1, 28, 28])
    """
    temperature = _check_temperature(temperature)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, but got {method!r}")
    device = _model_device(model)
    if generator is None:
        generator = torch.Generator(device=device)
        generator.seed()
    elif not isinstance(getattr(generator, "device", None), torch.device):
        raise TypeError(
            f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), "
            f"but got {type(generator).__name__} {generator!r}"
        )
    elif not _same_device(generator.device, device):
        raise ValueError(
            f"generator must be on the model's device {device}, but got a generator on "
            f"{generator.device}"
        )
    images, known = _start_images(shape, x, known, device)
    batch, channels, height, width = images.shape
    for name, given in (("color_groups", color_groups), ("group_layout", group_layout)):
        own = getattr(model, name, None)
        if given is not None and own is not None and given != own:
            # Another order than the model's would draw from the wrong distribution.
            raise ValueError(
                f"{name}={given!r} contradicts the model's {name}={own!r}; leave it out "
                f"(it is only for models without a {name} attribute)"
            )
    groups = color_groups if color_groups is not None else getattr(model, "color_groups", 1)
    layout = group_layout if group_layout is not None else getattr(model, "group_layout", "blocked")
    members = group_slices(channels, groups, layout)  # slices: cheaper to index than lists
    completing = bool(known.any())
    conditioning = _conditioning_kwargs(labels, cond)
    # A map is resized to the image's size by the model: feed it whole images then.
    crop = bool(getattr(model, "causal_rows", False)) and cond is None

    head: OutputHead | None = getattr(model, "head", None)
    levels = getattr(model, "levels", None)
    if head is None and isinstance(levels, int):
        head = Categorical(levels)
    if head is not None:
        _check_known_values(images, known, head.levels)

    was_training = model.training
    model.eval()
    # Inference mode skips autograd's bookkeeping on every small op of the loop (about
    # 10% of the cached sampler's time at batch 16); ``images`` was made outside it, so
    # it comes back a normal tensor.
    try:
        with torch.inference_mode():
            evaluator = None
            if method != "naive":
                try:
                    evaluator = IncrementalEvaluator(
                        model,
                        batch,
                        (height, width),
                        color_groups=groups,
                        group_layout=layout,
                        labels=labels,
                        cond=cond,
                    )
                except _NoPathError as reason:
                    if method == "cached":
                        raise ValueError(
                            f"method='cached' needs a model with an incremental path, but "
                            f"{reason}; use method='naive'"
                        ) from None
            # Every output of the row, checked for NaN and +inf once the row is done, so that
            # the loop does not wait on the device at every step.
            outputs: Tensor | None = None
            bar = (
                _progress(height, f"sampling {batch}x{channels}x{height}x{width}")
                if progress
                else None
            )
            for row in range(height):
                if bar is not None:
                    bar(row)
                visible = images[:, :, : row + 1] if crop else images
                for col in range(width):
                    pixel = images[:, :, row, col]  # a view: draws land in it
                    wanted_pixel = ~known[:, :, row, col] if completing else None
                    computed_last = False
                    for group, chans in enumerate(members):
                        wanted = None if wanted_pixel is None else wanted_pixel[:, chans]  # (B, n)
                        if wanted is not None and not bool(wanted.any()):
                            continue
                        if evaluator is not None:
                            params = evaluator._stepper.step(pixel, col)
                        else:
                            params = model(visible, **conditioning)[..., row, col]
                        if outputs is None:
                            outputs = params.new_zeros(width, len(members), *params.shape)
                        outputs[col, group].copy_(params)
                        if head is None:  # a bare model: (B, C, K) logits
                            head = Categorical(params.shape[-1])
                            _check_known_values(images, known, head.levels)
                        draw = head.sample(
                            params,
                            pixel,
                            wanted_pixel,
                            channels=chans,
                            generator=generator,
                            temperature=temperature,
                        )
                        if wanted is not None:
                            draw = torch.where(wanted, draw, pixel[:, chans])
                        pixel[:, chans] = draw
                        computed_last = group == len(members) - 1
                    if evaluator is not None:
                        evaluator._finish(pixel, computed_last)
                if outputs is not None and bool((outputs.isnan() | outputs.isposinf()).any()):
                    raise ValueError(
                        f"the model's output is NaN or +inf in row {row}: its weights or the "
                        f"conditioning hold NaN or overflow; no images were drawn"
                    )
            if bar is not None:
                bar(height)
    finally:
        model.train(was_training)
    return images


def _progress(rows: int, text: str) -> Callable[[int], None]:
    """``done(row)`` reports rows done; tqdm's bar if it is installed, else stderr lines."""
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]
    except ImportError:

        def line(done: int) -> None:
            print(f"{text}: row {done}/{rows}", file=sys.stderr, flush=True)

        return line
    bar = tqdm(total=rows, desc=text, unit="row", leave=False)

    def update(done: int) -> None:
        bar.update(done - bar.n)
        if done == rows:
            bar.close()

    return update


def _conditioning_kwargs(labels: Tensor | None, cond: Tensor | None) -> dict[str, Any]:
    # Passed only when given, so that models without conditioning keep working.
    kwargs: dict[str, Any] = {}
    if labels is not None:
        kwargs["labels"] = labels
    if cond is not None:
        kwargs["cond"] = cond
    return kwargs


def _same_device(a: torch.device, b: torch.device) -> bool:
    # "cuda" and "cuda:0" name the same device (with the default current device); cuda:1
    # is another one, whose generator cannot feed draws on cuda:0.
    return a.type == b.type and (a.type == "cpu" or (a.index or 0) == (b.index or 0))


def _check_known_values(images: Tensor, known: Tensor, levels: int) -> None:
    given = images[known]
    if given.numel() and (int(given.min()) < 0 or int(given.max()) >= levels):
        raise ValueError(
            f"x must have values in [0, {levels}) where known is True (the model has "
            f"{levels} levels), but got values in [{int(given.min())}, {int(given.max())}]"
        )
