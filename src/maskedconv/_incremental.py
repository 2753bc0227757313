"""The incremental protocol: a causal layer evaluated one position at a time.

Every causal layer the library ships has two ways to run: ``forward`` over a whole
image, and ``incremental(batch, width)``, which returns a stateful *step* object that
computes the layer's output at one position from its inputs so far (Ramachandran et
al., "Fast Generation for Convolutional Autoregressive Models", 2017). A step object
follows ``IncrementalStep``:

* ``start_row(row)`` is called at the start of every row, rows in order from 0; the
  rows above are final then, so a layer may compute their contribution once per row;
* ``step(x, col)`` maps the layer's input at ``(row, col)``, ``(B, C_in)``, to its
  output there, ``(B, C_out)``; it may be called several times at one position (once
  per colour group) and always with the position's latest values;
* ``write(x, col)`` stores the final input at ``(row, col)`` without computing: the
  caller promises that every output at ``(row, col)`` it will read is already final.

A model composes its layers' steps; the sampler knows only this protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = [
    "IncrementalStep",
    "NoIncrementalPathError",
    "Pointwise",
    "SequentialStep",
    "cache_bytes",
    "step_of",
]


@runtime_checkable
class IncrementalStep(Protocol):
    """One layer (or model) evaluated position by position; see the module docstring."""

    def start_row(self, row: int) -> None:
        """Prepare for row ``row``; rows ``< row`` are final."""
        ...

    def step(self, x: Tensor, col: int) -> Tensor:
        """The output at ``(row, col)`` from the input there, ``(B, C_in) -> (B, C_out)``."""
        ...

    def write(self, x: Tensor, col: int) -> None:
        """Store the final input at ``(row, col)``; outputs there are already final."""
        ...


class NoIncrementalPathError(Exception):
    """A layer or model has no exact incremental path; the message says why."""


def cache_bytes(step: object) -> int:
    """Memory held by a step's caches, in bytes (0 for a step that keeps none)."""
    own = getattr(step, "cache_bytes", None)
    return int(own()) if callable(own) else 0


class Pointwise:
    """The step of a function applied at each position on its own (ReLU, a norm...)."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn = fn

    def start_row(self, row: int) -> None:
        pass

    def step(self, x: Tensor, col: int) -> Tensor:
        return self.fn(x)

    def write(self, x: Tensor, col: int) -> None:
        pass


# Elementwise torch modules: they act on each position alone, so their step is
# themselves. Anything else must bring its own ``incremental``.
_ELEMENTWISE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Identity,
)


def step_of(
    module: nn.Module, batch: int, width: int, *, fresh_input: bool = False
) -> IncrementalStep:
    """The incremental step of ``module``: its own, or a pointwise one for elementwise ops.

    ``fresh_input`` says that the input is a tensor no one else holds, so a ReLU may
    run in place.

    Raises:
        NoIncrementalPathError: if the module has no incremental path.
    """
    own = getattr(module, "incremental", None)
    if callable(own):
        step = own(batch, width)
        if not isinstance(step, IncrementalStep):
            raise TypeError(
                f"{type(module).__name__}.incremental() must return an object with start_row, "
                f"step and write, but got {type(step).__name__}"
            )
        return step
    if type(module) is nn.ReLU and fresh_input:
        return Pointwise(torch.relu_)
    if isinstance(module, _ELEMENTWISE):
        return Pointwise(module)
    raise NoIncrementalPathError(f"{type(module).__name__} has no incremental path")


class SequentialStep:
    """The steps of layers applied one after another."""

    def __init__(self, modules: Iterable[nn.Module], batch: int, width: int) -> None:
        self.steps = [
            step_of(module, batch, width, fresh_input=index > 0)
            for index, module in enumerate(modules)
        ]

    def start_row(self, row: int) -> None:
        for step in self.steps:
            step.start_row(row)

    def step(self, x: Tensor, col: int) -> Tensor:
        for step in self.steps:
            x = step.step(x, col)
        return x

    def cache_bytes(self) -> int:
        return sum(cache_bytes(step) for step in self.steps)

    def write(self, x: Tensor, col: int) -> None:
        # Only the first layer sees ``x`` itself; later layers' inputs at ``col`` are
        # outputs that the caller promises are final, stored when they were computed.
        if self.steps:
            self.steps[0].write(x, col)
