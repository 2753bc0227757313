"""Schedules: the wavefront's slope against a brute force from receptive_field, the
checker proving (and refusing) schedules, and the Schedule's own checks."""

from __future__ import annotations

import pytest
import torch
from pixelcnn_models import perturb_

from maskedconv import (
    GatedPixelCNN,
    PixelCNN,
    Schedule,
    assert_causal,
    model_slope,
    raster,
    receptive_field,
    sample,
    wavefront,
)


def brute_force_slope(model: torch.nn.Module, height: int, width: int) -> int:
    """The least s such that every input (r - d, c + e) an output at (r, c) depends on has
    e < s * d (or d = 0 and e <= 0), from ``receptive_field`` at every pixel."""
    slope = 1
    for r in range(height):
        for c in range(width):
            seen = receptive_field(model, (model.in_channels, height, width), (r, c)).any(0)
            for qr, qc in torch.nonzero(seen).tolist():
                d, e = r - qr, qc - c
                assert d > 0 or (d == 0 and e <= 0), "a model that sees its future"
                if d > 0:
                    slope = max(slope, e // d + 1)
    return slope


SMALL_MODELS = [
    ("pixelcnn k3 x1", lambda: PixelCNN(1, 2, hidden_channels=4, num_layers=1, kernel_size=3)),
    ("pixelcnn k3 x3", lambda: PixelCNN(1, 2, hidden_channels=4, num_layers=3, kernel_size=3)),
    ("pixelcnn k5 x2", lambda: PixelCNN(1, 2, hidden_channels=4, num_layers=2, kernel_size=5)),
    ("rgb k3 x2", lambda: PixelCNN(3, 2, hidden_channels=6, num_layers=2, kernel_size=3)),
    ("gated k3 x1", lambda: GatedPixelCNN(1, 2, hidden_channels=4, num_layers=1, kernel_size=3)),
    ("gated k3 x2", lambda: GatedPixelCNN(1, 2, hidden_channels=4, num_layers=2, kernel_size=3)),
]


@pytest.mark.parametrize(("name", "make"), SMALL_MODELS, ids=[n for n, _ in SMALL_MODELS])
def test_the_measured_slope_equals_a_brute_force_from_receptive_field(name: str, make) -> None:
    torch.manual_seed(0)
    model = perturb_(make(), 0.3).eval()
    height, width = 5, 9
    expected = brute_force_slope(model, height, width)
    assert model_slope(model) == expected, name
    steps = len(wavefront(model, (height, width)))
    assert steps == width + min(expected, width) * (height - 1)
    # The derived schedule is proven; one slope steeper is refused by the checker.
    shape = (2, model.in_channels, height, width)
    assert assert_causal(model, shape, schedule=wavefront(model, (height, width))) == steps
    assert expected > 1  # every model here has kernels of 3 or more
    steeper = wavefront(model, (height, width), slope=expected - 1)
    with pytest.raises(AssertionError, match=r"step \d+\).*which it must not see"):
        assert_causal(model, shape, schedule=steeper)


def test_the_blog_model_takes_136_steps_and_the_default_gated_703() -> None:
    assert len(wavefront(PixelCNN(1, 2), (28, 28))) == 28 + 4 * 27 == 136
    gated = GatedPixelCNN(1, 2)
    assert model_slope(gated) == 8 * 3 + 1
    assert len(wavefront(gated, (28, 28))) == 28 + 25 * 27 == 703
    assert len(raster((28, 28))) == 784


def test_a_given_slope_is_taken_as_is_and_its_samples_can_be_wrong() -> None:
    # The evaluator trusts a given schedule: one slope too steep gives other samples than
    # the plain loop (which is why the checker exists).
    torch.manual_seed(0)
    model = perturb_(PixelCNN(1, 3, hidden_channels=6, num_layers=2, kernel_size=3), 0.5).eval()
    shape = (4, 1, 6, 9)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    exact = sample(model, shape, generator=g(), method="naive", schedule="raster")
    good = sample(model, shape, generator=g(), schedule=wavefront(model, (6, 9)))
    steep = sample(model, shape, generator=g(), schedule=wavefront(model, (6, 9), slope=1))
    assert torch.equal(good, exact)
    assert not torch.equal(steep, exact)


def test_schedules_iterate_and_index() -> None:
    schedule = wavefront(None, (3, 5), slope=2)
    assert list(schedule)[:3] == [[(0, 0)], [(0, 1)], [(0, 2), (1, 0)]]
    assert schedule[3].tolist() == [(0, 3), (1, 1)]
    assert schedule.rank.tolist() == [[0, 1, 2, 3, 4], [2, 3, 4, 5, 6], [4, 5, 6, 7, 8]]
    assert len(wavefront(None, (3, 5), slope=9)) == 15  # steeper than the width: raster
    assert repr(raster((2, 3))) == "Schedule(raster, 2x3, 6 steps)"
    custom = Schedule([[(0, 0), (1, 1)], [(0, 1)], [(1, 0)]], (2, 2))
    assert len(custom) == 3 and custom.rank.tolist() == [[0, 1], [2, 0]]


def test_schedule_errors() -> None:
    with pytest.raises(ValueError, match=r"schedule never visits position \(1, 1\)"):
        Schedule([[(0, 0), (0, 1)], [(1, 0)]], (2, 2))
    with pytest.raises(ValueError, match=r"schedule has position \(0, 0\) twice \(steps 0 and 1\)"):
        Schedule([[(0, 0)], [(0, 0), (0, 1), (1, 0), (1, 1)]], (2, 2))
    with pytest.raises(
        ValueError, match=r"schedule step 0 has position \(2, 0\) outside the 2x2 image"
    ):
        Schedule([[(2, 0)]], (2, 2))
    with pytest.raises(ValueError, match="schedule step 1 is empty"):
        Schedule([[(0, 0), (0, 1), (1, 0), (1, 1)], []], (2, 2))
    with pytest.raises(ValueError, match="slope must be an int >= 1, but got 0"):
        wavefront(None, (2, 2), slope=0)
    with pytest.raises(ValueError, match="cannot measure a wavefront slope for Sequential"):
        wavefront(torch.nn.Sequential(), (2, 2))
    model = PixelCNN(1, 2, hidden_channels=4, num_layers=1, kernel_size=3)
    with pytest.raises(ValueError, match="schedule must be one of"):
        sample(model, (1, 1, 2, 2), schedule="zigzag")
    with pytest.raises(ValueError, match="schedule must visit every position of the 3x3 image"):
        assert_causal(model, (2, 1, 3, 3), schedule=[[(0, 0)]])


@pytest.mark.parametrize("cls", [PixelCNN, GatedPixelCNN])
def test_wavefront_and_raster_give_the_same_samples_with_labels_and_maps(cls: type) -> None:
    torch.manual_seed(0)
    model = perturb_(
        cls(3, 4, hidden_channels=12, num_layers=2, kernel_size=3, num_classes=3, cond_channels=2),
        0.3,
    ).eval()
    shape = (3, 3, 5, 12)
    labels = torch.tensor([0, 2, 1])
    cond = torch.randn(3, 2, 3, 4, generator=torch.Generator().manual_seed(1))
    g = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    draws = {
        schedule: sample(model, shape, generator=g(), labels=labels, cond=cond, schedule=schedule)
        for schedule in ("wavefront", "raster")
    }
    naive = sample(model, shape, generator=g(), labels=labels, cond=cond, method="naive")
    assert torch.equal(draws["wavefront"], draws["raster"])
    assert torch.equal(draws["raster"], naive)
