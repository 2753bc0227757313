"""``CachedDecodeStep``: the incremental evaluator's step with its caches passed in and
out. A decoder's loop around it (group by group, as a C++ decoder would run the exported
graph) gives the evaluator's parameters at every call, and the forward's at the end of
each pixel. The exported graphs are tested in test_export.py."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pixelcnn_models import perturb_

from maskedconv import (
    CachedDecodeStep,
    GatedPixelCNN,
    IncrementalEvaluator,
    NoIncrementalPathError,
    PixelCNN,
)


def decode_loop(
    step: Any,
    model: torch.nn.Module,
    target: torch.Tensor,
    schedule: str,
    atol: float = 1e-12,
    **kwargs: Any,
) -> int:
    """Decode ``target`` with ``step`` (a ``CachedDecodeStep``, its exported module or an
    onnxruntime session's), checking every call against ``IncrementalEvaluator`` (within
    ``atol``) and the forward; returns the number of calls."""
    batch, _, height, width = target.shape
    ev = IncrementalEvaluator(model, batch, (height, width), schedule=schedule, **kwargs)
    caches = CachedDecodeStep(model, batch, (height, width), **kwargs).initial_caches()
    with torch.no_grad():
        full = model(target, **kwargs)
    decoded = torch.zeros_like(target)
    last: tuple[torch.Tensor, ...] | None = None
    calls = 0
    with torch.no_grad():
        while not ev.done:
            at = ev.schedule[ev.step]
            values = decoded[:, :, at.rows, at.cols]
            if last is None:  # the first step: its own positions, zeros
                last = (torch.zeros_like(values), at.rows, at.cols)
            groups = ev.groups
            for g, chans in enumerate(groups):
                params, *caches = step(*last, values, at.rows, at.cols, *caches)
                calls += 1
                expected = ev.params(values)
                assert params.shape == expected.shape
                assert torch.allclose(params, expected, rtol=0, atol=atol), (ev.step, g)
                if g == len(groups) - 1:  # every earlier group final: the forward's values
                    assert torch.allclose(params, full[..., at.rows, at.cols], atol=10 * atol)
                values[:, chans] = target[:, chans][:, :, at.rows, at.cols]
            ev.advance(values)
            decoded[:, :, at.rows, at.cols] = values
            last = (values, at.rows, at.cols)
    assert torch.equal(decoded, target)
    return calls


def _labels() -> dict[str, torch.Tensor]:
    return {"labels": torch.tensor([2, 0])}


def _cond() -> dict[str, torch.Tensor]:
    return {"cond": torch.randn(2, 3, 2, 3, dtype=torch.float64)}


MODELS: list[tuple[str, Any, Any]] = [
    ("binary", lambda: PixelCNN(1, 2, hidden_channels=8, num_layers=3), dict),
    ("colour G3", lambda: PixelCNN(3, 4, hidden_channels=12, num_layers=2), dict),
    (
        "colour uneven",
        lambda: PixelCNN(3, 4, hidden_channels=12, num_layers=2, color_groups=[1, 2]),
        dict,
    ),
    (
        "colour interleaved",
        lambda: PixelCNN(3, 4, hidden_channels=12, num_layers=2, group_layout="interleaved"),
        dict,
    ),
    (
        "codes, labels",
        lambda: PixelCNN(1, 6, hidden_channels=8, num_layers=2, input="embedding", num_classes=3),
        _labels,
    ),
    (
        "bottleneck, cond",
        lambda: PixelCNN(
            1, 2, hidden_channels=8, num_layers=3, block="bottleneck", cond_channels=3
        ),
        _cond,
    ),
    ("dmol", lambda: PixelCNN(3, 16, hidden_channels=12, num_layers=2, head="dmol"), dict),
]


@pytest.mark.parametrize("schedule", ["wavefront", "raster"])
@pytest.mark.parametrize(("name", "build", "extra"), MODELS, ids=[m[0] for m in MODELS])
def test_decoder_loop_equals_the_evaluator_and_the_forward(name, build, extra, schedule) -> None:
    torch.manual_seed(0)
    model = perturb_(build().double(), 0.1).eval()
    kwargs = extra()
    target = torch.randint(0, model.levels, (2, model.in_channels, 5, 6))
    step = CachedDecodeStep(model, 2, (5, 6), **kwargs)
    calls = decode_loop(step, model, target, schedule, **kwargs)
    ev = IncrementalEvaluator(model, 2, (5, 6), schedule=schedule, **kwargs)
    assert len(ev.schedule) < 30 if schedule == "wavefront" else len(ev.schedule) == 30
    expected_groups = {"colour G3": 3, "colour uneven": 2, "colour interleaved": 3}
    assert len(ev.groups) == expected_groups.get(name, 1)  # dmol: one group a pixel
    assert calls == len(ev.schedule) * len(ev.groups)


def test_the_callers_caches_are_not_changed() -> None:
    model = PixelCNN(1, 2, hidden_channels=8, num_layers=2).eval()
    step = CachedDecodeStep(model, 1, (4, 4))
    caches = step.initial_caches()
    rows, cols = torch.tensor([0, 1]), torch.tensor([0, 0])
    ones = torch.ones(1, 1, 2, dtype=torch.long)
    _, *after = step(ones, rows, cols, ones, rows, cols, *caches)
    assert all(not bool(c.any()) for c in caches)  # still the zeros given
    assert any(bool(c.any()) for c in after)


def test_refuses_what_it_cannot_export_with_a_reason() -> None:
    with pytest.raises(
        NoIncrementalPathError, match=r"has one \(a gated vertical stack.*DecodeStep"
    ):
        CachedDecodeStep(GatedPixelCNN(1, 2, hidden_channels=8, num_layers=2), 1, (4, 4))
    board = PixelCNN(1, 2, hidden_channels=8, num_layers=2, order="checkerboard")
    with pytest.raises(NoIncrementalPathError, match=r"checkerboard conv.*DecodeStep"):
        CachedDecodeStep(board, 1, (4, 4))
    with pytest.raises(NoIncrementalPathError, match=r"has no trunk of causal units"):
        CachedDecodeStep(torch.nn.Conv2d(1, 2, 3), 1, (4, 4))
    with pytest.raises(ValueError, match="batch_size"):
        CachedDecodeStep(PixelCNN(1, 2, hidden_channels=8, num_layers=2), 0, (4, 4))
    step = CachedDecodeStep(PixelCNN(1, 2, hidden_channels=8, num_layers=2), 1, (4, 4))
    at = torch.tensor([0])
    zeros = torch.zeros(1, 1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="caches must be the 2 tensors"):
        step(zeros, at, at, zeros, at, at)
    caches = step.initial_caches()
    with pytest.raises(TypeError, match=r"values must be an integer tensor \(B, C, n\)"):
        step(zeros, at, at, zeros.float(), at, at, *caches)
    with pytest.raises(ValueError, match="last must hold the step's batch of 1 images, but has 2"):
        step(zeros.repeat(2, 1, 1), at, at, zeros, at, at, *caches)
    with pytest.raises(
        ValueError, match="the cols of values must be a 1-D integer tensor of its 1"
    ):
        step(zeros, at, at, zeros, at, torch.tensor([0, 1]), *caches)
    with pytest.raises(ValueError, match=r"caches must have the shapes of initial_caches\(\)"):
        step(zeros, at, at, zeros, at, at, caches[0], caches[1][:, :-1])


def test_no_autograd_history_builds_up_through_the_caches() -> None:
    # An embedding stem has parameters; outside no_grad, the step's outputs still carry
    # no history (a decoder calls it hundreds of times, feeding the caches back).
    model = PixelCNN(1, 5, hidden_channels=8, num_layers=2, input="embedding").eval()
    step = CachedDecodeStep(model, 1, (4, 4))
    caches = step.initial_caches()
    at = (torch.tensor([0, 1]), torch.tensor([0, 0]))
    values = torch.ones(1, 1, 2, dtype=torch.long)
    for _ in range(3):
        params, *caches = step(values, *at, values, *at, *caches)
    assert not params.requires_grad and not any(c.requires_grad for c in caches)
