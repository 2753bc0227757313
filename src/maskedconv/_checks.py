"""Argument checks shared by every module: one place for each rule and its message."""

from __future__ import annotations

import operator
from collections.abc import Sequence

__all__: list[str] = []  # nothing public: see maskedconv/__init__.py


def as_int(name: str, value: object) -> int:
    """An int (numpy integers too, as ``nn.Conv2d`` takes them), else a ``TypeError``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, but got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{name} must be an int, but got {type(value).__name__} {value!r}"
        ) from None


def int_pair(name: str, value: object) -> tuple[int, int]:
    """An int or a pair of ints, as ``nn.Conv2d`` takes ``kernel_size`` and ``dilation``."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, but got {value!r}")
        return as_int(name, value[0]), as_int(name, value[1])
    one = as_int(name, value)
    return one, one


def positive_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` if it is an int ``>= minimum`` (not a bool), else a ``ValueError``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, but got {value!r}")
    return value


def image_size(value: object, name: str = "image_size") -> tuple[int, int]:
    """``(H, W)``: two positive ints, as a tuple."""
    size = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else ()
    if len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size):
        raise ValueError(f"{name} must be (H, W), two positive ints, but got {value!r}")
    return int(size[0]), int(size[1])
