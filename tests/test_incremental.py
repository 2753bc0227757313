"""Every layer's incremental step against its forward; the public per-position API;
the cached sampler against the plain loop for every head, stem and colour layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pixelcnn_models import cached_and_naive, perturb_
from torch import nn

from maskedconv import (
    BottleneckBlock,
    GroupLayerNorm,
    IncrementalEvaluator,
    IncrementalStep,
    MaskedConv2d,
    PixelCNN,
    ResidualBlock,
)
from maskedconv._stems import EmbeddingInput, ScaledInput


def perturbed(module: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return perturb_(module, 0.3).double().eval()


def steps_equal_forward(layer: nn.Module, x: torch.Tensor, tol: float = 1e-10) -> None:
    """Feed ``x`` position by position; every step's output must equal the forward's."""
    batch, _, height, width = x.shape
    with torch.no_grad():
        full = layer(x)  # (B, O, H, W)
        stepper = layer.incremental(batch, width)
        assert isinstance(stepper, IncrementalStep)
        for row in range(height):
            stepper.start_row(row)
            for col in range(width):
                out = stepper.step(x[:, :, row, col], col)
                torch.testing.assert_close(out, full[:, :, row, col], rtol=0, atol=tol)


layer_configs = st.fixed_dictionaries(
    {
        "groups": st.sampled_from([1, 2, 3]),
        "mult": st.integers(1, 3),
        "kernel": st.sampled_from([1, 3, 5, 7, (3, 5), (5, 3), (1, 3)]),
        "mask_type": st.sampled_from(["A", "B"]),
        "layout": st.sampled_from(["blocked", "interleaved"]),
        "bias": st.booleans(),
        "height": st.integers(1, 6),
        "width": st.integers(1, 7),
    }
)


def random_input(cfg: dict, channels: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    shape = (2, channels, cfg["height"], cfg["width"])
    return torch.randn(shape, generator=gen, dtype=torch.float64)


@given(cfg=layer_configs)
def test_masked_conv_step_equals_forward(cfg: dict) -> None:
    g = cfg["groups"]
    conv = MaskedConv2d(
        g * cfg["mult"],
        g * 2,
        cfg["kernel"],
        bias=cfg["bias"],
        mask_type=cfg["mask_type"],
        color_groups=g,
        group_layout=cfg["layout"],
    )
    layer = perturbed(conv)
    steps_equal_forward(layer, random_input(cfg, g * cfg["mult"]))


@given(cfg=layer_configs, block=st.sampled_from([ResidualBlock, BottleneckBlock]))
def test_block_step_equals_forward(cfg: dict, block: type) -> None:
    g = cfg["groups"]
    kernel = cfg["kernel"] if isinstance(cfg["kernel"], int) else 3
    layer = perturbed(
        block(2 * g * cfg["mult"], kernel, color_groups=g, group_layout=cfg["layout"])
    )
    steps_equal_forward(layer, random_input(cfg, 2 * g * cfg["mult"]))


@given(cfg=layer_configs)
def test_group_norm_step_equals_forward(cfg: dict) -> None:
    g = cfg["groups"]
    layer = perturbed(GroupLayerNorm(g * 2, color_groups=g, group_layout=cfg["layout"]))
    steps_equal_forward(layer, random_input(cfg, g * 2))


@given(
    channels=st.integers(1, 3),
    levels=st.sampled_from([2, 5, 512]),
    dim=st.integers(1, 4),
    layout=st.sampled_from(["blocked", "interleaved"]),
)
def test_stem_steps_equal_forward(channels: int, levels: int, dim: int, layout: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, levels, (3, channels, 2, 3), generator=gen)
    for stem in (ScaledInput(levels), EmbeddingInput(channels, levels, dim, layout)):
        stem = stem.double()
        full = stem(x)
        step = stem.incremental(3, 3)
        for col in range(3):
            torch.testing.assert_close(step.step(x[:, :, 1, col], col), full[:, :, 1, col])


def test_embedding_features_sit_in_their_channels_group() -> None:
    # Changing channel 1's code may move only channel 1's features.
    for layout, of_channel_1 in (("blocked", [4, 5, 6, 7]), ("interleaved", [1, 4, 7, 10])):
        stem = EmbeddingInput(3, 7, 4, layout)
        x = torch.zeros(1, 3, 1, 1, dtype=torch.long)
        y = x.clone()
        y[0, 1] = 5
        moved = (stem(x) != stem(y)).flatten().nonzero().flatten().tolist()
        assert moved == of_channel_1


def test_an_elementwise_torch_module_steps_and_an_unknown_one_does_not() -> None:
    from maskedconv._incremental import NoIncrementalPathError, SequentialStep

    seq = SequentialStep([nn.Tanh(), nn.ReLU()], 1, 1)
    torch.testing.assert_close(
        seq.step(torch.tensor([[-1.0, 2.0]]), 0), torch.tensor([[0.0, 0.9640275801]])
    )
    with pytest.raises(NoIncrementalPathError, match="BatchNorm2d has no incremental path"):
        SequentialStep([nn.BatchNorm2d(2)], 1, 1)


# --- whole models: every head x stem x colour layout -------------------------------

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


def decode_like_a_decoder(model: PixelCNN, x: torch.Tensor, tol: float) -> None:
    """Walk the image as an entropy decoder would; every group's parameters must equal
    the full forward's, with the later groups holding garbage."""
    batch, c, height, width = x.shape
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        full = model(x)
        ev = IncrementalEvaluator(model, batch, (height, width))
        while not ev.done:
            row, col = ev.position
            pixel = torch.randint(0, model.levels, (batch, c), generator=gen)  # garbage
            for chans in ev.groups:
                params = ev.params(pixel)
                ref = full[..., row, col]
                if model.color_groups > 1:  # the categorical head: (B, C, K)
                    params, ref = params[:, chans], ref[:, chans]
                torch.testing.assert_close(params, ref, rtol=0, atol=tol)
                pixel[:, chans] = x[:, chans, row, col]
            ev.advance(pixel)
        assert ev.position == (height, 0)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_evaluator_equals_forward_float64(case: tuple) -> None:
    model = build_model(case)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, model.levels, (2, model.in_channels, 4, 5), generator=gen)
    decode_like_a_decoder(model, x, 1e-10)


@pytest.mark.parametrize("case", [MODEL_CASES[0], MODEL_CASES[4], MODEL_CASES[10]])
def test_evaluator_equals_forward_float32(case: tuple) -> None:
    model = build_model(case, torch.float32)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, model.levels, (2, model.in_channels, 7, 6), generator=gen)
    decode_like_a_decoder(model, x, 1e-5)


def test_evaluator_recomputes_a_pixel_whose_earlier_groups_changed() -> None:
    # params() saw R = garbage; advance() with another R must recompute, or the caches
    # would keep activations of the wrong R, and the next pixel's parameters go wrong.
    model = build_model(MODEL_CASES[4])
    x = torch.randint(0, 4, (1, 3, 2, 2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x)
        ev = IncrementalEvaluator(model, 1, (2, 2))
        wrong = (x[:, :, 0, 0] + 1) % 4
        ev.params(wrong)
        ev.advance(x[:, :, 0, 0])
        torch.testing.assert_close(ev.params(x[:, :, 0, 1]), full[..., 0, 1], rtol=0, atol=1e-10)


def test_evaluator_errors() -> None:
    model = PixelCNN(1, 2, hidden_channels=4, num_layers=1, kernel_size=3)
    ev = IncrementalEvaluator(model, 2, (1, 1))
    with pytest.raises(ValueError, match=r"pixel must have shape \(2, 1\), but got \(2, 3\)"):
        ev.params(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="pixel must be an integer tensor"):
        ev.params(torch.zeros(2, 1))
    ev.advance(torch.zeros(2, 1, dtype=torch.long))
    assert ev.done
    with pytest.raises(ValueError, match="every position of the 1x1 image is done"):
        ev.params(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="image_size"):
        IncrementalEvaluator(model, 1, (0, 3))
    with pytest.raises(ValueError, match="Sequential has no incremental path"):
        IncrementalEvaluator(nn.Sequential(), 1, (2, 2))


@pytest.mark.parametrize("case", MODEL_CASES)
@pytest.mark.parametrize("complete", [False, True])
def test_cached_and_naive_sampling_identical(case: tuple, complete: bool) -> None:
    model = build_model(case)
    shape = (3, model.in_channels, 3, 4)
    gen = torch.Generator().manual_seed(5)
    fast, slow, kwargs = cached_and_naive(model, shape, complete, gen, temperature=0.8)
    assert torch.equal(fast, slow)
    assert fast.min() >= 0 and fast.max() < model.levels
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
