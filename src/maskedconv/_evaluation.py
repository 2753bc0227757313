"""Evaluators (a model's parameters, a schedule step at a time) and ``sample`` over them.

Two evaluators share one interface (``Evaluator``):

* ``IncrementalEvaluator``: the model's trunk of causal units folded step by step, each
  unit computing only the positions of the step from its caches (Ramachandran et al.,
  2017); for decoders and for the fast sampler;
* ``FullForwardEvaluator``: the whole model run at every call (van den Oord et al.,
  2016); the reference, and the path for any model without a trunk of units.

At step t of the schedule (``positions``: n of them), ``params(values)`` takes the
positions' current values ``(B, C, n)`` and returns the head's parameters there,
``(B, C, K, n)`` for a categorical head or ``(B, P, n)`` for the mixture: what
``model(x)[..., rows, cols]`` gives for the finished image. Within a pixel, colour groups
come in order (``groups``: the ones decoded at this step, all of them but for a
group-major schedule, which decodes one a step): group g's parameters are exact once the
groups before it hold their final values. ``advance(values)`` stores the final values and
moves to the next step.

The model protocol: ``model(x, **conditioning)``, ``in_channels``, ``head`` (else a
categorical over the output's K), optional ``color_groups``/``group_layout``; for the
incremental path, ``units()`` (the trunk), ``stem``, ``conditioning(...)``. This module
imports no model class.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import image_size as check_image_size
from ._checks import positive_int
from ._heads import Categorical, OutputHead
from ._masks import group_slices, normal_color_groups
from ._schedules import SCHEDULES, Schedule, resolve_schedule
from ._steps import NoIncrementalPathError, StepContext, UnitStep

__all__ = ["Evaluator", "FullForwardEvaluator", "IncrementalEvaluator", "sample"]

_METHODS = ("auto", "cached", "naive")


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _conditioning_kwargs(labels: Tensor | None, cond: Tensor | None) -> dict[str, Any]:
    # Passed only when given, so that models without conditioning keep working.
    given = {"labels": labels, "cond": cond}
    return {name: value for name, value in given.items() if value is not None}


def _groups_of(
    model: nn.Module,
    channels: int,
    color_groups: int | Sequence[int] | None,
    group_layout: str | None,
) -> list[slice]:
    for name, given in (("color_groups", color_groups), ("group_layout", group_layout)):
        own = getattr(model, name, None)
        if given is not None and own is not None and given != own:
            # Another order than the model's would draw from the wrong distribution.
            raise ValueError(
                f"{name}={given!r} contradicts the model's {name}={own!r}; leave it out "
                f"(it is only for models without a {name} attribute)"
            )
    groups = color_groups if color_groups is not None else getattr(model, "color_groups", 1)
    layout = group_layout if group_layout is not None else getattr(model, "group_layout", None)
    return group_slices(channels, normal_color_groups(groups), str(layout or "blocked"))


def model_trunk(model: nn.Module) -> list[nn.Module]:
    """``model.units()``, the trunk of causal units an incremental path folds.

    Raises:
        NoIncrementalPathError: where the model has none, saying why.
    """
    units = getattr(model, "units", None)
    if not callable(units) or not hasattr(model, "stem"):
        raise NoIncrementalPathError(
            f"{type(model).__name__} has no incremental path: it has no trunk of causal "
            f"units (units() and stem)"
        )
    try:
        return list(units())
    except NoIncrementalPathError as reason:
        raise NoIncrementalPathError(
            f"{type(model).__name__} has no incremental path: {reason}"
        ) from None


def unit_steps(
    model: nn.Module,
    trunk: Sequence[nn.Module],
    batch_size: int,
    schedule: Any,
    size: tuple[int, int],
    labels: Tensor | None,
    cond: Tensor | None,
) -> list[UnitStep]:
    """Each unit of ``trunk`` as its step, for ``batch_size`` images of ``size`` on
    ``schedule``, with the model's conditioning (``labels``, ``cond``) checked."""
    conditioning = model.conditioning(labels, cond, batch_size, size)  # type: ignore[operator]
    context = StepContext(batch_size, schedule, conditioning, trunk)
    steps: list[UnitStep] = []
    rows = None
    with torch.no_grad():
        for unit in trunk:
            step = unit.incremental(context, rows)  # type: ignore[operator]
            steps.append(step)
            rows = step.rows
    return steps


class Evaluator:
    """The interface both evaluators share; see the module docstring.

    Attributes:
        schedule: the ``Schedule``; ``len(schedule)`` steps.
        step: the index of the current step.
        groups: the channels of each colour group, in the order they are decoded.
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int,
        image_size: tuple[int, int],
        schedule: str | Schedule,
        color_groups: int | Sequence[int] | None,
        group_layout: str | None,
        channels: int | None = None,
    ) -> None:
        self.batch_size = positive_int("batch_size", batch_size)
        self.height, self.width = size = check_image_size(image_size)
        self.channels = channels or int(getattr(model, "in_channels", 0)) or None
        levels = getattr(model, "levels", None)
        self._levels = levels if isinstance(levels, int) else None
        self.schedule = resolve_schedule(schedule, model, size)
        # Each group's channels, once: params() and advance() read them at every step.
        self._groups = (
            None
            if self.channels is None
            else _groups_of(model, self.channels, color_groups, group_layout)
        )
        passes = self.schedule.group_passes
        if passes > 1 and (self._groups is None or passes != len(self._groups)):
            have = "unknown" if self._groups is None else len(self._groups)
            raise ValueError(
                f"{self.schedule!r} decodes {passes} colour groups one after another, but the "
                f"model has {have} colour groups"
            )
        self.step = 0
        self._last: Tensor | None = None  # the values of the last params() at this step

    @property
    def groups(self) -> list[slice]:
        """The channels of each colour group decoded at this step, in order: every group,
        but the one of ``schedule.group(step)`` for a group-major schedule."""
        if self._groups is None:
            raise ValueError("the model has no in_channels attribute: groups are unknown")
        group = None if self.done else self.schedule.group(self.step)
        return list(self._groups) if group is None else [self._groups[group]]

    @property
    def done(self) -> bool:
        """Whether every step has been advanced past."""
        return self.step >= len(self.schedule)

    @property
    def positions(self) -> list[tuple[int, int]]:
        """The current step's ``(row, col)`` positions, n of them."""
        return self.schedule[self.step].tolist()

    @property
    def rows(self) -> Tensor:
        """``(n,)`` rows of the current step's positions."""
        return self.schedule[self.step].rows

    @property
    def cols(self) -> Tensor:
        """``(n,)`` columns of the current step's positions."""
        return self.schedule[self.step].cols

    def _check(self, values: Tensor) -> None:
        if self.done:
            raise ValueError(
                f"every step of the {self.height}x{self.width} image is done "
                f"({len(self.schedule)} steps)"
            )
        if (
            not isinstance(values, Tensor)
            or values.is_floating_point()
            or values.dtype == torch.bool
        ):
            raise TypeError(
                f"values must be an integer tensor (B, C, n), but got {type(values).__name__} "
                f"{getattr(values, 'dtype', '')}"
            )
        n = len(self.schedule[self.step])
        expected = (self.batch_size, self.channels or values.shape[1], n)
        if tuple(values.shape) != expected:
            raise ValueError(
                f"values must have shape (B, C, n) = {expected} at step {self.step}, but got "
                f"{tuple(values.shape)}"
            )
        if self._levels is not None and values.numel():
            lo, hi = int(values.min()), int(values.max())
            if lo < 0 or hi >= self._levels:
                raise ValueError(
                    f"values must be in [0, {self._levels}) (levels={self._levels}), but got "
                    f"values in [{lo}, {hi}]"
                )

    def params(self, values: Tensor) -> Tensor:
        """The head's parameters at the current step's positions.

        Args:
            values: ``(B, C, n)`` integer values there; the groups before the one being
                decoded must hold their final values.

        Returns:
            ``(B, C, K, n)`` logits for a categorical head, ``(B, P, n)`` for the mixture.
        """
        self._check(values)
        groups = self._groups
        # What the next advance() compares: the earlier groups' values (none for G = 1).
        self._last = values.clone() if groups is None or len(groups) > 1 else values[:, :0]
        return self._params(values)

    def advance(self, values: Tensor) -> None:
        """Store the final values ``(B, C, n)`` of the current step and move to the next."""
        self._check(values)
        last, self._last = self._last, None
        self._advance(values, last is not None and self._sees_same(last, values))
        self.step += 1
        if not self.done:
            self._next_step()

    def _sees_same(self, last: Tensor, values: Tensor) -> bool:
        # Nothing at a position sees its last group: if the last params() had every other
        # group's final values, what it computed there is final.
        group = self.schedule.group(self.step)
        if group is not None and self._groups is not None and group < len(self._groups) - 1:
            return False  # group-major: the later groups at these positions see this one
        earlier = self._groups[:-1] if self._groups is not None else []
        return all(torch.equal(last[:, chans], values[:, chans]) for chans in earlier)

    def _params(self, values: Tensor) -> Tensor:
        raise NotImplementedError

    def _advance(self, values: Tensor, computed: bool) -> None:
        raise NotImplementedError

    def _next_step(self) -> None:
        """Called when ``step`` has moved to a new step."""


class IncrementalEvaluator(Evaluator):
    """A model evaluated a schedule step at a time, equal to its forward.

    For decoders (entropy coding with a PixelCNN context model) and samplers: at each
    step, ``params`` gives the head's parameters at the step's n positions from
    everything decoded so far, equal to the full forward for the finished image
    (float64 to about 1e-10, float32 to about 1e-5); ``advance`` stores the final values.
    Each step runs every unit of the trunk at the step's positions only, from caches of
    their inputs, channels last, each kept only while a later step reads it
    (``cache_bytes()``: a few rows of the image per k x k conv in raster order, a band
    around the wavefront).

    Args:
        model: a model with a trunk of causal units (``PixelCNN``, ``GatedPixelCNN``).
        batch_size: B.
        image_size: ``(H, W)``.
        schedule: ``"auto"`` (the fewest steps the model allows: the wavefront with its
            measured slope), ``"wavefront"``, ``"raster"`` or a ``Schedule``.
        color_groups: G; defaults to ``model.color_groups``, else 1.
        group_layout: defaults to ``model.group_layout``, else ``"blocked"``.
        labels: ``(B,)`` class labels of a model built with ``num_classes``.
        cond: ``(B, M, h, w)`` map of a model built with ``cond_channels``.

    Raises:
        ValueError: for a bad size, a model without a trunk of units, or a schedule too
            steep for the model's vertical stack.

    Example:
        A decoder's loop (``decode`` stands for the entropy decoder). It keeps the image
        decoded so far: a group-major schedule visits a position once per group, and its
        earlier groups must come with it::

            ev = IncrementalEvaluator(model, 1, (H, W))
            image = torch.zeros(1, C, H, W, dtype=torch.long)
            with torch.no_grad():
                while not ev.done:
                    rows, cols = ev.rows, ev.cols
                    values = image[:, :, rows, cols]  # (1, C, n), a copy
                    for channels in ev.groups:
                        params = ev.params(values)  # (1, C, K, n) for a Categorical head
                        values[:, channels] = decode(params[:, channels])
                    ev.advance(values)
                    image[:, :, rows, cols] = values
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int,
        image_size: tuple[int, int],
        *,
        schedule: str | Schedule = "auto",
        color_groups: int | Sequence[int] | None = None,
        group_layout: str | None = None,
        labels: Tensor | None = None,
        cond: Tensor | None = None,
    ) -> None:
        trunk = model_trunk(model)
        super().__init__(model, batch_size, image_size, schedule, color_groups, group_layout)
        size = (self.height, self.width)
        self._stem: nn.Module = model.stem  # type: ignore[assignment]
        self._head: OutputHead = model.head  # type: ignore[assignment]
        self._layout = str(getattr(model, "group_layout", "blocked"))
        self._steps = unit_steps(model, trunk, self.batch_size, self.schedule, size, labels, cond)
        self._next_step()

    def _next_step(self) -> None:
        rows: Any = None
        for step in self._steps:
            rows = step.advance_rows(self.step, rows)

    def _features(self, values: Tensor) -> Tensor:
        features: Tensor = self._stem(values)  # (B, F, n)
        return features.transpose(1, 2)  # (B, n, F)

    def _params(self, values: Tensor) -> Tensor:
        x: Any = self._features(values)
        for step in self._steps:
            x = step.step(x, self.step)
        out = x.transpose(1, 2)  # (B, P, n)
        return self._head.arrange(out, values.shape[1], self._layout)

    def _advance(self, values: Tensor, computed: bool) -> None:
        # Only the first unit sees a position's own values, and nothing there sees its
        # last group: after that group's step everything else there is final. Where every
        # later unit keeps nothing between steps (a checkerboard model's 1x1 blocks), the
        # first unit's cache is all there is to store.
        if computed or all(step.stateless for step in self._steps[1:]):
            self._steps[0].write(self._features(values), self.step)
        else:
            self._params(values)

    def cache_bytes(self) -> int:
        """Memory held by the caches, in bytes."""
        return sum(step.cache_bytes() for step in self._steps)


class FullForwardEvaluator(Evaluator):
    """The whole model run at every ``params`` call: the reference evaluator.

    Works with any model that maps ``(B, C, H, W)`` integer images to its head's
    parameters with the pixels last. Rows below the step's lowest are not fed when the
    model says ``causal_rows = True`` (and has no conditioning map to resize).

    Args:
        model: the model.
        batch_size: B.
        image_size: ``(H, W)``.
        schedule: ``"raster"`` (default), ``"wavefront"``/``"auto"`` (a model with a
            trunk of units), or a ``Schedule``.
        color_groups: G; defaults to ``model.color_groups``, else 1.
        group_layout: defaults to ``model.group_layout``, else ``"blocked"``.
        labels: class labels, as for the model's forward.
        cond: conditioning map, as for the model's forward.
        channels: C; defaults to ``model.in_channels`` (required without it).
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int,
        image_size: tuple[int, int],
        *,
        schedule: str | Schedule = "raster",
        color_groups: int | Sequence[int] | None = None,
        group_layout: str | None = None,
        labels: Tensor | None = None,
        cond: Tensor | None = None,
        channels: int | None = None,
    ) -> None:
        super().__init__(
            model, batch_size, image_size, schedule, color_groups, group_layout, channels
        )
        if self.channels is None:
            raise ValueError(
                f"channels is required: {type(model).__name__} has no in_channels attribute"
            )
        self._model = model
        self._kwargs = _conditioning_kwargs(labels, cond)
        self._crop = bool(getattr(model, "causal_rows", False)) and cond is None
        self.image = torch.zeros(
            batch_size,
            self.channels,
            self.height,
            self.width,
            dtype=torch.long,
            device=_model_device(model),
        )

    def _params(self, values: Tensor) -> Tensor:
        at = self.schedule[self.step]
        self.image[:, :, at.rows, at.cols] = values
        visible = self.image[:, :, : int(at.rows.max()) + 1] if self._crop else self.image
        out: Tensor = self._model(visible, **self._kwargs)
        return out[..., at.rows, at.cols]

    def _advance(self, values: Tensor, computed: bool) -> None:
        at = self.schedule[self.step]
        self.image[:, :, at.rows, at.cols] = values


def _check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float > 0, but got {type(temperature).__name__}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite float > 0, but got {temperature}")
    return float(temperature)


def _check_generator(generator: object, device: torch.device) -> torch.Generator:
    if generator is None:
        fresh = torch.Generator(device=device)
        fresh.seed()
        return fresh
    if not isinstance(getattr(generator, "device", None), torch.device):
        raise TypeError(
            f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), "
            f"but got {type(generator).__name__} {generator!r}"
        )
    if not _same_device(generator.device, device):  # type: ignore[attr-defined]
        raise ValueError(
            f"generator must be on the model's device {device}, but got a generator on "
            f"{generator.device}"  # type: ignore[attr-defined]
        )
    return generator  # type: ignore[return-value]


def _same_device(a: torch.device, b: torch.device) -> bool:
    # "cuda" and "cuda:0" name the same device (with the default current device); cuda:1
    # is another one, whose generator cannot feed draws on cuda:0.
    return a.type == b.type and (a.type == "cpu" or (a.index or 0) == (b.index or 0))


def _start_images(
    shape: Sequence[int] | None, x: Tensor | None, known: Tensor | None, device: torch.device
) -> tuple[Tensor, Tensor | None]:
    """The images to fill, and which sub-pixels are given (``None``: none)."""
    if x is None and known is None:
        if shape is None:
            raise ValueError("give either shape=(B, C, H, W) or a partial image x= with known=")
        dims = tuple(shape)
        if len(dims) != 4 or any(
            not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in dims
        ):
            raise ValueError(f"shape must be 4 positive ints (B, C, H, W), but got {shape}")
        return torch.zeros(dims, dtype=torch.long, device=device), None
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
    # Unknown entries start at 0; by causality their value never reaches a parameter
    # before they are drawn.
    return torch.where(known, x.to(device=device, dtype=torch.long), 0), known


def _check_known_values(images: Tensor, known: Tensor | None, levels: int) -> None:
    if known is None:
        return
    given = images[known]
    if given.numel() and (int(given.min()) < 0 or int(given.max()) >= levels):
        raise ValueError(
            f"x must have values in [0, {levels}) where known is True (the model has "
            f"{levels} levels), but got values in [{int(given.min())}, {int(given.max())}]"
        )


def _evaluator(model: nn.Module, method: str, shape: tuple[int, ...], **options: Any) -> Evaluator:
    batch, _, height, width = shape
    if method != "naive":
        try:
            return IncrementalEvaluator(model, batch, (height, width), **options)
        except NoIncrementalPathError as reason:
            if method == "cached":
                raise ValueError(
                    f"method='cached' needs a model with an incremental path, but {reason}; "
                    f"use method='naive'"
                ) from None
    if options["schedule"] == "auto" and not callable(getattr(model, "units", None)):
        options["schedule"] = "raster"  # no trunk to measure a wavefront from
    return FullForwardEvaluator(model, batch, (height, width), channels=shape[1], **options)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """The block in eval mode and ``torch.inference_mode``; the model's mode restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


@torch.no_grad()
def sample(
    model: nn.Module,
    shape: Sequence[int] | None = None,
    *,
    x: Tensor | None = None,
    known: Tensor | None = None,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    color_groups: int | Sequence[int] | None = None,
    group_layout: str | None = None,
    method: str = "auto",
    schedule: str | Schedule = "auto",
    labels: Tensor | None = None,
    cond: Tensor | None = None,
    progress: bool = False,
) -> Tensor:
    """Draw integer images from an autoregressive model, a schedule step at a time.

    At each step of the schedule, the parameters at the step's positions are computed
    and each colour group is drawn from them in order (``model.head.sample``), with the
    log-probabilities of the levels divided by ``temperature``. Every sub-pixel is drawn
    by its inverse CDF from its own uniform, all drawn from ``generator`` at the start in
    one fixed order: the same seed gives the same images whatever the schedule or method
    (up to a float rounding difference of the parameters that lands exactly on a uniform,
    about 1e-7 per draw in float32).

    ``method``: ``"cached"`` (``IncrementalEvaluator``: every unit at the step's
    positions only, about one forward pass per colour group in all), ``"naive"``
    (``FullForwardEvaluator``: the whole model per step), or ``"auto"`` (cached where the
    model has a trunk of units). ``schedule``: ``"auto"`` (the fewest steps the model
    allows: the wavefront, 136 steps for the design blog's 7x7 model on 28x28 instead of
    784), ``"wavefront"``, ``"raster"``, or a ``Schedule``.

    Args:
        model: the model; see ``maskedconv._evaluation`` for the protocol.
        shape: ``(B, C, H, W)`` of the images to draw; omit when ``x`` is given.
        x: ``(B, C, H, W)`` integer image to complete; its entries where ``known`` is
            True come back unchanged and condition the rest.
        known: ``(B, C, H, W)`` bool tensor marking the given sub-pixels of ``x``.
        generator: the source of randomness, on the model's device; the global RNG is
            never touched (without one, a fresh generator is seeded from the OS).
        temperature: > 0; divides the log-probabilities. Below 1 sharpens towards the mode.
        color_groups: G; defaults to ``model.color_groups``, else 1.
        group_layout: defaults to ``model.group_layout``, else ``"blocked"``.
        method: ``"auto"``, ``"cached"`` or ``"naive"``.
        schedule: ``"auto"``, ``"wavefront"``, ``"raster"`` or a ``Schedule``.
        labels: ``(B,)`` int64 class labels, for a model built with ``num_classes``
            (with ``num_classes=10``, ``labels=torch.arange(10)`` draws one image per class).
        cond: ``(B, M, h, w)`` float map, for a model built with ``cond_channels``.
        progress: show a progress bar, a step per schedule step (tqdm; without tqdm
            installed, a line every 10% on stderr).

    Returns:
        ``(B, C, H, W)`` int64 images on the model's device.

    Raises:
        ValueError: for a bad shape, temperature, ``x``/``known`` pair, a known value
            outside ``[0, K)``, a generator on another device, an unknown ``method`` or
            ``schedule``, ``method="cached"`` for a model without an incremental path,
            or parameters that are NaN or +inf.
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
    if not isinstance(schedule, Schedule) and schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES} or a Schedule, but got {schedule!r}")
    device = _model_device(model)
    generator = _check_generator(generator, device)
    images, known = _start_images(shape, x, known, device)
    head: OutputHead | None = getattr(model, "head", None)
    levels = getattr(model, "levels", None)
    if head is None and isinstance(levels, int):
        head = Categorical(levels)
    if head is not None:
        _check_known_values(images, known, head.levels)
    # One uniform per sub-pixel, drawn first in one order: the draws do not depend on the
    # schedule, the method or the batch layout of the steps.
    noise = torch.rand(images.shape, generator=generator, device=device, dtype=torch.float64)

    # Inference mode skips autograd's bookkeeping on every small op of the loop;
    # ``images`` was made outside it, so it comes back a normal tensor.
    with evaluating(model):
        evaluator = _evaluator(
            model,
            method,
            tuple(images.shape),
            schedule=schedule,
            color_groups=color_groups,
            group_layout=group_layout,
            labels=labels,
            cond=cond,
        )
        head = _draw_all(evaluator, images, known, noise, head, temperature, progress)
    return images


def _draw_all(
    evaluator: Evaluator,
    images: Tensor,
    known: Tensor | None,
    noise: Tensor,
    head: OutputHead | None,
    temperature: float,
    progress: bool,
) -> OutputHead | None:
    """The sampling loop: every step of the evaluator's schedule, group by group."""
    steps = len(evaluator.schedule)
    bar = _progress(steps, "sampling " + "x".join(map(str, images.shape))) if progress else None
    # Per step, a float64 sum of its parameters: NaN or +inf when any parameter is NaN or
    # +inf (-inf logits are allowed: they keep it -inf, unless a +inf makes it NaN).
    # Checked at the end, so that the loop never waits on the device.
    sums: list[Tensor] = []
    sum_steps: list[int] = []
    while not evaluator.done:
        at = evaluator.schedule[evaluator.step]
        values = images[:, :, at.rows, at.cols]  # (B, C, n)
        wanted = None if known is None else ~known[:, :, at.rows, at.cols]
        flat = values.transpose(1, 2).flatten(0, 1)  # (B*n, C): a view of values' copy
        uniforms = noise[:, :, at.rows, at.cols].transpose(1, 2).flatten(0, 1)
        wanted_flat = None if wanted is None else wanted.transpose(1, 2).flatten(0, 1)
        for chans in evaluator.groups:
            if wanted_flat is not None and not bool(wanted_flat[:, chans].any()):
                continue
            params = evaluator.params(values)
            sums.append(params.sum(dtype=torch.float64))
            sum_steps.append(evaluator.step)
            if head is None:  # a bare model: (B, C, K, n) logits
                head = Categorical(params.shape[2])
            per_position = params.movedim(-1, 1).flatten(0, 1)  # (B*n, ...)
            draw = head.sample(
                per_position,
                flat.contiguous(),
                wanted_flat,
                channels=chans,
                noise=uniforms,
                temperature=temperature,
            )
            if wanted_flat is not None:
                draw = torch.where(wanted_flat[:, chans], draw, flat[:, chans])
            values[:, chans] = draw.view(values.shape[0], -1, draw.shape[1]).transpose(1, 2)
            flat = values.transpose(1, 2).flatten(0, 1)
        evaluator.advance(values)
        images[:, :, at.rows, at.cols] = values
        if bar is not None:
            bar(evaluator.step)
    if sums:
        flags = torch.stack(sums)
        bad = torch.nonzero(flags.isnan() | flags.isposinf())
        if len(bad):
            step = sum_steps[int(bad[0])]
            at = evaluator.schedule[step]
            raise ValueError(
                f"the model's output is NaN or +inf in row {int(at.rows[0])} (step {step} of "
                f"{evaluator.schedule!r}): its weights or the conditioning hold NaN or "
                f"overflow; no images were drawn"
            )
    return head


def _progress(steps: int, text: str) -> Callable[[int], None]:
    """``done(step)`` reports steps done; tqdm's bar if it is installed, else stderr lines."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        every = max(1, steps // 10)

        def line(done: int) -> None:
            if done % every == 0 or done == steps:
                print(f"{text}: step {done}/{steps}", file=sys.stderr, flush=True)

        return line
    bar = tqdm(total=steps, desc=text, unit="step", leave=False)

    def update(done: int) -> None:
        bar.update(done - bar.n)
        if done == steps:
            bar.close()

    return update
