"""The exact cached sampling path against full forwards and against the plain loop."""

from __future__ import annotations

import pixelcnn_models
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import maskedconv._heads as heads_module
from maskedconv import PixelCNN, sample
from maskedconv._models import _PixelCNNStep

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


def group_channels(model: PixelCNN, g: int) -> list[int]:
    c, groups = model.in_channels, model.color_groups
    if model.group_layout == "blocked":
        return list(range(g * c // groups, (g + 1) * c // groups))
    return list(range(g, c, groups))


def check_steps_match_forward(model: PixelCNN, height: int, width: int, tol: float) -> None:
    gen = torch.Generator().manual_seed(1)
    c, k = model.in_channels, model.levels
    x = torch.randint(0, k, (3, c, height, width), generator=gen)
    with torch.no_grad():
        full = model(x)  # (B, C, K, H, W)
        stepper = model.incremental(3, width)
        for row in range(height):
            stepper.start_row(row)
            for col in range(width):
                for g in range(model.color_groups):
                    # As in sampling: groups before g are known, group g and later are
                    # not yet drawn (garbage here); group g's logits must be exact.
                    pixel = torch.randint(0, k, (3, c), generator=gen)
                    done = [ch for h in range(g) for ch in group_channels(model, h)]
                    pixel[:, done] = x[:, done, row, col]
                    logits = stepper.step(pixel, col)  # (B, C, K)
                    chans = group_channels(model, g)
                    # The conditional log-probabilities the sampler draws from.
                    ours = torch.log_softmax(logits[:, chans], dim=-1)
                    ref = torch.log_softmax(full[:, chans, :, row, col], dim=-1)
                    torch.testing.assert_close(ours, ref, rtol=0, atol=tol)
                stepper.write(x[:, :, row, col], col)


@given(cfg=configs)
def test_cached_logits_equal_full_forward_float64(cfg: dict) -> None:
    check_steps_match_forward(build(cfg), cfg["height"], cfg["width"], 1e-10)


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
    check_steps_match_forward(build(cfg, torch.float32, perturb=False), 9, 8, 1e-5)


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

    def spy(logits, temperature, generator):
        seen.append(torch.log_softmax(logits, dim=-1))
        return real_draw(logits, temperature, generator)

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
    real_step = _PixelCNNStep.step

    def spy(self, pixel, col):
        calls.append(col)
        return real_step(self, pixel, col)

    monkeypatch.setattr(_PixelCNNStep, "step", spy)
    model = PixelCNN(3, 2, hidden_channels=6, num_layers=2, kernel_size=3)
    sample(model, (2, 3, 2, 3))
    assert len(calls) == 2 * 3 * 3  # one step per pixel and colour group
    calls.clear()
    sample(model, (2, 3, 2, 3), method="naive")
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


def test_cache_memory_is_a_few_rows_per_layer() -> None:
    model = PixelCNN(1, 2)  # blog binary: 5 kxk convs, 64 channels, 7x7
    stepper = model.incremental(16, 28)
    # per image: 4 blocks x (4 rows x 34 cols x 64 ch + 28 x 64) + first conv (4 x 34 x 1 + 28 x 64)
    per_image = 4 * (4 * 34 * 64 + 28 * 64) + (4 * 34 * 1 + 28 * 64)
    assert stepper.cache_bytes() == 16 * per_image * 4
