"""The exact cached sampling path against full forwards and against the plain loop."""

from __future__ import annotations

import pixelcnn_models
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import maskedconv._heads as heads_module
from maskedconv import IncrementalEvaluator, PixelCNN, sample

configs = st.fixed_dictionaries(
    {
        "in_channels": st.sampled_from([1, 3]),
        "levels": st.integers(2, 4),
        "num_layers": st.integers(1, 4),
        "kernel_size": st.sampled_from([3, 5, 7]),
        "grouped": st.booleans(),
        "group_layout": st.sampled_from(["blocked", "interleaved"]),
        "block": st.sampled_from(["residual", "bottleneck"]),
        "height": st.integers(1, 6),
        "width": st.integers(1, 6),
    }
)


def build(cfg: dict, dtype: torch.dtype = torch.float64, perturb: bool = True) -> PixelCNN:
    return pixelcnn_models.build(cfg, dtype, perturb).eval()


@given(cfg=configs, schedule=st.sampled_from(["raster", "wavefront"]))
def test_cached_logits_equal_full_forward_float64(cfg: dict, schedule: str) -> None:
    model = build(cfg)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(
        0, model.levels, (3, model.in_channels, cfg["height"], cfg["width"]), generator=gen
    )
    pixelcnn_models.decode_like_a_decoder(model, x, 1e-10, schedule)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_cached_logits_equal_full_forward_float32(in_channels: int) -> None:
    cfg = dict(
        in_channels=in_channels,
        levels=4,
        num_layers=5,
        kernel_size=7,
        grouped=True,
        group_layout="blocked",
        block="residual",
    )
    # As initialised: log-probabilities of order 1, where 1e-5 is a float tolerance.
    model = build(cfg, torch.float32, perturb=False)
    x = torch.randint(0, 4, (2, in_channels, 9, 12), generator=torch.Generator().manual_seed(1))
    pixelcnn_models.decode_like_a_decoder(model, x, 1e-5)


@given(cfg=configs, temperature=st.sampled_from([1.0, 0.7, 1.5]), complete=st.booleans())
def test_cached_and_naive_give_the_same_samples(
    cfg: dict, temperature: float, complete: bool
) -> None:
    model = build(cfg)
    shape = (4, cfg["in_channels"], cfg["height"], cfg["width"])
    gen = torch.Generator().manual_seed(5)
    fast, slow, kwargs = pixelcnn_models.cached_and_naive(
        model, shape, complete, gen, temperature=temperature
    )
    assert torch.equal(fast, slow)
    if complete:
        assert torch.equal(fast[kwargs["known"]], kwargs["x"][kwargs["known"]])


def record_draws(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    real_draw = heads_module.draw_from_log_probs

    def spy(logits, temperature, noise):
        seen.append(torch.log_softmax(logits, dim=-1))
        return real_draw(logits, temperature, noise)

    monkeypatch.setattr(heads_module, "draw_from_log_probs", spy)
    return seen


@pytest.mark.parametrize(
    ("in_channels", "known_channels", "known_rows"),
    [
        (1, [], [0, 2]),  # whole rows known: pixels with no draw at all
        (3, [2], []),  # B known: the last group is never drawn
        (3, [0], [1]),  # R known, and a known row
        (3, [1], []),
    ],
)
def test_every_draw_sees_the_full_forward_conditionals(
    monkeypatch: pytest.MonkeyPatch,
    in_channels: int,
    known_channels: list[int],
    known_rows: list[int],
) -> None:
    cfg = dict(
        in_channels=in_channels,
        levels=3,
        num_layers=3,
        kernel_size=3,
        grouped=True,
        group_layout="blocked",
        block="residual",
    )
    model = build(cfg)
    shape = (5, in_channels, 4, 5)
    x = torch.randint(0, 3, shape, generator=torch.Generator().manual_seed(0))
    known = torch.zeros(shape, dtype=torch.bool)
    known[:, known_channels] = True
    known[:, :, known_rows] = True
    seen = record_draws(monkeypatch)
    fast = sample(
        model, x=x, known=known, generator=torch.Generator().manual_seed(1), method="cached"
    )
    fast_logp, seen[:] = list(seen), []
    slow = sample(
        model, x=x, known=known, generator=torch.Generator().manual_seed(1), method="naive"
    )
    assert torch.equal(fast, slow)
    assert len(fast_logp) == len(seen) > 0
    for a, b in zip(fast_logp, seen, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_cached_and_naive_agree_in_float32_on_the_blog_model() -> None:
    model = PixelCNN(1, 2, hidden_channels=32, num_layers=3).eval()
    fast = sample(
        model, (4, 1, 10, 10), generator=torch.Generator().manual_seed(0), method="cached"
    )
    slow = sample(model, (4, 1, 10, 10), generator=torch.Generator().manual_seed(0), method="naive")
    assert torch.equal(fast, slow)


def test_auto_uses_the_cached_path_for_a_pixelcnn(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_params = IncrementalEvaluator.params

    def spy(self, values):
        calls.append(values.shape[-1])
        return real_params(self, values)

    monkeypatch.setattr(IncrementalEvaluator, "params", spy)
    model = PixelCNN(3, 2, hidden_channels=6, num_layers=2, kernel_size=3)
    sample(model, (2, 3, 4, 8))
    # The wavefront of 3x3 kernels (slope 2) on 4x8: 14 steps, one call per colour group.
    assert len(calls) == 14 * 3 and sum(calls) == 4 * 8 * 3
    calls.clear()
    sample(model, (2, 3, 4, 8), method="naive")
    assert calls == []


class Shifted(PixelCNN):
    """A subclass that changes forward: the cached path must not pretend to know it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0


def test_subclass_with_own_forward_falls_back_to_naive() -> None:
    torch.manual_seed(0)
    model = Shifted(1, 2, hidden_channels=4, num_layers=2, kernel_size=3).double()
    auto = sample(model, (64, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    naive = sample(model, (64, 1, 2, 2), generator=torch.Generator().manual_seed(0), method="naive")
    assert torch.equal(auto, naive)
    with pytest.raises(
        ValueError,
        match="method='cached' needs a model with an incremental path, but Shifted has no incremental path: Shifted overrides forward; use method='naive'",
    ):
        sample(model, (1, 1, 2, 2), method="cached")


def test_unknown_method() -> None:
    model = PixelCNN(1, 2, hidden_channels=4, num_layers=1)
    with pytest.raises(
        ValueError, match=r"method must be one of \('auto', 'cached', 'naive'\), but got 'fast'"
    ):
        sample(model, (1, 1, 2, 2), method="fast")
