"""Schedules: the order in which an autoregressive model's positions can be computed.

A schedule is a sequence of *steps*, each a set of ``(row, col)`` positions that are
computed together; a position may depend only on positions of earlier steps (and, at
itself, on earlier colour groups). Three are built in:

* **raster**: one position a step, top to bottom, left to right: H*W steps;
* **checkerboard**: the anchors (``r + c`` even) in step 0, the rest in step 1: the order
  of a model built with ``order="checkerboard"`` (He et al., CVPR 2021);
* **group checkerboard**: the colour groups one after another, each in the checkerboard's
  two steps (2G steps): the order of a model built with ``order="group-checkerboard"``
  (ELIC's space-channel context, He et al., CVPR 2022). A *group-major* schedule: each
  step decodes one group (``schedule.group(t)``), where the others decode every group of
  a step's positions in turn;
* **wavefront**: every position on the line ``col + slope * row = t`` in step t. For a
  stack of masked kxk convs (h = k // 2) an output at (r, c) depends on inputs at
  (r - d, c + e) only with e <= h*d, so ``slope = h + 1`` is exact: the design blog's
  7x7 PixelCNN on 28x28 takes 28 + 4*27 = 136 steps instead of 784. A gated stack's
  vertical stack reaches further right (``slope = L*h + 1`` for L layers).

The wavefront's slope is measured from the model (``model_slope``), never written per
class. Picture of a 4x6 image at slope 2, the step of each position::

    0 1 2 3 4 5
    2 3 4 5 6 7
    4 5 6 7 8 9
    6 7 8 9 10 11

This module depends on nothing but torch; ``assert_causal(..., schedule=...)`` proves
that a schedule is exact for a model.
"""

from __future__ import annotations

import copy
import functools
import heapq
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from ._checks import image_size as check_image_size
from ._checks import positive_int

__all__ = [
    "Positions",
    "Schedule",
    "checkerboard",
    "group_checkerboard",
    "model_slope",
    "raster",
    "wavefront",
]

_T = TypeVar("_T")

SCHEDULES = ("auto", "raster", "wavefront", "checkerboard", "group-checkerboard")
BOARD_ORDERS = ("checkerboard", "group-checkerboard")
"""Model orders decoded on the checkerboard: no wavefront or raster order is exact."""


class Positions:
    """The positions of one step: ``rows`` and ``cols``, ``(n,)`` int64 tensors.

    ``flat`` is ``row * W + col``. Index tensors derived from it (where a conv's cache
    puts or reads these positions) are made once per key and device, and kept.
    """

    def __init__(self, rows: Tensor, cols: Tensor, width: int) -> None:
        self.rows = rows
        self.cols = cols
        self.flat = rows * width + cols
        self._derived: dict[Any, Tensor] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def tolist(self) -> list[tuple[int, int]]:
        """The positions as ``(row, col)`` pairs."""
        return list(zip(self.rows.tolist(), self.cols.tolist(), strict=True))

    def derived(self, key: Any, device: torch.device, make: Any) -> Tensor:
        """``make(self)`` on ``device``, computed once per ``key``."""
        full = (key, device)
        found = self._derived.get(full)
        if found is None:
            # Kept and shared: a normal tensor even when first made under inference mode.
            with torch.inference_mode(False):
                found = self._derived[full] = make(self).to(device)
        return found


class Plan:
    """When each position of an ``H x W`` grid is computed: ``when[r, c]`` is a step in
    ``[0, steps]`` (``steps``: never). Iterating gives each step's ``Positions``."""

    def __init__(self, when: Tensor, steps: int) -> None:
        # Normal tensors even when built under inference mode (a sampler's): a schedule is
        # kept and shared, and its positions may feed torch.export or autograd later.
        with torch.inference_mode(False):
            self.when = when.clone().long()
            self.height, self.width = (int(n) for n in when.shape)
            self.steps = steps
            flat_when = self.when.flatten()
            order = torch.argsort(flat_when, stable=True)  # positions by step, raster within
            counts = torch.bincount(flat_when, minlength=steps + 1)[:steps].tolist()
            cells = order[: sum(counts)]
            self._positions = [
                Positions(part // self.width, part % self.width, self.width)
                for part in torch.split(cells, counts)
            ]

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> Positions:
        return self._positions[step]


class Schedule(Plan):
    """An exact order of evaluation: steps of positions; see the module docstring.

    ``len(schedule)`` is the number of sequential steps; iterating gives each step's
    list of ``(row, col)``; ``schedule[t]`` its ``Positions``; ``rank`` the ``(H, W)``
    step of every position.

    A *group-major* schedule (``group_checkerboard``) runs these steps once per colour
    group: ``group_passes`` G > 1, ``len(schedule)`` is G times the steps above, step t
    visits the positions of step ``t % steps`` and decodes group ``schedule.group(t)``
    only; ``group_rank`` is the ``(G, H, W)`` step of each group of each position.

    Args:
        steps: each step's ``(row, col)`` positions; every position of the image exactly
            once, no step empty.
        image_size: ``(H, W)``.
        name: what the schedule is, for messages.

    Raises:
        ValueError: for a position outside the image, twice or never, or an empty step.
    """

    def __init__(
        self,
        steps: Sequence[Sequence[tuple[int, int]]],
        image_size: tuple[int, int],
        name: str = "custom",
    ) -> None:
        height, width = check_image_size(image_size)
        rank = torch.full((height, width), -1, dtype=torch.long)
        for t, step in enumerate(steps):
            if not len(step):
                raise ValueError(f"schedule step {t} is empty: every step needs a position")
            for position in step:
                r, c = (int(v) for v in position)
                if not (0 <= r < height and 0 <= c < width):
                    raise ValueError(
                        f"schedule step {t} has position {(r, c)} outside the "
                        f"{height}x{width} image"
                    )
                if rank[r, c] >= 0:
                    raise ValueError(
                        f"schedule has position {(r, c)} twice (steps {int(rank[r, c])} and {t})"
                    )
                rank[r, c] = t
        missing = torch.nonzero(rank < 0)
        if len(missing):
            r, c = missing[0].tolist()
            raise ValueError(f"schedule never visits position {(r, c)} ({len(missing)} missing)")
        self.name = name
        super().__init__(rank, len(steps))

    @classmethod
    def _from_rank(cls, rank: Tensor, steps: int, name: str) -> Schedule:
        schedule = cls.__new__(cls)
        schedule.name = name
        Plan.__init__(schedule, rank, steps)
        return schedule

    group_passes = 1
    """G for a group-major schedule (each step decodes one colour group), else 1."""

    @property
    def rank(self) -> Tensor:
        """``(H, W)`` int64: the step of each position (in the first group's pass)."""
        return self.when

    @property
    def group_rank(self) -> Tensor:
        """``(G, H, W)`` int64 for a group-major schedule: the step that decodes group g
        of each position; ``(1, H, W)`` (every group at ``rank``) otherwise."""
        passes = torch.arange(self.group_passes).view(-1, 1, 1)
        return passes * self.steps + self.when.unsqueeze(0)

    def group(self, step: int) -> int | None:
        """The colour group decoded at ``step`` of a group-major schedule; ``None``:
        every group, in order."""
        if self.group_passes == 1:
            return None
        return self._index(step) // self.steps

    def _index(self, step: int) -> int:
        total = len(self)
        if not -total <= step < total:
            raise IndexError(f"step {step} is outside the {total} steps of {self!r}")
        return step % total

    def __len__(self) -> int:
        return self.steps * self.group_passes

    def __getitem__(self, step: int) -> Positions:
        return self._positions[self._index(step) % self.steps]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(len(self)):
            yield self[step].tolist()

    def by_group(self, color_groups: int, name: str | None = None) -> Schedule:
        """This schedule run once per colour group, group-major: ``color_groups`` times
        its steps, each decoding one group."""
        groups = positive_int("color_groups", color_groups)
        schedule = copy.copy(self)
        schedule.__dict__.pop("_row_plans", None)
        schedule.__dict__.pop("_cache_layouts", None)
        schedule.__dict__.pop("image_frontier", None)
        schedule.group_passes = groups
        schedule.name = name or f"{self.name} by group, {groups} groups"
        return schedule

    @functools.cached_property
    def image_frontier(self) -> Tensor:
        """``(T, H)``: per step t, how many leading columns of each row are final before t."""
        done_by = torch.cummax(self.rank, dim=1).values  # a column is final with all left of it
        steps = torch.arange(self.steps).view(-1, 1, 1)
        return (done_by.unsqueeze(0) < steps).sum(2)

    def __repr__(self) -> str:
        return f"Schedule({self.name}, {self.height}x{self.width}, {len(self)} steps)"


@functools.lru_cache(maxsize=64)
def _wavefront(height: int, width: int, slope: int) -> Schedule:
    rows = torch.arange(height).view(-1, 1)
    cols = torch.arange(width).view(1, -1)
    line = cols + slope * rows  # (H, W)
    # Lines with no position (slope > W) are dropped: the steps are numbered densely.
    used = torch.unique(line)
    rank = torch.searchsorted(used, line)
    name = "raster" if slope >= width else f"wavefront, slope {slope}"
    return Schedule._from_rank(rank, len(used), name)


def raster(image_size: tuple[int, int]) -> Schedule:
    """Raster order: one position a step, rows top to bottom, columns left to right."""
    height, width = check_image_size(image_size)
    return _wavefront(height, width, width)


@functools.lru_cache(maxsize=64)
def _checkerboard(height: int, width: int) -> Schedule:
    rows = torch.arange(height).view(-1, 1)
    cols = torch.arange(width).view(1, -1)
    rank = (rows + cols) % 2
    return Schedule._from_rank(rank, int(rank.max()) + 1, "checkerboard")


def checkerboard(image_size: tuple[int, int]) -> Schedule:
    """The checkerboard schedule: the anchors (``row + col`` even) in step 0, the others
    in step 1 (one step for a 1x1 image).

    Exact for a model built with ``order="checkerboard"``, whose anchors see no other
    pixel and whose non-anchors see anchors only (prove it with
    ``assert_causal(model, shape, schedule=checkerboard((H, W)))``); not for a raster
    model, whose pixels see their left neighbours of the same step. Picture of a 4x6
    image, the step of each position::

        0 1 0 1 0 1
        1 0 1 0 1 0
        0 1 0 1 0 1
        1 0 1 0 1 0
    """
    height, width = check_image_size(image_size)
    return _checkerboard(height, width)


def group_checkerboard(image_size: tuple[int, int], color_groups: Any) -> Schedule:
    """The group-checkerboard schedule (ELIC, He et al., CVPR 2022): colour group 0's
    anchors, then its non-anchors, then group 1's, ...: 2G steps, each decoding one group.

    Exact for a model built with ``order="group-checkerboard"``, whose group g sees the
    groups before it everywhere and, of its own group, the anchors from the non-anchors
    (prove it with ``assert_causal(model, shape, schedule=group_checkerboard((H, W), G))``).

    Args:
        image_size: ``(H, W)``.
        color_groups: the model's ``color_groups`` (a count G or uneven sizes).
    """
    from ._masks import group_sizes

    height, width = check_image_size(image_size)
    groups = len(group_sizes(color_groups))
    board = _checkerboard(height, width)
    return board.by_group(groups, f"group checkerboard, {groups} groups")


def model_order(model: Any) -> str:
    """The order a model is built for: ``model.order``, else ``"raster"``."""
    order = getattr(model, "order", None)
    return order if isinstance(order, str) else "raster"


def wavefront(model: Any, image_size: tuple[int, int], slope: int | None = None) -> Schedule:
    """The wavefront schedule: step t computes every position with ``col + slope*row = t``.

    Exact for ``model`` when an output at (r, c) depends on inputs at (r - d, c + e) only
    with ``e < slope * d`` (and at d = 0 only on columns left of c and earlier colour
    groups of c). ``len()`` of the schedule is ``W + slope * (H - 1)`` for ``slope <= W``
    (``slope >= W`` is raster order).

    Args:
        model: the model; its slope is measured when ``slope`` is not given
            (``model_slope``).
        image_size: ``(H, W)``.
        slope: taken as is when given (prove it with
            ``assert_causal(model, shape, schedule=...)``).

    Returns:
        The ``Schedule``.

    Raises:
        ValueError: for a bad size or slope, or a model for which no wavefront is exact.

    Example:
        >>> len(wavefront(PixelCNN(1, 2), (28, 28)))  # 7x7 kernels: slope 4
        136
    """
    height, width = check_image_size(image_size)
    if slope is None:
        slope = model_slope(model)
    slope = positive_int("slope", slope)
    return _wavefront(height, width, min(slope, width))


_SLOPES: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


def model_slope(model: Any) -> int:
    """The smallest exact wavefront slope of ``model``, measured once and remembered.

    The model's trunk (``model.trunk``, fed the stem's features) is copied into float64
    with random weights, and the gradient of one output pixel near the bottom of a
    ``(R + 2) x (2R + 1)`` image (R: the summed reach of every conv) shows each input
    (r - d, c + e) it depends on; the slope is the least s with ``e < s * d`` for all.
    Random weights make it a property of the architecture, not of trained values (a dead
    unit cannot hide a path); three trials are united.

    Raises:
        ValueError: if an output depends on its own row's right side or on a row below
            (no wavefront is exact), or the model has no ``trunk`` and ``stem``.
    """
    if isinstance(model, nn.Module) and model in _SLOPES:
        return _SLOPES[model]
    order = model_order(model)
    if order in BOARD_ORDERS:
        use = (
            "checkerboard((H, W)) (2 steps)"
            if order == "checkerboard"
            else "group_checkerboard((H, W), G) (2G steps)"
        )
        raise ValueError(
            f"no wavefront is exact for a {type(model).__name__} built with "
            f"order={order!r}: use {use}"
        )
    trunk, stem = getattr(model, "trunk", None), getattr(model, "stem", None)
    if trunk is None or stem is None or not hasattr(stem, "out_channels"):
        raise ValueError(
            f"cannot measure a wavefront slope for {type(model).__name__}: it has no trunk of "
            f"causal units; give slope= (and prove it with assert_causal(schedule=...))"
        )
    with torch.inference_mode(False), torch.enable_grad():
        slope = _measure_slope(model, trunk, stem)
    if isinstance(model, nn.Module):
        _SLOPES[model] = slope
    return slope


def _measure_slope(model: Any, trunk: Any, stem: Any) -> int:
    units = nn.ModuleList(copy.deepcopy(list(trunk))).to(torch.float64)
    reach = sum(
        max(m.dilation[0] * (m.kernel_size[0] // 2), m.dilation[1] * (m.kernel_size[1] // 2))
        for m in units.modules()
        if isinstance(m, nn.Conv2d)
    )
    height, width = reach + 2, 2 * reach + 1
    # Two outputs side by side: a layer may treat the two colours of a checkerboard apart.
    row, cols = reach, (reach, reach + 1)
    generator = torch.Generator().manual_seed(0)
    seen = torch.zeros(len(cols), height, width + 1, dtype=torch.bool)
    features = stem.out_channels(model.in_channels)
    for _ in range(3):
        with torch.no_grad():
            for p in units.parameters():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
        x = torch.randn(1, features, height, width + 1, generator=generator, dtype=torch.float64)
        x.requires_grad_(True)
        out, rows = x, None
        for unit in units:
            out, rows = unit(out, rows, None)
        if isinstance(out, tuple):  # a main stream of several tensors (h, skip)
            out = torch.cat(out, dim=1)
        pick = torch.randn(out.shape[1], generator=generator, dtype=torch.float64)
        for index, col in enumerate(cols):
            (grad,) = torch.autograd.grad((out[0, :, row, col] * pick).sum(), x, retain_graph=True)
            seen[index] |= grad[0].ne(0).any(0)
    slope = 1
    for index, r, c in torch.nonzero(seen).tolist():
        d, e = row - r, c - cols[index]
        if d < 0 or (d == 0 and e > 0):
            raise ValueError(
                f"no wavefront or raster order is exact for {type(model).__name__}: an output "
                f"depends on the input {abs(d) if d else abs(e)} "
                f"{'rows below' if d < 0 else 'columns to its right'}"
            )
        if d > 0:
            slope = max(slope, e // d + 1)
    return slope


def resolve_schedule(schedule: object, model: Any, size: tuple[int, int]) -> Schedule:
    """A ``Schedule`` from ``"auto"``, ``"raster"``, ``"wavefront"``, ``"checkerboard"``,
    ``"group-checkerboard"`` or a ``Schedule``. ``"auto"`` is the model's own order
    (``model.order``): the (group) checkerboard, or for raster models the wavefront where
    it at least halves the steps."""
    if isinstance(schedule, Schedule):
        if (schedule.height, schedule.width) != tuple(size):
            raise ValueError(
                f"schedule is for a {schedule.height}x{schedule.width} image, but the image is "
                f"{size[0]}x{size[1]}"
            )
        return schedule
    order = model_order(model)
    if schedule == "auto" and order in BOARD_ORDERS:
        schedule = order
    if schedule in BOARD_ORDERS:
        if order != schedule:
            raise ValueError(
                f"schedule={schedule!r} is exact only for a model built with "
                f"order={schedule!r}; {type(model).__name__} has order={order!r}: use "
                f"schedule='auto'"
            )
        if schedule == "checkerboard":
            return checkerboard(size)
        return group_checkerboard(size, getattr(model, "color_groups", 1))
    if order in BOARD_ORDERS and schedule in ("raster", "wavefront"):
        raise ValueError(
            f"schedule={schedule!r} is not exact for a model built with order={order!r} "
            f"(a non-anchor sees the anchor to its right): use schedule='auto'"
        )
    if schedule == "raster":
        return raster(size)
    if schedule == "wavefront":
        return wavefront(model, size)
    if schedule == "auto":
        # The fastest exact order: the wavefront where it at least halves the steps.
        # Where it saves less (a deep gated stack: 703 of 784 steps on 28x28), raster
        # order is faster, as its steps compute whole rows of the vertical stack at once.
        front = wavefront(model, size)
        return front if 2 * len(front) <= size[0] * size[1] else raster(size)
    raise ValueError(f"schedule must be one of {SCHEDULES} or a Schedule, but got {schedule!r}")


RowReads = tuple[tuple[int, ...], int, int]
"""What a row stream reads of its input: the rows above (``d`` in ``r - d``), and how many
columns left and right of its own."""


def plan_row_streams(schedule: Schedule, reads: Sequence[RowReads]) -> list[tuple[Plan, Any]]:
    """When each value of a chain of row streams is computed, for ``schedule``.

    The first stream reads the image, each later one the stream before it (``reads``
    gives each one's window); every stream's value at a position is also read by the main
    stream at that position's step, and the last stream's by nothing else. A value is
    computed at the first step at which something of its row is due (needed now by the
    main stream or, through the chain, by a later stream), together with every value of
    that row that is ready then: whole rows at a time in raster order, a column or two a
    step on a wavefront. Kept with the schedule.

    Returns:
        Per stream, its ``Plan`` and its ``(T, H)`` frontier (columns done per row).

    Raises:
        ValueError: if a value would be needed before it can be computed (the schedule is
            too steep for the streams).
    """
    if not reads:
        return []
    if schedule.group_passes > 1:
        raise ValueError(
            f"{schedule!r} decodes one colour group a step, which a row stream (a gated "
            f"vertical stack) cannot follow: use a raster or wavefront schedule"
        )
    key = tuple(reads)
    kept: dict[Any, list[tuple[Plan, Any]]] = schedule.__dict__.setdefault("_row_plans", {})
    if key in kept:
        return kept[key]
    import numpy as np

    height, width, steps = schedule.height, schedule.width, schedule.steps
    rank = schedule.rank.numpy()
    big = steps + 1
    # Deadlines, last stream first: the main stream reads each stream at its own
    # position; a stream's value is also due when the next stream's reading it is.
    deadlines: list[Any] = [None] * len(reads)
    later: Any = None
    for index in range(len(reads) - 1, -1, -1):
        due = rank.copy()
        if later is not None:
            rows_read, left, right = reads[index + 1]
            m = max(left, right)
            padded = np.full((height + max(rows_read, default=0), width + 2 * m), big)
            padded[:height, m : m + width] = later
            for d in rows_read:
                for e in range(-left, right + 1):
                    # Read by the next stream's output at (r + d, c - e).
                    due = np.minimum(due, padded[d : d + height, m - e : m - e + width])
        deadlines[index] = later = due
    source = schedule.image_frontier.numpy()  # (T, H): final before step t
    results = []
    for index, (rows_read, _, right) in enumerate(reads):
        done = np.zeros(height, dtype=np.int64)
        frontier = np.zeros((steps, height), dtype=np.int64)
        # The earliest deadline from each column on (deadlines need not grow along a row).
        due = deadlines[index]
        due_from = np.minimum.accumulate(due[:, ::-1], axis=1)[:, ::-1]
        cols = np.arange(height)
        for t in range(steps):
            ready_in = np.where(source[t] >= width, width, np.maximum(source[t] - right, 0))
            ready = np.full(height, width)
            for d in rows_read:
                if d < height:
                    ready[d:] = np.minimum(ready[d:], ready_in[: height - d])
            first_due = due_from[cols, np.minimum(done, width - 1)]
            now = (first_due <= t) & (done < width)
            done = np.where(now, np.maximum(done, ready), done)
            frontier[t] = done
        when = (frontier.T[:, :, None] <= np.arange(width)[None, None, :]).sum(1)  # (H, W)
        late = when > due
        if late.any():
            r, c = (int(v) for v in np.argwhere(late)[0])
            raise ValueError(
                f"{schedule!r} is too steep for this model's row stream {index} (a gated "
                f"vertical stack): its value at {(r, c)} is ready at step {int(when[r, c])}, "
                f"after step {int(due[r, c])}, when it is needed; use wavefront(model, size) "
                f"(the slope measured from the model)"
            )
        results.append((Plan(torch.from_numpy(when), steps), frontier))
        source = frontier
    kept[key] = results
    return results


def _kept_with(owner: Any, slot: str, key: Any, make: Callable[[], _T]) -> _T:
    """``make()``, made once per ``key`` and kept in ``owner``'s ``slot`` (a schedule or a
    plan, which lives as long as everything derived from it)."""
    kept: dict[Any, _T] = owner.__dict__.setdefault(slot, {})
    if key not in kept:
        with torch.inference_mode(False):
            kept[key] = make()
    return kept[key]


def _last_reads(
    written_at: Tensor, read_at: Tensor, taps: Sequence[tuple[int, int]], pad: tuple[int, int]
) -> Tensor:
    """``(H, W)``: the later of each position's step in ``written_at`` and the last step
    in ``read_at`` (``-1``: never) of a position that reads it through a tap (``(i, j)``
    into the padded kernel: the reader of p is at ``p - (i, j) + pad``)."""
    height, width = written_at.shape
    ph, pw = pad
    readers = torch.full((height + 2 * ph, width + 2 * pw), -1, dtype=torch.long)
    readers[ph : ph + height, pw : pw + width] = read_at
    last = written_at.clone()
    for i, j in taps:
        shifted = readers[2 * ph - i : 2 * ph - i + height, 2 * pw - j : 2 * pw - j + width]
        last = torch.maximum(last, shifted)
    return last


def colour_intervals(starts: Tensor, ends: Tensor, never: int) -> tuple[Tensor, int]:
    """A place for each interval ``[start, end]`` of steps, different for any two alive
    at one step: in order of start, each takes a place given back by an interval that
    ended before it starts, else a new one. That is the fewest places any assignment can
    have: the most intervals alive at one step. An interval that starts at ``never`` or
    later gets no place (``-1``).

    Returns:
        The places, shaped as ``starts``, and how many there are.
    """
    first, last = starts.flatten().tolist(), ends.flatten().tolist()
    place = [-1] * len(first)
    alive: list[tuple[int, int]] = []  # (last step, place), a heap
    free: list[int] = []
    count = 0
    for i in sorted(range(len(first)), key=lambda i: (first[i], i)):
        if first[i] >= never:
            continue
        while alive and alive[0][0] < first[i]:
            free.append(heapq.heappop(alive)[1])
        if free:
            place[i] = free.pop()
        else:
            place[i], count = count, count + 1
        heapq.heappush(alive, (max(last[i], first[i]), place[i]))
    return torch.tensor(place, dtype=torch.long).view(starts.shape), count


class CacheLayout:
    """Where a cache of an ``H x W`` input keeps each position, for one schedule and one
    set of taps: a row is reused once the last step that reads its position is done.

    A conv's step at step t reads its input at ``p + tap`` for each of its positions p;
    a position written at step ``rank[p]`` is then needed until the last step that reads
    it. Rows are handed out in step order (``colour_intervals``: the fewest rows any
    layout can have, the most positions alive at one step). Row ``rows`` is the zero
    row: the padding around the image, and positions that a step reads before they are
    written (a board conv's anchors read their non-anchor taps with zero weights), read
    from it, as they read zeros from a whole padded image.

    Attributes:
        rows: the number of rows for positions (the cache has ``rows + 1``).
        of_padded: ``((H + 2ph) * (W + 2pw),)`` int64: the row of each position of the
            padded image (row-major); ``rows`` for the padding.
        rank_padded: the same shape: each position's step; ``-1`` for the padding.
    """

    def __init__(self, schedule: Schedule, taps: Sequence[tuple[int, int]], pad: tuple[int, int]):
        height, width = schedule.height, schedule.width
        ph, pw = pad
        rank = schedule.rank
        last = _last_reads(rank, rank, taps, pad)
        row_of, self.rows = colour_intervals(rank, last, len(schedule))
        rank_padded = torch.full((height + 2 * ph, width + 2 * pw), -1, dtype=torch.long)
        rank_padded[ph : ph + height, pw : pw + width] = rank
        of_padded = torch.full_like(rank_padded, self.rows)
        of_padded[ph : ph + height, pw : pw + width] = row_of
        self.of_padded = of_padded.flatten()
        self.rank_padded = rank_padded.flatten()


class RowLayout:
    """Where a cache that is read a whole row at a time keeps each row of its padded
    input: a row gets a place when its first value is written (at a step of ``written``)
    and gives it back after the last step of ``read`` that reads it through ``taps``
    (``(i, j)`` into the padded kernel, dilation applied). Rows above and below the image,
    and rows never written, read the zero row, number ``rows``. Made by ``row_layout``.

    Attributes:
        rows: the places for rows (the cache has ``rows + 1`` padded rows).
        of_padded_row: ``(H + 2ph,)`` int64: the place of each padded row.
        of_padded: ``((H + 2ph) * (W + 2pw),)`` int64: where each position of the padded
            image is in the cache, ``(B, (rows + 1) * (W + 2pw), C)``.
    """

    def __init__(
        self, written: Plan, read: Plan, taps: Sequence[tuple[int, int]], pad: tuple[int, int]
    ) -> None:
        height, width = written.height, written.width
        ph, pw = pad
        never = max(len(written), len(read)) + 1
        written_at = torch.where(written.when >= len(written), never, written.when)
        read_at = torch.where(read.when >= len(read), -1, read.when)
        last = _last_reads(written_at, read_at, taps, pad)
        place, self.rows = colour_intervals(written_at.amin(1), last.amax(1), never)
        self.of_padded_row = torch.full((height + 2 * ph,), self.rows, dtype=torch.long)
        self.of_padded_row[ph : ph + height] = torch.where(place < 0, self.rows, place)
        padded_w = width + 2 * pw
        columns = torch.arange(padded_w)
        self.of_padded = (self.of_padded_row.unsqueeze(1) * padded_w + columns).flatten()


def row_layout(
    written: Plan, read: Plan, taps: Sequence[tuple[int, int]], pad: tuple[int, int]
) -> RowLayout:
    """The ``RowLayout`` of a conv that reads ``written``'s values at ``read``'s steps,
    made once and kept with ``read``."""
    key = (id(written), tuple(tuple(tap) for tap in taps), tuple(pad))
    return _kept_with(read, "_row_layouts", key, lambda: RowLayout(written, read, taps, pad))


def link_rows(schedule: Schedule, plan: Plan) -> tuple[Tensor, int]:
    """For values that ``plan`` computes and that the main stream reads once, at each
    position's own step of ``schedule`` (a gated layer's links into its horizontal
    stack): ``colour_intervals``'s ``(H*W,)`` place of each, and how many; kept with the
    plan. (The plan computes every value by its step, or ``plan_row_streams`` refuses.)"""

    def make() -> tuple[Tensor, int]:
        place, count = colour_intervals(plan.when, schedule.rank, len(plan))
        return place.flatten(), count

    return _kept_with(plan, "_link_rows", None, make)


def cache_layout(
    schedule: Schedule, taps: Sequence[tuple[int, int]], pad: tuple[int, int]
) -> CacheLayout | None:
    """The ``CacheLayout`` of a conv with these taps (``(i, j)`` offsets into the padded
    kernel, dilation applied) and padding on ``schedule``, made once and kept with it;
    ``None`` for a group-major schedule, which reads every position in every pass (the
    cache is then the whole padded image)."""
    if schedule.group_passes > 1:
        return None
    key = (tuple(tuple(tap) for tap in taps), tuple(pad))
    return _kept_with(schedule, "_cache_layouts", key, lambda: CacheLayout(schedule, taps, pad))
