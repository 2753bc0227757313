"""The incremental caches keep a position only while a later step reads it.

A conv's cache hands out its rows in step order and takes one back after the last step
that reads its position (``CacheLayout``). Proven three ways: the rows are the most
positions alive at one step, counted here by brute force; a decode whose cache rows start
as NaN (every row but the zero row) still equals the forward, so no step reads a row
that it or an earlier step did not write; and the parameters are bit for bit those of
whole padded images.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pixelcnn_models import perturb_

from maskedconv import (
    ConvStep,
    GatedPixelCNN,
    IncrementalEvaluator,
    PixelCNN,
    StepContext,
    checkerboard,
    raster,
    wavefront,
)
from maskedconv._schedules import CacheLayout


def alive_at_most(rank: torch.Tensor, taps: list[tuple[int, int]], pad: tuple[int, int]) -> int:
    """The most positions alive at one step, by brute force: p is alive at step t from its
    own step until the last step of a position that reads it (one at ``p - tap + pad``)."""
    height, width = rank.shape
    last = {}
    for r in range(height):
        for c in range(width):
            end = int(rank[r, c])
            for i, j in taps:
                qr, qc = r - i + pad[0], c - j + pad[1]
                if 0 <= qr < height and 0 <= qc < width:
                    end = max(end, int(rank[qr, qc]))
            last[r, c] = end
    steps = int(rank.max()) + 1
    return max(
        sum(1 for (r, c), end in last.items() if int(rank[r, c]) <= t <= end) for t in range(steps)
    )


def kept_taps(kernel: int, dilation: int = 1, centre: bool = True) -> list[tuple[int, int]]:
    """A type B (``centre``) or type A mask's taps, ``(i, j)`` into the padded kernel."""
    h = kernel // 2
    taps = [(i, j) for i in range(kernel) for j in range(kernel) if i < h or (i == h and j < h)]
    if centre:
        taps.append((h, h))
    return [(i * dilation, j * dilation) for i, j in taps]


@pytest.mark.parametrize(
    ("size", "kernel", "dilation", "order"),
    [
        ((28, 28), 7, 1, "wavefront"),
        ((28, 28), 7, 1, "raster"),
        ((9, 13), 3, 2, "wavefront"),
        ((9, 13), 5, 1, "raster"),
        ((6, 7), 3, 1, "checkerboard"),
    ],
)
def test_rows_are_the_most_positions_alive_at_one_step(
    size: tuple[int, int], kernel: int, dilation: int, order: str
) -> None:
    slope = (kernel // 2) * dilation + 1
    schedule = {
        "wavefront": wavefront(None, size, slope=slope),
        "raster": raster(size),
        "checkerboard": checkerboard(size),
    }[order]
    pad = ((kernel // 2) * dilation,) * 2
    for centre in (True, False):
        taps = kept_taps(kernel, dilation, centre)
        layout = CacheLayout(schedule, taps, pad)
        assert layout.rows == alive_at_most(schedule.rank, taps, pad)
        # Every position has its own row among those alive with it; the padding reads
        # the zero row.
        inside = layout.rank_padded >= 0
        assert int(layout.of_padded[inside].max()) < layout.rows
        assert bool((layout.of_padded[~inside] == layout.rows).all())
    if order == "raster":
        # A k x k conv in raster order reads back h rows and h + 1 positions.
        h = kernel // 2
        assert layout.rows == h * size[1] + h + 1


def test_the_blog_models_caches_hold_a_band_not_the_image() -> None:
    model = PixelCNN(1, 2)  # blog binary: 5 7x7 convs, the type-A one on 1 channel
    whole = 16 * 34 * 34 * (1 + 4 * 64) * 4  # a zero-padded image per 7x7 conv: 19 MB
    # The wavefront: about 7 positions a step, each read for 16 steps. Raster order: 3
    # rows and 4 positions. Each cache has one more row, the zero row.
    for schedule, rows, less in (("wavefront", 112, 10), ("raster", 3 * 28 + 4, 12)):
        ev = IncrementalEvaluator(model, 16, (28, 28), schedule=schedule)
        assert ev.cache_bytes() == 16 * (rows + 1) * (1 + 4 * 64) * 4
        assert ev.cache_bytes() < whole / less


def conv_steps(ev: IncrementalEvaluator) -> list[ConvStep]:
    found = []
    for step in ev._steps:
        found += [c for c in vars(step).values() if isinstance(c, ConvStep) and c.spatial]
    return found


def small_models() -> list[tuple[str, Any, str]]:
    torch.manual_seed(0)
    kwargs: dict[str, Any] = {"hidden_channels": 8, "num_layers": 3}
    models = [
        ("plain", PixelCNN(1, 3, kernel_size=5, **kwargs), "wavefront"),
        ("plain", PixelCNN(1, 3, kernel_size=5, **kwargs), "raster"),
        (
            "colour",
            PixelCNN(3, 4, kernel_size=3, color_groups=3, hidden_channels=9, num_layers=3),
            "wavefront",
        ),
        ("board", PixelCNN(1, 3, order="checkerboard", **kwargs), "auto"),
        ("gated", GatedPixelCNN(1, 3, hidden_channels=8, num_layers=2), "raster"),
        ("gated", GatedPixelCNN(1, 3, hidden_channels=8, num_layers=2), "wavefront"),
    ]
    return [(name, perturb_(m, 0.3).double().eval(), s) for name, m, s in models]


def poison(ev: IncrementalEvaluator) -> None:
    """NaN in every row of every compact cache but the zero row (and but the padding of a
    cache kept by whole rows), and in the gated layers' links."""
    poisoned = 0
    for conv in conv_steps(ev):
        if conv.layout is not None:
            conv.cache[:, : conv.layout.rows] = float("nan")
        elif conv.row_layout is not None:  # whole rows: their padding stays zero
            padded_w, _, pw = conv.key
            grid = conv.cache.view(ev.batch_size, -1, padded_w, conv.cache.shape[-1])
            grid[:, : conv.row_layout.rows, pw : pw + ev.width] = float("nan")
        else:
            continue
        poisoned += 1
    for step in ev._steps:
        if hasattr(step, "linked"):  # a gated layer's links into its horizontal stack
            step.linked.fill_(float("nan"))
    assert poisoned


class Poisoned(IncrementalEvaluator):
    """Poisoned before its first step (the row streams' first values come then)."""

    def _next_step(self) -> None:
        if self.step == 0:
            poison(self)
        super()._next_step()


def decode(model: Any, x: torch.Tensor, schedule: Any, poison: bool) -> list[torch.Tensor]:
    """Every step's parameters of a decoder's loop over ``x``; ``poison``: with NaN in
    every cache row that nothing wrote yet (``Poisoned``)."""
    batch, _, height, width = x.shape
    got = []
    with torch.no_grad():
        kind = Poisoned if poison else IncrementalEvaluator
        ev = kind(model, batch, (height, width), schedule=schedule)
        while not ev.done:
            values = x[..., ev.rows, ev.cols]
            for _ in ev.groups:
                got.append(ev.params(values))
            ev.advance(values)
    return got


@pytest.mark.parametrize(("name", "model", "schedule"), small_models())
def test_no_step_reads_a_row_not_written_for_it(name: str, model: Any, schedule: str) -> None:
    x = torch.randint(
        0, 3, (2, model.in_channels, 6, 7), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        full = model(x)
    ev = IncrementalEvaluator(model, 2, (6, 7), schedule=schedule)
    params = decode(model, x, schedule, poison=True)
    assert not any(bool(p.isnan().any()) for p in params)
    groups = len(ev.groups)
    for t in range(len(ev.schedule)):
        at = ev.schedule[t]
        for g in range(groups):
            step = params[t * groups + g]
            ref = full[..., at.rows, at.cols]
            if groups > 1:  # the categorical head: compare the group decoded
                step, ref = step[:, g], ref[:, g]
            torch.testing.assert_close(step, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("name", "model", "schedule"), small_models())
def test_compact_caches_give_the_parameters_of_whole_images_bit_for_bit(
    name: str, model: Any, schedule: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = torch.randint(
        0, 3, (2, model.in_channels, 6, 7), generator=torch.Generator().manual_seed(2)
    )
    compact = decode(model, x, schedule, poison=False)
    monkeypatch.setattr(StepContext, "compact_caches", False)
    ev = IncrementalEvaluator(model, 2, (6, 7), schedule=schedule)
    assert all(c.layout is None and c.row_layout is None for c in conv_steps(ev))
    whole = decode(model, x, schedule, poison=False)
    assert len(compact) == len(whole)
    assert all(torch.equal(a, b) for a, b in zip(compact, whole, strict=True))


def test_a_schedule_too_steep_reads_zeros_where_a_whole_image_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Slope 1 is too steep for 5x5 convs (assert_causal refuses it): positions read taps
    # not computed yet. Those read zeros, from the zero row, as from a whole padded
    # image; never a row that another position held or will hold.
    torch.manual_seed(0)
    model = perturb_(PixelCNN(1, 3, kernel_size=5, hidden_channels=8, num_layers=2), 0.3)
    model = model.double().eval()
    steep = wavefront(model, (6, 7), slope=1)
    x = torch.randint(0, 3, (2, 1, 6, 7), generator=torch.Generator().manual_seed(3))
    poisoned = decode(model, x, steep, poison=True)
    monkeypatch.setattr(StepContext, "compact_caches", False)
    whole = decode(model, x, steep, poison=False)
    assert all(torch.equal(a, b) for a, b in zip(poisoned, whole, strict=True))
    with torch.no_grad():
        full = model(x)
    ref = torch.cat([full[..., steep[t].rows, steep[t].cols] for t in range(len(steep))], -1)
    assert not torch.allclose(torch.cat(whole, -1), ref)  # the order is wrong for the model


def test_a_gated_models_buffers_keep_rows_not_the_image(monkeypatch: pytest.MonkeyPatch) -> None:
    model = GatedPixelCNN(1, 2)  # the default: 8 layers, 7x7
    compact = IncrementalEvaluator(model, 2, (28, 28)).cache_bytes()
    monkeypatch.setattr(StepContext, "compact_caches", False)
    whole = IncrementalEvaluator(model, 2, (28, 28)).cache_bytes()
    assert compact < whole / 15  # 6.9 MB against 112 MB at batch 16
