"""One decoding step as a plain module, for ``torch.export`` and ONNX.

The evaluators keep Python state between steps (caches, the step index), which an
exported graph cannot hold. Two modules take that state out:

* ``DecodeStep`` is stateless: the image decoded so far and the step's positions in, the
  head's parameters there out. It is the ``FullForwardEvaluator``'s step: exact for any
  model and schedule, and the cheap one where a schedule has few steps (2 for a model
  built with ``order="checkerboard"``, times its colour groups).
* ``CachedDecodeStep`` is the ``IncrementalEvaluator``'s step with its caches passed in
  and returned: each call computes the trunk at the step's positions only. It is the one
  to export for a raster or wavefront decoder, whose steps are many.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._blocks import _ConvUnitStep, _SkipBlockStep
from ._checks import image_size as check_image_size
from ._checks import positive_int
from ._evaluation import model_trunk, unit_steps
from ._schedules import Positions
from ._steps import ConvStep, NoIncrementalPathError

__all__ = ["CachedDecodeStep", "DecodeStep"]


class DecodeStep(nn.Module):
    """``model``'s head parameters at a step's positions, from the image decoded so far.

    ``step(x, rows, cols)`` is ``model(x)[..., rows, cols]``: what
    ``Evaluator.params`` gives at a step whose positions are ``(rows, cols)``, when ``x``
    holds every value decoded before it (and, within a pixel, the earlier colour groups;
    later ones may hold anything). It has no state, so it exports with
    ``torch.export.export`` or ``torch.onnx.export(..., dynamo=True)`` with a dynamic
    batch, height, width and number of positions; see docs/contexts.md for a decoder's
    loop around it.

    Args:
        model: a model of integer images (``PixelCNN``, ``GatedPixelCNN``, or any module
            mapping ``(B, C, H, W)`` integers to parameters with the pixels last).

    Example:
        >>> model = PixelCNN(1, 2, hidden_channels=8, num_layers=2, order="checkerboard")
        >>> step = DecodeStep(model)
        >>> anchors = checkerboard((4, 4))[0]
        >>> step(torch.zeros(1, 1, 4, 4, dtype=torch.long), anchors.rows, anchors.cols).shape
        torch.Size([1, 1, 2, 8])
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        x: Tensor,
        rows: Tensor,
        cols: Tensor,
        labels: Tensor | None = None,
        cond: Tensor | None = None,
    ) -> Tensor:
        """The parameters at ``(rows, cols)``.

        Args:
            x: ``(B, C, H, W)`` int64 image decoded so far.
            rows: ``(n,)`` int64 rows of the step's positions.
            cols: ``(n,)`` int64 columns.
            labels: ``(B,)`` class labels, for a model built with ``num_classes``.
            cond: ``(B, M, h, w)`` map, for a model built with ``cond_channels``.

        Returns:
            ``(B, C, K, n)`` logits for a categorical head, ``(B, P, n)`` for the mixture.
        """
        given = {"labels": labels, "cond": cond}
        kwargs = {name: value for name, value in given.items() if value is not None}
        out: Tensor = self.model(x, **kwargs)
        return out[..., rows, cols]


class _LivePositions(Positions):
    """A step's positions as the graph's inputs: index tensors made on every call (no
    cache, which would keep one call's tensors for the next)."""

    def derived(
        self, key: Any, device: torch.device, make: Callable[[Positions], Tensor]
    ) -> Tensor:
        return make(self).to(device)


class _LiveSchedule:
    """What the unit steps read as their schedule: the image size, and at any step the
    positions of the current call."""

    group_passes = 1

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.now: Positions | None = None

    def __getitem__(self, step: int) -> Positions:
        assert self.now is not None
        return self.now


_EXPORTABLE = (_ConvUnitStep, _SkipBlockStep)


class CachedDecodeStep(nn.Module):
    """``IncrementalEvaluator``'s step as a function of its caches, for export.

    ``step(last, last_rows, last_cols, values, rows, cols, *caches)`` first stores the
    final values ``last`` of the previous step at its positions, then computes the head's
    parameters at this step's positions ``(rows, cols)`` from ``values`` there (the values
    known so far: zeros, or the earlier colour groups of a pixel), and returns them with
    the updated caches, ``(params, *caches)``. Feed the caches back in on the next call;
    ``initial_caches()`` gives the first ones. At the first step, ``last`` is the first
    step's positions with zeros (storing them changes nothing). The parameters equal
    ``IncrementalEvaluator.params`` at every step, and the model's forward on the
    finished image (float64 to about 1e-10, float32 to about 1e-5).

    The step is built for one batch size and image size (the caches' shapes); the
    number of positions n may change from call to call (export it as a dynamic
    dimension). Labels and ``cond`` given here are constants of the step. Like the
    evaluator, it reads the model's weights when it is built: build it again after
    training.

    Supported: the trunks of ``PixelCNN`` in raster or wavefront order (conv units,
    residual and bottleneck blocks). A ``GatedPixelCNN`` (its vertical stack is a row
    stream, planned per step) and a checkerboard model (use ``DecodeStep``: two steps)
    are refused, as is a unit of another class, which may keep state this module cannot
    see.

    Args:
        model: a ``PixelCNN``.
        batch_size: B.
        image_size: ``(H, W)``.
        labels: ``(B,)`` class labels of a model built with ``num_classes``.
        cond: ``(B, M, h, w)`` map of a model built with ``cond_channels``.

    Raises:
        NoIncrementalPathError: for a model or unit the step does not support.

    Example:
        >>> model = PixelCNN(1, 2, hidden_channels=8, num_layers=2).eval()
        >>> step = CachedDecodeStep(model, 1, (4, 4))
        >>> at = wavefront(model, (4, 4))[0]
        >>> zeros = torch.zeros(1, 1, len(at), dtype=torch.long)
        >>> caches = step.initial_caches()
        >>> params, *caches = step(zeros, at.rows, at.cols, zeros, at.rows, at.cols, *caches)
        >>> params.shape
        torch.Size([1, 1, 2, 1])
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int,
        image_size: tuple[int, int],
        *,
        labels: Tensor | None = None,
        cond: Tensor | None = None,
    ) -> None:
        super().__init__()
        name = type(model).__name__
        trunk = model_trunk(model)
        batch = positive_int("batch_size", batch_size)
        height, width = check_image_size(image_size)
        self.model = model  # its parameters; the steps read their weights when built
        self._layout = str(getattr(model, "group_layout", "blocked"))
        self._schedule = _LiveSchedule(height, width)
        if any(getattr(unit, "row_reads", lambda: None)() for unit in trunk):
            raise NoIncrementalPathError(
                f"CachedDecodeStep supports raster and wavefront models without a row "
                f"stream, but {name} has one (a gated vertical stack, planned per step); "
                f"DecodeStep exports it"
            )
        self._batch = batch
        self._steps = unit_steps(model, trunk, batch, self._schedule, (height, width), labels, cond)
        self._caches: list[ConvStep] = []  # the convs whose caches travel in and out
        for unit, step in zip(trunk, self._steps, strict=True):
            if type(step) not in _EXPORTABLE:
                raise NoIncrementalPathError(
                    f"CachedDecodeStep supports conv units and residual or bottleneck "
                    f"blocks, but {name}'s trunk has a {type(unit).__name__}; "
                    f"DecodeStep exports any model"
                )
            convs = [c for c in vars(step).values() if isinstance(c, ConvStep)]
            if any(c.gated for c in convs):
                raise NoIncrementalPathError(
                    f"CachedDecodeStep supports raster and wavefront models, but {name} "
                    f"has a checkerboard conv; DecodeStep exports it (a checkerboard "
                    f"model decodes in 2 steps)"
                )
            self._caches += [c for c in convs if c.spatial]
        # What the first caches are like (each conv's own, from here on, is the last
        # call's, which may be a tracer's).
        self._blank = [
            (conv.cache.shape, conv.cache.dtype, conv.cache.device) for conv in self._caches
        ]

    def _check_step(self, name: str, values: Tensor, rows: Tensor, cols: Tensor) -> None:
        """``values`` ``(B, C, n)`` integers, ``rows`` and ``cols`` ``(n,)`` integers."""
        if not isinstance(values, Tensor) or values.is_floating_point() or values.dim() != 3:
            raise TypeError(
                f"{name} must be an integer tensor (B, C, n), but got "
                f"{getattr(values, 'dtype', type(values).__name__)} of shape "
                f"{tuple(getattr(values, 'shape', ()))}"
            )
        if values.shape[0] != self._batch:
            raise ValueError(
                f"{name} must hold the step's batch of {self._batch} images, but has "
                f"{values.shape[0]} (shape {tuple(values.shape)})"
            )
        for axis, index in (("rows", rows), ("cols", cols)):
            if index.dim() != 1 or index.is_floating_point() or index.shape[0] != values.shape[2]:
                raise ValueError(
                    f"the {axis} of {name} must be a 1-D integer tensor of its "
                    f"{values.shape[2]} positions, but got {index.dtype} of shape "
                    f"{tuple(index.shape)}"
                )

    def initial_caches(self) -> list[Tensor]:
        """The caches before the first step: one zero-padded image a k x k conv,
        ``(B, (H + 2h) * (W + 2w), C_in)``, channels last, in the model's dtype."""
        return [
            torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in self._blank
        ]

    def _features(self, values: Tensor) -> Tensor:
        # Detached, as the steps' weights are: the step is for decoding, and a history
        # through the caches would grow with every call.
        features: Tensor = self.model.stem(values).detach()  # type: ignore[operator]
        return features.transpose(1, 2)  # (B, n, F)

    def _at(self, rows: Tensor, cols: Tensor) -> None:
        """Make ``(rows, cols)`` the positions every unit step reads."""
        self._schedule.now = _LivePositions(rows, cols, self._schedule.width)

    def forward(
        self,
        last: Tensor,
        last_rows: Tensor,
        last_cols: Tensor,
        values: Tensor,
        rows: Tensor,
        cols: Tensor,
        *caches: Tensor,
    ) -> tuple[Tensor, ...]:
        """The parameters at ``(rows, cols)``, and the caches after this step.

        Args:
            last: ``(B, C, m)`` int64 final values of the previous step's positions.
            last_rows: ``(m,)`` int64 rows of those positions.
            last_cols: ``(m,)`` int64 columns.
            values: ``(B, C, n)`` int64 values known so far at this step's positions.
            rows: ``(n,)`` int64 rows of this step's positions.
            cols: ``(n,)`` int64 columns.
            caches: the caches the last call returned (``initial_caches()`` at first).

        Returns:
            ``(params, *caches)``: ``(B, C, K, n)`` logits for a categorical head,
            ``(B, P, n)`` for the mixture, then the caches.
        """
        if len(caches) != len(self._caches):
            raise ValueError(
                f"caches must be the {len(self._caches)} tensors of initial_caches() or of "
                f"the last call, but got {len(caches)}"
            )
        self._check_step("last", last, last_rows, last_cols)
        self._check_step("values", values, rows, cols)
        for conv, cache, (shape, _, _) in zip(self._caches, caches, self._blank, strict=True):
            if tuple(cache.shape) != tuple(shape):
                raise ValueError(
                    f"caches must have the shapes of initial_caches(), but one has shape "
                    f"{tuple(cache.shape)} where {tuple(shape)} is expected"
                )
            conv.cache = cache.clone()  # stored into out of place: the caller's stay
        try:
            self._at(last_rows, last_cols)
            self._steps[0].write(self._features(last), 0)
            self._at(rows, cols)
            x: Any = self._features(values)
            for step in self._steps:
                x = step.step(x, 0)
            params = self.model.head.arrange(  # type: ignore[operator, union-attr]
                x.transpose(1, 2), values.shape[1], self._layout
            )
            return (params, *(conv.cache for conv in self._caches))
        finally:
            self._schedule.now = None
