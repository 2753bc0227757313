"""The unit protocol: a causal unit owns its whole-image ``forward`` and its step.

A model's trunk is a list of **causal units**. Each unit maps a *main stream* (what
every position computes in order: a tensor, or a tuple of them) and an optional *row
stream* (values that depend only on rows strictly above, as the gated vertical stack's):

* ``forward(x, rows, cond) -> (x, rows)`` on whole images, ``(B, C, H, W)``;
* ``incremental(context, rows) -> UnitStep``: the same unit evaluated a schedule step at
  a time (Ramachandran et al., "Fast Generation for Convolutional Autoregressive
  Models", 2017). ``rows`` is the row plan of the unit before (``None``: no row stream).

A ``UnitStep`` (see its docstring) computes the unit's outputs at the positions of step
t only, from caches of its inputs: tensors there are ``(B, n, C)``, the step's n
positions, channels last. The evaluator folds the steps of the trunk exactly as
``forward`` folds the units; it knows this protocol and a schedule, never a unit class.
Every unit's step is tested against its forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._conditioning import Conditioning
from ._conv import MaskedConv2d
from ._masks import is_anchor
from ._schedules import (
    CacheLayout,
    Plan,
    Positions,
    RowLayout,
    RowReads,
    Schedule,
    cache_layout,
    plan_row_streams,
    row_layout,
)

__all__ = ["CausalUnit", "ConvStep", "NoIncrementalPathError", "StepContext", "UnitStep"]


class NoIncrementalPathError(ValueError):
    """A unit or model has no exact step-by-step path; the message says why."""


@dataclass
class RowStream:
    """Where a row stream's values are computed: its plan (positions per step) and its
    ``(T, H)`` frontier (how many leading columns of each row are done after step t)."""

    plan: Plan
    frontier: Any


class StepContext:
    """What every unit's step is built for: the batch, the schedule, the conditioning,
    and the plans of the trunk's row streams (planned together, from each unit's
    ``row_reads``).

    Args:
        batch: B.
        schedule: the ``Schedule``.
        cond: the checked conditioning, or ``None``.
        units: the trunk, in order (its row streams are planned from it).
    """

    compact_caches = True
    """Whether the convs' caches keep a position only while a later step reads it
    (``CacheLayout``); False keeps whole padded images (what tests compare with)."""

    def __init__(
        self,
        batch: int,
        schedule: Schedule,
        cond: Conditioning | None,
        units: Sequence[nn.Module] = (),
    ) -> None:
        self.batch = batch
        self.schedule = schedule
        self.cond = cond
        reads = [r for unit in units if (r := getattr(unit, "row_reads", lambda: None)())]
        self._streams = [
            RowStream(plan, frontier) for plan, frontier in plan_row_streams(schedule, reads)
        ]

    def next_row_stream(self) -> RowStream:
        """The plan of the next row stream of the trunk, for the unit that computes it."""
        if not self._streams:
            raise NoIncrementalPathError(
                "a unit asked for a row stream that its row_reads() did not declare"
            )
        return self._streams.pop(0)


class UnitStep:
    """A unit evaluated one schedule step at a time. Subclasses override ``step``.

    * ``advance_rows(t, rows)``: once at the start of step t, before any ``step``: takes
      the row stream's values that the unit before computed in this step (at its
      ``rows.plan[t]``) and returns this unit's (``None`` where there are none). The
      default passes the stream on.
    * ``step(x, t)``: the main stream at step t's positions, ``(B, n, C_in)`` ->
      ``(B, n, C_out)`` (or tuples); called once per colour group, with the positions'
      latest values; it stores what later steps read.
    * ``write(x, t)``: the final input at step t's positions, where the caller promises
      that nothing at them depends on what changed since the last ``step`` (only the
      first unit gets it). The default runs ``step``.
    * ``rows``: the ``RowStream`` of the row values it returns (or passes on).
    * ``stateless``: True when ``step`` keeps nothing for later steps (no cache, no row
      values): the evaluator then never reruns it to store final values. False unless a
      subclass says otherwise.
    """

    rows: RowStream | None = None

    @property
    def stateless(self) -> bool:
        return False

    def advance_rows(self, t: int, rows: Any) -> Any:
        return rows

    def step(self, x: Any, t: int) -> Any:
        raise NotImplementedError

    def write(self, x: Any, t: int) -> None:
        self.step(x, t)

    def cache_bytes(self) -> int:
        """Memory held by the caches, in bytes."""
        return 0


class CausalUnit(nn.Module):
    """A unit of a model's trunk; see the module docstring for the protocol.

    A subclass defines ``forward(x, rows, cond) -> (x, rows)`` on whole images and
    ``incremental(context, rows) -> UnitStep``; one that computes a row stream also
    ``row_reads()``, and its step takes its plan from ``context.next_row_stream()``.
    ``cond`` is the checked conditioning or ``None`` (a conditioned unit then adds no
    bias).
    """

    def forward(self, x: Any, rows: Tensor | None = None, cond: Conditioning | None = None) -> Any:
        raise NotImplementedError

    def incremental(self, context: StepContext, rows: RowStream | None) -> UnitStep:
        raise NoIncrementalPathError(f"{type(self).__name__} has no incremental step")

    def row_reads(self) -> RowReads | None:
        """For a unit that computes a row stream: the rows above it reads of its input
        (``d`` in ``r - d``) and how many columns left and right; ``None`` otherwise."""
        return None


def masked_weight(conv: nn.Conv2d) -> Tensor:
    """``conv``'s weight with its masked taps at zero, detached: what a step multiplies by.

    ``where``, not a product: a NaN in a masked-out weight must not reach anything. A
    ``MaskedConv2d`` whose mask was edited in place is refused.
    """
    weight = conv.weight.detach()
    if not isinstance(conv, MaskedConv2d):
        return weight
    conv.check_mask_unchanged()
    return torch.where(conv.mask.bool(), weight, 0.0)


class ConvStep:
    """A ``MaskedConv2d`` (or ``nn.Conv2d``) at a set of positions, from a cache of its input.

    The cache holds the input, channels last, ``(B, rows, C_in)``; each call puts the
    positions' inputs in it and reads, for each position, the taps the mask keeps (one
    gather), then does one matmul ``(B*n, taps*C_in) @ (taps*C_in, C_out)``. On a
    ``Schedule`` its rows follow a ``CacheLayout``: a position keeps its row only until
    the last step that reads it, so a k x k conv holds a few rows of the image in raster
    order and a band around the wavefront, not the image. A conv read a whole row at a
    time (a row stream: ``whole_rows=(written, read)``, the plans of its writes and
    reads) keeps whole padded rows, each only while it is read (``RowLayout``). For a
    group-major schedule, or where the context says so, the cache is the zero-padded
    image, ``Hp*Wp`` rows. A 1x1 conv keeps no cache. The weights are read when the step
    is built.
    A board conv (``"checkerboard"``, ``"group-checkerboard"``) gives an anchor's output a
    second weight, without the taps that read the anchors only; a step of anchors alone
    whose context is then the centre runs as a 1x1 conv.
    (A strided view over the bounding box of the taps, for evenly spaced positions, was
    measured within 10% of the gather either way, and slower for few input channels.)
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        context: StepContext,
        *,
        whole_rows: tuple[Plan, Plan] | None = None,
    ) -> None:
        height, width = context.schedule.height, context.schedule.width
        weight = masked_weight(conv)
        # A board conv (checkerboard, group checkerboard): its gated taps read the anchors
        # only. The cache holds the input as it is; around a non-anchor those taps are
        # anchors already, so only an anchor's output leaves them out (its own weight).
        gated = getattr(conv, "anchor_mask", None) if isinstance(conv, MaskedConv2d) else None
        self.gated = gated is not None
        anchor_weight = weight if gated is None else torch.where(gated.bool(), 0.0, weight)
        if conv.groups != 1:  # a grouped conv as the dense conv it equals
            out_c, per_group = weight.shape[:2]
            dense = weight.new_zeros(out_c, per_group * conv.groups, *weight.shape[2:])
            step = out_c // conv.groups
            for g in range(conv.groups):
                chunk = slice(g * per_group, (g + 1) * per_group)
                dense[g * step : (g + 1) * step, chunk] = weight[g * step : (g + 1) * step]
            weight = anchor_weight = dense  # a board conv has groups == 1
        out_c, in_c, kh, kw = weight.shape
        self.out_channels = out_c
        self.bias = conv.bias.detach() if conv.bias is not None else weight.new_zeros(out_c)
        self.spatial = (kh, kw) != (1, 1)
        # Where an anchor's output reads its own position alone (a checkerboard's centre),
        # its step is a 1x1 conv of the input there: (I, O), or None for no tap at all.
        self.anchor_centre: Tensor | None = None
        self.anchor_pointwise = False
        if self.gated and self.spatial:
            off_centre = anchor_weight.ne(0).any(0).any(0)
            off_centre[kh // 2, kw // 2] = False
            if not bool(off_centre.any()):
                self.anchor_pointwise = True
                centre = anchor_weight[:, :, kh // 2, kw // 2]
                if bool(centre.ne(0).any()):
                    self.anchor_centre = centre.t().contiguous()
        if not self.spatial:
            self.weight = weight[:, :, 0, 0].t().contiguous()  # (I, O)
            self.anchor_weight = anchor_weight[:, :, 0, 0].t().contiguous()
            return
        taps = torch.nonzero(weight.ne(0).any(0).any(0)).tolist()  # kept (i, j), raster
        if not taps:  # the mask keeps nothing: read one (zero-weighted) tap
            taps = [[kh // 2, kw // 2]]
        dh, dw = (int(d) for d in conv.dilation)
        ph, pw = dh * (kh // 2), dw * (kw // 2)
        padded_w = width + 2 * pw
        self.key = (padded_w, ph, pw)
        self.offsets = torch.tensor([i * dh * padded_w + j * dw for i, j in taps])
        # Where each position of the padded image is in the cache: ``table`` (None: the
        # cache is the padded image), one of the two layouts.
        dilated = [(i * dh, j * dw) for i, j in taps]
        self.layout: CacheLayout | None = None
        self.row_layout: RowLayout | None = None
        self.table: Tensor | None = None
        cache_rows = (height + 2 * ph) * padded_w
        if context.compact_caches and isinstance(context.schedule, Schedule):
            if whole_rows is not None:
                self.row_layout = row_layout(*whole_rows, dilated, (ph, pw))
                self.table = self.row_layout.of_padded
                cache_rows = (self.row_layout.rows + 1) * padded_w
            else:
                self.layout = cache_layout(context.schedule, dilated, (ph, pw))
                if self.layout is not None:
                    self.table = self.layout.of_padded
                    cache_rows = self.layout.rows + 1
        # Kept with the schedule or a plan, as the index tensors derived from it are.
        self._layout_id = id(self.layout or self.row_layout) if self.table is not None else None

        # (O, I, T) -> (T*I, O): the order of a (B, n, T, I) patch, flattened.
        def gathered(w: Tensor) -> Tensor:
            kept = torch.stack([w[:, :, i, j] for i, j in taps], dim=2)
            return kept.permute(2, 1, 0).reshape(len(taps) * in_c, out_c).contiguous()

        self.weight = gathered(weight)
        self.anchor_weight = gathered(anchor_weight) if self.gated else self.weight
        self.cache = weight.new_zeros(context.batch, cache_rows, in_c)
        # For a whole row at once (a row stream in raster order): the kernel rows that
        # hold a kept tap, for one convolution over that slab of the cache.
        kept_rows = sorted({i for i, _ in taps})
        self.rows_kept = (kept_rows[0], kept_rows[-1] + 1)
        self.row_weight = weight[:, :, kept_rows[0] : kept_rows[-1] + 1].contiguous()
        self.dilation = (dh, dw)
        self.width = width

    def _put_index(self, at: Positions) -> Tensor:
        padded_w, ph, pw = self.key
        table = self.table

        def put(p: Positions) -> Tensor:
            padded = (p.rows + ph) * padded_w + p.cols + pw
            return padded if table is None else table[padded]

        return at.derived(("put", self.key, self._layout_id), self.cache.device, put)

    def _read_index(self, at: Positions) -> Tensor:
        padded_w, ph, pw = self.key
        offsets, table, layout = self.offsets, self.table, self.layout

        def read(p: Positions) -> Tensor:
            padded = ((p.rows * padded_w + p.cols).unsqueeze(1) + offsets).flatten()
            if table is None:
                return padded
            if layout is None:
                return table[padded]
            # A position not yet written reads the zero row, as it reads zero from a
            # whole padded image (all of a step's positions share its rank).
            step = layout.rank_padded[(p.rows[0] + ph) * padded_w + p.cols[0] + pw]
            return torch.where(layout.rank_padded[padded] > step, layout.rows, table[padded])

        key = ("read", self.key, tuple(offsets.tolist()), self._layout_id)
        return at.derived(key, self.cache.device, read)

    def _whole_row(self, at: Positions) -> Tensor:
        """``(B, W, C_out)`` at a whole row ``at``: one convolution over the cached rows."""
        if self.layout is not None:
            raise NoIncrementalPathError("a whole-row read needs a ConvStep(..., whole_rows=...)")
        padded_w, _, _ = self.key
        batch, _, channels = self.cache.shape
        row = int(at.rows[0])
        first, last = self.rows_kept
        dh, dw = self.dilation
        grid = self.cache.view(batch, -1, padded_w, channels)
        if self.row_layout is None:
            slab = grid[:, row + first * dh : row + (last - 1) * dh + 1].permute(0, 3, 1, 2)
        else:
            places = self.row_layout.of_padded_row[row + first * dh : row + (last - 1) * dh + 1]
            slab = grid.index_select(1, places.to(grid.device)).permute(0, 3, 1, 2)
        # A contiguous copy first: the conv on the strided channels-last view was 1.5x slower.
        slab = slab.contiguous()
        out = torch.nn.functional.conv2d(slab, self.row_weight, self.bias, dilation=(dh, dw))
        return out[:, :, 0].transpose(1, 2)  # (B, W, O)

    def _patches(self, at: Positions) -> Tensor:
        """``(B*n, taps*C_in)``: the kept taps of every position of ``at``."""
        patches = self.cache.index_select(1, self._read_index(at))  # (B, n*T, I)
        return patches.view(-1, self.weight.shape[0])  # n from the shape: it may be symbolic

    def write(self, x: Tensor, at: Positions) -> None:
        """Store the input ``(B, n, C_in)`` at ``at``."""
        if self.spatial:
            self.cache.index_copy_(1, self._put_index(at), x)

    def read(self, at: Positions) -> Tensor:
        """The conv's output ``(B, n, C_out)`` at ``at`` from the cache (a k x k conv with
        no gated taps only: what a row stream reads)."""
        if self.gated:
            raise NoIncrementalPathError("a board conv's output is read at its own step only")
        if len(at) == self.width and _is_row(at):
            return self._whole_row(at)
        out = torch.addmm(self.bias, self._patches(at), self.weight)
        return out.view(self.cache.shape[0], len(at), -1)

    def __call__(self, x: Tensor, at: Positions, *, relu: bool = False) -> Tensor:
        """The conv's output ``(B, n, C_out)`` at ``at``, from the input ``(B, n, C_in)``
        there; ``relu`` applies a ReLU in the same op."""
        self.write(x, at)
        batch, n = x.shape[:2]
        anchors = _anchor_kind(at) if self.gated else "none"
        if anchors == "all" and self.anchor_pointwise:
            # Around an anchor every gated tap reads as zero: only the bias and the centre
            # remain (half a checkerboard model's context work).
            out = self.bias.expand(batch * n, -1)
            if self.anchor_centre is not None:
                out = torch.addmm(out, x.reshape(batch * n, -1), self.anchor_centre)
            out = out.relu() if relu else out.clone()
            return out.view(batch, n, -1)
        if self.spatial:
            flat = self._patches(at)
        else:
            flat = x.view(batch * n, -1) if x.is_contiguous() else x.reshape(batch * n, -1)
        weight = self.anchor_weight if anchors == "all" else self.weight
        if anchors == "some":
            out = torch.addmm(self.bias, flat, weight).view(batch, n, -1)
            at_anchor = torch.addmm(self.bias, flat, self.anchor_weight).view(batch, n, -1)
            where = at.derived("anchors", x.device, lambda p: is_anchor(p.rows, p.cols))
            out = torch.where(where.view(1, n, 1), at_anchor, out)
            return out.relu() if relu else out
        if relu:
            out = torch._addmm_activation(self.bias, flat, weight)
        else:
            out = torch.addmm(self.bias, flat, weight)
        return out.view(batch, n, -1)

    def cache_bytes(self) -> int:
        if not self.spatial:
            return 0
        return int(self.cache.numel() * self.cache.element_size())


def _anchor_kind(at: Positions) -> str:
    """Whether ``"all"``, ``"none"`` or ``"some"`` of ``at`` are checkerboard anchors
    (``row + col`` even); worked out once per step."""
    cpu = torch.device("cpu")
    count = int(at.derived("anchor_count", cpu, lambda p: is_anchor(p.rows, p.cols).sum()))
    return "all" if count == len(at) else "none" if count == 0 else "some"


def _is_row(at: Positions) -> bool:
    """Whether ``at`` is one whole row, columns in order (kept with the positions)."""
    found = at._derived.get("is_row")
    if found is None:
        rows, cols = at.rows, at.cols
        whole = bool((rows == rows[0]).all()) and torch.equal(cols, torch.arange(len(cols)))
        found = at._derived["is_row"] = torch.tensor(whole)
    return bool(found)


class BiasStep:
    """A conditioning bias ``(B, C, 1 | H, 1 | W)`` read at a step's positions:
    ``(B, n | 1, C)``."""

    def __init__(self, bias: Tensor) -> None:
        batch, channels, height, width = bias.shape
        self.spatial = height * width > 1
        self.bias = bias.detach().permute(0, 2, 3, 1).reshape(batch, height * width, channels)

    def __call__(self, at: Positions) -> Tensor:
        if not self.spatial:
            return self.bias
        return self.bias.index_select(1, at.derived("flat", self.bias.device, lambda p: p.flat))
