"""Interleaved timing: every variant of a case runs once per round, in turn.

Timing the variants side by side in one process, round after round, exposes them to
the same machine state (allocator, caches, other load). A ratio is taken round by round
between variants of the same run (paired), and reported as the median of those paired
ratios with their spread: on a noisy machine one variant's time can swing 2x within a
minute, and a pair measured seconds apart shares most of that swing.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any


class Timings(dict[str, float]):
    """Median seconds per call of each variant; ``rounds`` keeps each round's seconds and
    ``run`` which ``interleaved`` call timed it (only variants of one call are paired)."""

    def __init__(self, rounds: Mapping[str, list[float]], run: int) -> None:
        super().__init__({name: statistics.median(ts) for name, ts in rounds.items()})
        self.rounds = dict(rounds)
        self.run = dict.fromkeys(rounds, run)

    def update(self, other: Any = (), **kwargs: float) -> None:  # type: ignore[override]
        super().update(other, **kwargs)
        if isinstance(other, Timings):
            self.rounds.update(other.rounds)
            self.run.update(other.run)

    def add_scaled(self, name: str, source: Timings, variant: str, factor: float) -> None:
        """Add ``name``: ``source``'s ``variant`` times ``factor``, round by round."""
        self.rounds[name] = [t * factor for t in source.rounds[variant]]
        self.run[name] = source.run[variant]
        self[name] = statistics.median(self.rounds[name])

    def ratios(self, num: str, den: str) -> list[float]:
        """``num``'s seconds over ``den``'s: round by round when one call timed both, else
        every pair of their rounds; a derived entry (no rounds) counts as its value."""
        a = self.rounds.get(num, [self[num]])
        b = self.rounds.get(den, [self[den]])
        same_run = num in self.run and self.run.get(num) == self.run.get(den)
        if same_run and len(a) == len(b):
            return [x / y for x, y in zip(a, b, strict=True)]
        return [x / y for x, y in itertools.product(a, b)]


_runs = itertools.count()


def interleaved(
    variants: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
) -> Timings:
    """Time each variant once per round, in turn, for ``rounds`` rounds; ``sync`` waits
    for an asynchronous device (``torch.cuda.synchronize``) before a clock is read."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return Timings(times, next(_runs))


def spread(values: list[float]) -> dict[str, float]:
    """Median, quartiles, min and max of paired ratios."""
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {
        "value": statistics.median(ordered),
        "q1": q1,
        "q3": q3,
        "min": ordered[0],
        "max": ordered[-1],
        "n": len(ordered),
    }
