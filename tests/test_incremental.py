"""Every unit's step against its forward, under raster and wavefront schedules; the
evaluators against the full forward for every head, stem and colour layout; a unit
written here, and nothing else, sampled exactly through the cached path."""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from pixelcnn_models import cached_and_naive, decode_like_a_decoder, perturb_
from torch import Tensor, nn

from maskedconv import (
    BottleneckBlock,
    CausalUnit,
    ConvStep,
    ConvUnit,
    FullForwardEvaluator,
    GatedBlock,
    IncrementalEvaluator,
    MaskedConv2d,
    PixelCNN,
    ResidualBlock,
    SkipSum,
    StepContext,
    UnitStep,
    model_slope,
    raster,
    sample,
    wavefront,
)
from maskedconv._conditioning import ConditionBias, Conditioning
from maskedconv._stems import EmbeddingInput, ScaledInput


def perturbed(module: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return perturb_(module, 0.3).double().eval()


def stack(units: list[nn.Module], channels: int) -> Any:
    """What ``model_slope`` needs of a model: a trunk, a stem and the image channels."""
    stem = types.SimpleNamespace(out_channels=lambda c: c)
    return types.SimpleNamespace(trunk=units, stem=stem, in_channels=channels)


def steps_equal_forward(
    units: list[nn.Module], x: Tensor, schedule: Any, cond: Conditioning | None = None
) -> None:
    """Fold the units' steps over ``schedule``; at every step, the last unit's output at
    the step's positions must equal the whole-image fold's there (float64, 1e-10)."""
    batch = x.shape[0]
    with torch.no_grad():
        full: Any = x
        rows = None
        for unit in units:
            full, rows = unit(full, rows, cond)
        context = StepContext(batch, schedule, cond, units)
        steps: list[UnitStep] = []
        plan = None
        for unit in units:
            steps.append(unit.incremental(context, plan))
            plan = steps[-1].rows
        for t in range(len(schedule)):
            row_values = None
            for step in steps:
                row_values = step.advance_rows(t, row_values)
            at = schedule[t]
            h: Any = x[:, :, at.rows, at.cols].transpose(1, 2)  # (B, n, C)
            for step in steps:
                h = step.step(h, t)
            expected = full[:, :, at.rows, at.cols].transpose(1, 2)
            torch.testing.assert_close(h, expected, rtol=0, atol=1e-10)


unit_configs = st.fixed_dictionaries(
    {
        "groups": st.sampled_from([1, 3]),
        "kernel": st.sampled_from([1, 3, 5]),
        "layout": st.sampled_from(["blocked", "interleaved"]),
        "conditioned": st.booleans(),
        "height": st.integers(1, 5),
        "width": st.integers(1, 9),
        "schedule": st.sampled_from(["raster", "wavefront"]),
    }
)


def conditioning(cfg: dict, batch: int = 2) -> Conditioning | None:
    if not cfg["conditioned"]:
        return None
    gen = torch.Generator().manual_seed(4)
    maps = torch.randn(batch, 2, cfg["height"], cfg["width"], generator=gen, dtype=torch.float64)
    return Conditioning(torch.tensor([0, 2]), maps)


def check_units(cfg: dict, units: list[nn.Module], channels: int) -> None:
    units = [perturbed(unit) for unit in units]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, channels, cfg["height"], cfg["width"], generator=gen, dtype=torch.float64)
    size = (cfg["height"], cfg["width"])
    schedule = (
        raster(size) if cfg["schedule"] == "raster" else wavefront(stack(units, channels), size)
    )
    steps_equal_forward(units, x, schedule, conditioning(cfg))


def cond_args(cfg: dict) -> dict[str, Any]:
    return dict(num_classes=3, cond_channels=2) if cfg["conditioned"] else {}


@settings(deadline=None)
@given(cfg=unit_configs, mask_type=st.sampled_from(["A", "B"]), relu=st.booleans())
def test_conv_unit_step_equals_forward(cfg: dict, mask_type: str, relu: bool) -> None:
    g = cfg["groups"]
    conv = MaskedConv2d(
        2 * g, 3 * g, cfg["kernel"], mask_type=mask_type, color_groups=g, group_layout=cfg["layout"]
    )
    condition = ConditionBias(3 * g, 3, 2) if cfg["conditioned"] else None
    check_units(cfg, [ConvUnit(conv, condition, relu=relu)], 2 * g)


@settings(deadline=None)
@given(cfg=unit_configs, block=st.sampled_from([ResidualBlock, BottleneckBlock]))
def test_block_step_equals_forward(cfg: dict, block: type) -> None:
    g = cfg["groups"]
    kernel = max(cfg["kernel"], 3)
    unit = block(4 * g, kernel, color_groups=g, group_layout=cfg["layout"], **cond_args(cfg))
    check_units(
        cfg, [unit, block(4 * g, kernel, color_groups=g, group_layout=cfg["layout"])], 4 * g
    )


@settings(deadline=None)
@given(cfg=unit_configs, layers=st.integers(1, 3))
def test_gated_blocks_step_equals_forward(cfg: dict, layers: int) -> None:
    # A first layer (its vertical stack reads the input rows above), later layers (their
    # vertical stack is a row stream from the layer before), and the skip sum.
    g = cfg["groups"]
    kernel = max(cfg["kernel"], 3)
    opts = dict(color_groups=g, group_layout=cfg["layout"], **cond_args(cfg))
    units = [GatedBlock(g, 2 * g, kernel, first=True, **opts)]
    units += [GatedBlock(2 * g, 2 * g, kernel, **opts) for _ in range(layers - 1)]
    check_units(cfg, [*units, SkipSum()], g)


def test_a_schedule_too_steep_for_a_gated_stack_is_refused() -> None:
    units = [GatedBlock(1, 2, 3, first=True), GatedBlock(2, 2, 3)]
    size = (4, 9)
    slope = model_slope(stack(units, 1))
    assert slope == 3  # 2 layers of reach 1: L * h + 1
    with pytest.raises(ValueError, match=r"is too steep for this model's row stream 0"):
        StepContext(1, wavefront(None, size, slope=slope - 1), None, units)
    StepContext(1, wavefront(None, size, slope=slope), None, units)


# --- a unit written here, and nothing else ------------------------------------------------


class DilatedResidual(CausalUnit):
    """``x + conv1x1(relu(dilated 3x3 B(relu(x))))``: not a library block. Built as
    ``PixelCNN(block=DilatedResidual)`` builds blocks."""

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        *,
        color_groups: int,
        group_layout: str,
        num_classes: int | None,
        cond_channels: int | None,
    ) -> None:
        super().__init__()
        opts: dict[str, Any] = dict(color_groups=color_groups, group_layout=group_layout)
        self.spatial = MaskedConv2d(channels, channels, 3, dilation=2, mask_type="B", **opts)
        self.mix = MaskedConv2d(channels, channels, 1, mask_type="B", **opts)

    def forward(self, x: Tensor, rows: Tensor | None = None, cond: Any = None) -> Any:
        return x + self.mix(F.relu(self.spatial(F.relu(x)))), rows

    def incremental(self, context: StepContext, rows: Any) -> UnitStep:
        return _DilatedResidualStep(self, context, rows)


class _DilatedResidualStep(UnitStep):
    def __init__(self, unit: DilatedResidual, context: StepContext, rows: Any) -> None:
        self.rows, self.schedule = rows, context.schedule
        self.spatial = ConvStep(unit.spatial, context)
        self.mix = ConvStep(unit.mix, context)

    def step(self, x: Tensor, t: int) -> Tensor:
        at = self.schedule[t]
        return x + self.mix(self.spatial(x.relu(), at, relu=True), at)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_a_unit_class_written_here_samples_exactly_through_the_cached_path(
    in_channels: int,
) -> None:
    model = perturbed(
        PixelCNN(
            in_channels, 3, hidden_channels=6, num_layers=3, kernel_size=3, block=DilatedResidual
        )
    )
    # Dilation 2 reaches two columns right two rows up (and the 3x3 type-A conv one right
    # one up): one column per row, slope 2, measured, not declared.
    assert model_slope(model) == 2
    x = torch.randint(0, 3, (2, in_channels, 5, 8), generator=torch.Generator().manual_seed(0))
    assert decode_like_a_decoder(model, x, 1e-10, "wavefront") == 8 + 2 * 4
    decode_like_a_decoder(model, x, 1e-10, "raster")
    shape = (3, in_channels, 4, 7)
    fast, slow, _ = cached_and_naive(model, shape, False, torch.Generator().manual_seed(1))
    assert torch.equal(fast, slow)


# --- whole models: every head x stem x colour layout -------------------------------------

MODEL_CASES = [
    # (in_channels, levels, head, input, color_groups, layout)
    (1, 2, "categorical", "scaled", None, "blocked"),
    (1, 16, "dmol", "scaled", None, "blocked"),
    (1, 9, "categorical", "embedding", None, "blocked"),
    (1, 9, "dmol", "embedding", None, "blocked"),
    (3, 4, "categorical", "scaled", 3, "blocked"),
    (3, 4, "categorical", "scaled", 3, "interleaved"),
    (3, 4, "categorical", "scaled", 1, "blocked"),
    (3, 5, "categorical", "embedding", 3, "blocked"),
    (3, 5, "categorical", "embedding", 3, "interleaved"),
    (3, 6, "dmol", "scaled", 1, "interleaved"),
    (3, 6, "dmol", "embedding", 1, "blocked"),
]


def build_model(case: tuple, dtype: torch.dtype = torch.float64) -> PixelCNN:
    c, k, head, stem, groups, layout = case
    torch.manual_seed(0)
    model = PixelCNN(
        c,
        k,
        hidden_channels=12,
        num_layers=3,
        kernel_size=3,
        head=head,
        input=stem,
        color_groups=groups,
        group_layout=layout,
        num_mixtures=2,
        block="bottleneck" if stem == "embedding" else "residual",
    )
    if dtype == torch.float64:
        perturbed(model)
    return model.to(dtype).eval()


@pytest.mark.parametrize("schedule", ["raster", "wavefront"])
@pytest.mark.parametrize("case", MODEL_CASES)
def test_evaluator_equals_forward_float64(case: tuple, schedule: str) -> None:
    model = build_model(case)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, model.levels, (2, model.in_channels, 4, 7), generator=gen)
    steps = decode_like_a_decoder(model, x, 1e-10, schedule)
    assert steps == (28 if schedule == "raster" else 7 + 2 * 3)  # 3x3 kernels: slope 2


@pytest.mark.parametrize("case", [MODEL_CASES[0], MODEL_CASES[4], MODEL_CASES[10]])
def test_evaluator_equals_forward_float32(case: tuple) -> None:
    model = build_model(case, torch.float32)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, model.levels, (2, model.in_channels, 7, 9), generator=gen)
    decode_like_a_decoder(model, x, 1e-5)


def test_both_evaluators_share_one_interface() -> None:
    model = build_model(MODEL_CASES[4])
    x = torch.randint(0, 4, (2, 3, 4, 6), generator=torch.Generator().manual_seed(2))
    evaluators = [
        IncrementalEvaluator(model, 2, (4, 6), schedule="wavefront"),
        FullForwardEvaluator(model, 2, (4, 6), schedule="wavefront"),
    ]
    with torch.no_grad():
        while not evaluators[0].done:
            first, second = evaluators
            assert first.positions == second.positions and first.groups == second.groups
            values = x[..., first.rows, first.cols]
            torch.testing.assert_close(
                first.params(values), second.params(values), rtol=0, atol=1e-10
            )
            for ev in evaluators:
                ev.advance(values)
    assert evaluators[1].done


def test_evaluator_recomputes_a_step_whose_earlier_groups_changed() -> None:
    # params() saw R = garbage; advance() with another R must recompute, or the caches
    # would keep activations of the wrong R, and the next step's parameters go wrong.
    model = build_model(MODEL_CASES[4])
    x = torch.randint(0, 4, (1, 3, 2, 2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x)
        ev = IncrementalEvaluator(model, 1, (2, 2), schedule="raster")
        wrong = (x[:, :, :1, 0] + 1) % 4
        ev.params(wrong)
        ev.advance(x[:, :, :1, 0])
        got = ev.params(x[:, :, :1, 1])
        torch.testing.assert_close(got, full[..., 0, 1:2], rtol=0, atol=1e-10)


def test_evaluator_errors() -> None:
    model = PixelCNN(1, 2, hidden_channels=4, num_layers=1, kernel_size=3)
    ev = IncrementalEvaluator(model, 2, (1, 1))
    with pytest.raises(
        ValueError,
        match=r"values must have shape \(B, C, n\) = \(2, 1, 1\) at step 0, but got \(2, 3\)",
    ):
        ev.params(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="values must be an integer tensor"):
        ev.params(torch.zeros(2, 1, 1))
    ev.advance(torch.zeros(2, 1, 1, dtype=torch.long))
    assert ev.done
    with pytest.raises(ValueError, match=r"every step of the 1x1 image is done \(1 steps\)"):
        ev.params(torch.zeros(2, 1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="image_size"):
        IncrementalEvaluator(model, 1, (0, 3))
    with pytest.raises(ValueError, match="Sequential has no incremental path"):
        IncrementalEvaluator(nn.Sequential(), 1, (2, 2))
    with pytest.raises(ValueError, match="schedule must be one of"):
        IncrementalEvaluator(model, 1, (2, 2), schedule="spiral")
    with pytest.raises(ValueError, match="schedule is for a 3x3 image, but the image is 2x2"):
        IncrementalEvaluator(model, 1, (2, 2), schedule=raster((3, 3)))


@pytest.mark.parametrize("case", MODEL_CASES)
@pytest.mark.parametrize("complete", [False, True])
def test_wavefront_raster_and_naive_give_the_same_samples(case: tuple, complete: bool) -> None:
    model = build_model(case)
    shape = (3, model.in_channels, 3, 7)
    gen = torch.Generator().manual_seed(5)
    fast, slow, kwargs = cached_and_naive(model, shape, complete, gen, temperature=0.8)
    assert torch.equal(fast, slow)
    assert fast.min() >= 0 and fast.max() < model.levels
    kwargs["shape" if not complete else "x"] = kwargs.get("shape", kwargs.get("x"))
    rastered = sample(
        model,
        generator=torch.Generator().manual_seed(3),
        schedule="raster",
        temperature=0.8,
        **{k: v for k, v in kwargs.items() if k != "temperature"},
    )
    assert torch.equal(fast, rastered)
    if complete:
        assert torch.equal(fast[kwargs["known"]], kwargs["x"][kwargs["known"]])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=3, levels=256, head="dmol", color_groups=1),
        dict(in_channels=1, levels=512, input="embedding"),
    ],
)
def test_the_issue_models_train_score_and_sample(kwargs: dict) -> None:
    model = PixelCNN(hidden_channels=24, num_layers=2, **kwargs)
    x = torch.randint(0, kwargs["levels"], (4, kwargs["in_channels"], 6, 6))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = -model.log_prob(x).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    fast = model.sample(2, (4, 4), generator=g(), method="cached")
    assert torch.equal(fast, model.sample(2, (4, 4), generator=g(), method="naive"))


# --- stems ------------------------------------------------------------------------------


@given(
    channels=st.integers(1, 3),
    levels=st.sampled_from([2, 5, 512]),
    dim=st.integers(1, 4),
    layout=st.sampled_from(["blocked", "interleaved"]),
)
def test_stems_act_on_each_position_alone(
    channels: int, levels: int, dim: int, layout: str
) -> None:
    # The evaluators feed a step's positions (B, C, n) to the stem: it must give what it
    # gives at those positions of the whole image.
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, levels, (3, channels, 2, 3), generator=gen)
    for stem in (ScaledInput(levels), EmbeddingInput(channels, levels, dim, layout)):
        stem = stem.double()
        full = stem(x)
        cols = torch.tensor([0, 2])
        torch.testing.assert_close(stem(x[:, :, 1, cols]), full[:, :, 1, cols])


def test_embedding_features_sit_in_their_channels_group() -> None:
    # Changing channel 1's code may move only channel 1's features.
    for layout, of_channel_1 in (("blocked", [4, 5, 6, 7]), ("interleaved", [1, 4, 7, 10])):
        stem = EmbeddingInput(3, 7, 4, layout)
        x = torch.zeros(1, 3, 1, 1, dtype=torch.long)
        y = x.clone()
        y[0, 1] = 5
        moved = (stem(x) != stem(y)).flatten().nonzero().flatten().tolist()
        assert moved == of_channel_1
