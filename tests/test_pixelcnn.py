"""PixelCNN: shapes, exceptions, likelihood, exhaustive normalisation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from maskedconv import BottleneckBlock, PixelCNN, PixelCNNConfig, ResidualBlock, nll_per_dim
from maskedconv._blocks import GroupLayerNorm


def all_images(c: int, h: int, w: int, levels: int = 2) -> torch.Tensor:
    values = list(itertools.product(range(levels), repeat=c * h * w))
    return torch.tensor(values).view(-1, c, h, w)


def test_default_is_the_blog_architecture() -> None:
    model = PixelCNN(1, 2)
    blocks = list(model.trunk)[1:-2]
    assert len(blocks) == 4 and all(isinstance(m, ResidualBlock) for m in blocks)
    first = model.trunk[0].conv
    assert first.mask_type == "A" and first.kernel_size == (7, 7) and first.out_channels == 64
    assert model.trunk[-1].conv.out_channels == 2
    assert model.trunk[-1].conv.kernel_size == (1, 1)
    assert PixelCNN(3, 4, hidden_channels=120).color_groups == 3
    assert PixelCNN(3, 4, hidden_channels=120, color_groups=1).color_groups == 1


def test_residual_is_added_once() -> None:
    block = ResidualBlock(4, 3)
    with torch.no_grad():
        for p in block.parameters():
            p.zero_()
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(block(x)[0], x)
    bottleneck = BottleneckBlock(4, 3)
    with torch.no_grad():
        bottleneck.conv_out.weight.zero_()
        bottleneck.conv_out.bias.zero_()
    torch.testing.assert_close(bottleneck(x)[0], x)


def test_group_layer_norm_normalises_each_group_separately() -> None:
    norm = GroupLayerNorm(6, color_groups=3, eps=1e-12).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64, generator=g) * 5 + 3
    zeros, ones = (
        torch.zeros(2, 3, 4, 4, dtype=torch.float64),
        torch.ones(2, 3, 4, 4, dtype=torch.float64),
    )
    y = norm(x).view(2, 3, 2, 4, 4)  # (B, G, C/G, H, W)
    torch.testing.assert_close(y.mean(2), zeros, atol=1e-12, rtol=0)
    torch.testing.assert_close(y.var(2, unbiased=False), ones, atol=1e-6, rtol=0)
    inter = GroupLayerNorm(6, color_groups=3, group_layout="interleaved", eps=1e-12).double()
    y = inter(x).view(2, 2, 3, 4, 4)  # (B, C/G, G, H, W)
    torch.testing.assert_close(y.mean(1), zeros, atol=1e-12, rtol=0)
    torch.testing.assert_close(y.var(1, unbiased=False), ones, atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout", ["blocked", "interleaved"])
@pytest.mark.parametrize("block", ["residual", "bottleneck"])
def test_shapes(layout: str, block: str) -> None:
    model = PixelCNN(3, 4, hidden_channels=12, num_layers=3, group_layout=layout, block=block)
    x = torch.randint(0, 4, (2, 3, 5, 7))
    assert model(x).shape == (2, 3, 4, 5, 7)
    assert model.log_prob(x).shape == (2,)


def test_log_prob_equals_manual_sum() -> None:
    model = PixelCNN(3, 4, hidden_channels=12, num_layers=2, group_layout="interleaved")
    x = torch.randint(0, 4, (3, 3, 4, 4))
    logp = torch.log_softmax(model(x), dim=2)  # (B, C, K, H, W)
    manual = logp.gather(2, x.unsqueeze(2)).sum(dim=(1, 2, 3, 4))
    torch.testing.assert_close(model.log_prob(x), manual)
    torch.testing.assert_close(model.log_prob_from_params(model(x), x), manual)


def test_interleaved_logits_follow_channel_groups() -> None:
    # The logits of channel c must come from out channels of group c: changing input
    # channel 2 (B) at a pixel must not move that pixel's R or G logits.
    model = PixelCNN(3, 4, hidden_channels=12, num_layers=2, group_layout="interleaved").double()
    x = torch.randint(0, 4, (1, 3, 3, 3))
    y = x.clone()
    y[0, 2, 2, 2] = (y[0, 2, 2, 2] + 1) % 4
    a, b = model(x), model(y)
    torch.testing.assert_close(a[0, :, :, 2, 2], b[0, :, :, 2, 2], rtol=0, atol=0)


@pytest.mark.parametrize("block", ["residual", "bottleneck"])
def test_normalised_over_all_binary_3x3_images(block: str) -> None:
    torch.manual_seed(0)
    model = PixelCNN(1, 2, hidden_channels=8, num_layers=3, kernel_size=3, block=block).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)  # a peaked, far-from-uniform distribution
    probs = model.log_prob(all_images(1, 3, 3)).exp()
    assert probs.shape == (512,)
    assert abs(probs.sum().item() - 1) < 1e-9
    assert probs.max() > 5 / 512


@pytest.mark.parametrize("layout", ["blocked", "interleaved"])
def test_normalised_grouped_rgb_over_all_binary_2x2_images(layout: str) -> None:
    torch.manual_seed(0)
    model = PixelCNN(
        3, 2, hidden_channels=6, num_layers=2, kernel_size=3, group_layout=layout
    ).double()
    probs = model.log_prob(all_images(3, 2, 2)).exp()
    assert probs.shape == (4096,)
    assert abs(probs.sum().item() - 1) < 1e-9


def test_a_non_causal_model_would_not_normalise() -> None:
    # The normalisation test can fail: a type-B first layer sees its own pixel.
    torch.manual_seed(0)
    model = PixelCNN(1, 2, hidden_channels=8, num_layers=2, kernel_size=3).double()
    bad = type(model.trunk[0].conv)(1, 8, 3, mask_type="B").double()
    with pytest.raises(ValueError, match="the masks differ"):  # refused as it stands
        bad.load_state_dict(model.trunk[0].conv.state_dict())
    weights = {k: v for k, v in model.trunk[0].conv.state_dict().items() if k != "_extra_state"}
    bad.load_state_dict(weights)  # without the mask's description: loaded on purpose
    with torch.no_grad():
        bad.weight[:, :, 1, 1] = 1.0  # the centre tap that type A would zero
    model.trunk[0].conv = bad
    probs = model.log_prob(all_images(1, 3, 3)).exp()
    assert abs(probs.sum().item() - 1) > 1e-3


def test_log_prob_is_float32_under_autocast() -> None:
    model = PixelCNN(1, 2, hidden_channels=8, num_layers=2)
    x = torch.randint(0, 2, (2, 1, 6, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16
        logp = model.log_prob(x)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, model.log_prob(x), rtol=0.05, atol=0.5)


def test_nll_per_dim_units() -> None:
    logp = torch.tensor([-784.0 * math.log(2)])
    torch.testing.assert_close(nll_per_dim(logp, (1, 28, 28), "bits"), torch.tensor([1.0]))
    torch.testing.assert_close(nll_per_dim(logp, (8, 1, 28, 28)), torch.tensor([math.log(2)]))
    with pytest.raises(ValueError, match="unit must be 'nats' or 'bits', but got 'bytes'"):
        nll_per_dim(logp, (1, 28, 28), "bytes")  # type: ignore[arg-type]


def test_config_round_trip_and_state_dict() -> None:
    model = PixelCNN(3, 4, hidden_channels=12, num_layers=2, block="bottleneck")
    again = PixelCNN.from_config(model.config.to_dict())
    again.load_state_dict(model.state_dict())
    x = torch.randint(0, 4, (2, 3, 4, 4))
    torch.testing.assert_close(again(x), model(x))
    assert again.config == model.config


def test_to_float64_moves_everything() -> None:
    model = PixelCNN(1, 2, hidden_channels=8, num_layers=2).to(torch.float64)
    assert all(b.dtype == torch.float64 for b in model.buffers())
    assert model.log_prob(torch.randint(0, 2, (1, 1, 4, 4))).dtype == torch.float64


def test_compile_fullgraph_equals_eager() -> None:
    model = PixelCNN(3, 4, hidden_channels=12, num_layers=2)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randint(0, 4, (2, 3, 5, 5))
    torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize(
    ("x", "error", "message"),
    [
        (
            torch.rand(1, 1, 4, 4),
            TypeError,
            "x must be an integer image tensor with values in [0, 2), but got dtype torch.float32",
        ),
        (torch.ones(1, 1, 4, 4, dtype=torch.bool), TypeError, "but got dtype torch.bool"),
        (
            torch.zeros(1, 3, 4, 4, dtype=torch.long),
            ValueError,
            "x must have shape (B, 1, H, W), but got (1, 3, 4, 4)",
        ),
        (
            torch.zeros(1, 4, 4, dtype=torch.long),
            ValueError,
            "x must have shape (B, 1, H, W), but got (1, 4, 4)",
        ),
        (
            torch.full((1, 1, 2, 2), 2),
            ValueError,
            "x must have values in [0, 2) (levels=2), but got values in [2, 2]",
        ),
        (torch.full((1, 1, 2, 2), -1), ValueError, "but got values in [-1, -1]"),
    ],
)
def test_input_errors(x: torch.Tensor, error: type[Exception], message: str) -> None:
    model = PixelCNN(1, 2, hidden_channels=8, num_layers=1)
    with pytest.raises(error) as info:
        model(x)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(levels=1), "levels must be an int >= 2, but got 1"),
        (dict(in_channels=0), "in_channels must be an int >= 1, but got 0"),
        (dict(num_layers=0), "num_layers must be an int >= 1, but got 0"),
        (
            dict(kernel_size=4),
            "kernel_size must be odd so that the kernel has a centre tap, but got 4",
        ),
        (dict(in_channels=3, color_groups=2), "color_groups must divide in_channels=3, but got 2"),
        (
            dict(in_channels=3, hidden_channels=64),
            "hidden_channels must be divisible by color_groups=3 so that every colour group gets the same number of channels, but got 64; nearest valid values: 63 or 66",
        ),
        (
            dict(in_channels=3, hidden_channels=63, block="bottleneck"),
            "hidden_channels must be divisible by 2 * color_groups = 6 (BottleneckBlock splits it)",
        ),
        (
            dict(block="gated"),
            "block must be one of ('residual', 'bottleneck') or a CausalUnit subclass, but got 'gated'",
        ),
        (
            dict(group_layout="x"),
            "group_layout must be one of ('blocked', 'interleaved'), but got 'x'",
        ),
    ],
)
def test_config_errors(kwargs: dict, message: str) -> None:
    args = dict(in_channels=1, levels=2)
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        PixelCNNConfig(**args)
    assert message in str(info.value)
    with pytest.raises(ValueError):
        PixelCNN(args.pop("in_channels"), args.pop("levels"), **args)


def test_log_prob_refuses_ignored_values_and_non_finite_parameters() -> None:
    model = PixelCNN(1, 2, hidden_channels=4, num_layers=1, kernel_size=3)
    x = torch.zeros(1, 1, 3, 3, dtype=torch.long)
    params = model(x)
    bad = x.clone()
    bad[0, 0, 0, 0] = -100  # cross-entropy's ignore index: once scored as probability 1
    with pytest.raises(
        ValueError,
        match=r"x must have values in \[0, 2\) \(levels=2\), but got values in \[-100, 0\]",
    ):
        model.log_prob_from_params(params, bad)
    broken = params.detach().clone()
    broken[0, 0, :, 1, 1] = float("inf")
    with pytest.raises(ValueError, match="log_prob is not finite"):
        model.log_prob_from_params(broken, x)
