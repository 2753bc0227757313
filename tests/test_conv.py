"""MaskedConv2d: smoke, shapes, exceptions, gradients, state, compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from maskedconv import (
    MaskedConv2d,
    PixelCNN,
    _formulations,
    chosen_formulations,
    masked_conv2d,
    set_conv_autotune,
)
from maskedconv._formulations import FORMULATIONS
from maskedconv._formulations import plan as formulation_plan
from maskedconv._formulations import run as run_formulation


def test_keeps_height_and_width() -> None:
    for k, d in [(1, 1), (3, 1), (7, 1), (3, 2), ((3, 5), 1)]:
        conv = MaskedConv2d(4, 6, k, dilation=d)
        assert conv(torch.randn(2, 4, 9, 11)).shape == (2, 6, 9, 11)


def test_is_a_conv2d_with_mask_buffer() -> None:
    conv = MaskedConv2d(3, 6, 5, mask_type="A", color_groups=3)
    assert isinstance(conv, nn.Conv2d)
    assert conv.mask.shape == conv.weight.shape
    assert "mask" in dict(conv.named_buffers())
    # The mask is not saved; what it is (its description and digest) is, as extra state.
    assert set(conv.state_dict()) == {"weight", "bias", "_extra_state"}


def test_masked_weights_zero_from_construction() -> None:
    conv = MaskedConv2d(6, 6, 7, color_groups=3)
    assert torch.all(conv.weight[conv.mask == 0] == 0)
    assert torch.all(conv.weight[conv.mask == 1] != 0)
    conv.reset_parameters()
    assert torch.all(conv.weight[conv.mask == 0] == 0)


def test_forward_equals_conv_with_masked_weight() -> None:
    conv = MaskedConv2d(6, 9, 5, mask_type="A", color_groups=3, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.normal_()  # masked taps non-zero too: forward must still ignore them
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    ref = F.conv2d(x, conv.weight * conv.mask, conv.bias, padding=2)
    torch.testing.assert_close(conv(x), ref, rtol=0, atol=1e-12)


def test_gradient_is_exactly_zero_at_masked_taps() -> None:
    conv = MaskedConv2d(6, 6, 7, mask_type="B", color_groups=3)
    conv(torch.randn(3, 6, 10, 10)).square().sum().backward()
    assert conv.weight.grad is not None
    assert torch.all(conv.weight.grad[conv.mask == 0] == 0)
    assert torch.count_nonzero(conv.weight.grad[conv.mask == 1]) > 0


def test_optimizer_steps_keep_masked_weights_zero() -> None:
    conv = MaskedConv2d(3, 6, 5, mask_type="A", color_groups=3)
    opt = torch.optim.AdamW(conv.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        conv(torch.randn(2, 3, 6, 6)).sum().backward()
        opt.step()
    assert torch.all(conv.state_dict()["weight"][conv.mask == 0] == 0)


def test_state_dict_round_trip_and_plain_conv_compatibility() -> None:
    conv = MaskedConv2d(4, 8, 3)
    plain = nn.Conv2d(4, 8, 3, padding=1)
    # Into a plain conv: the weights (already masked), without the mask's description.
    with pytest.raises(RuntimeError, match="Unexpected key"):
        plain.load_state_dict(conv.state_dict())
    plain.load_state_dict(conv.state_dict(), strict=False)
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(plain(x), conv(x))
    other = MaskedConv2d(4, 8, 3)
    other.load_state_dict(conv.state_dict())
    torch.testing.assert_close(other(x), conv(x))


def test_to_dtype_moves_mask() -> None:
    conv = MaskedConv2d(2, 2, 3).to(torch.float64)
    assert conv.mask.dtype == torch.float64
    assert conv(torch.randn(1, 2, 4, 4, dtype=torch.float64)).dtype == torch.float64
    conv = MaskedConv2d(2, 2, 3, dtype=torch.float16)
    assert conv.mask.dtype == torch.float16


def test_gradcheck_float64() -> None:
    conv = MaskedConv2d(3, 3, 3, mask_type="B", color_groups=3, dtype=torch.float64)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: masked_conv2d(x, w, conv.mask, b, 1), (x, conv.weight, conv.bias)
    )


def test_compile_fullgraph_equals_eager() -> None:
    conv = MaskedConv2d(3, 6, 5, mask_type="A", color_groups=3)
    compiled = torch.compile(conv, backend="eager", fullgraph=True)
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(compiled(x), conv(x))


def test_callable_mask_is_used_as_is() -> None:
    def centre_only(*, out_channels, in_channels, kernel_size, color_groups, group_layout):
        m = torch.zeros(out_channels, in_channels, *kernel_size, dtype=torch.bool)
        m[:, :, kernel_size[0] // 2, kernel_size[1] // 2] = True
        return m

    conv = MaskedConv2d(2, 2, 3, mask_type=centre_only)
    assert conv.mask.sum() == 4
    assert "mask_type=centre_only" in repr(conv)


def test_extra_repr() -> None:
    r = repr(MaskedConv2d(6, 12, 7, mask_type="A", color_groups=3, group_layout="interleaved"))
    assert "mask_type=A" in r and "color_groups=3" in r and "group_layout=interleaved" in r


def test_grouped_conv_allowed_with_one_colour_group() -> None:
    conv = MaskedConv2d(4, 4, 3, groups=4)
    assert conv.mask.shape == (4, 1, 3, 3)
    assert conv(torch.randn(1, 4, 5, 5)).shape == (1, 4, 5, 5)


def _wrong_shape(**kw):
    return torch.ones(1, 1, 1, 1)


def _not_binary(*, out_channels, in_channels, kernel_size, **kw):
    return torch.full((out_channels, in_channels, *kernel_size), 0.5)


def _not_tensor(**kw):
    return [[1]]


# Each message is given as literal fragments that must all appear in the error.
@pytest.mark.parametrize(
    ("kwargs", "error", "fragments"),
    [
        (
            dict(mask_type="C"),
            ValueError,
            [
                "mask_type must be one of ('A', 'B', 'checkerboard', 'group-checkerboard') or a callable, but got 'C'"
            ],
        ),
        (
            dict(mask_type=3),
            TypeError,
            [
                "mask_type must be one of ('A', 'B', 'checkerboard', 'group-checkerboard') or a callable, but got int 3"
            ],
        ),
        (
            dict(kernel_size=4),
            ValueError,
            ["kernel_size must be odd so that the kernel has a centre tap, but got 4"],
        ),
        (dict(kernel_size=(3, 4)), ValueError, ["kernel_size must be odd", "but got (3, 4)"]),
        (
            dict(out_channels=64, color_groups=3),
            ValueError,
            [
                "out_channels must be divisible by color_groups=3 so that every colour group gets the "
                "same number of channels, but got 64; nearest valid values: 63 or 66"
            ],
        ),
        (
            dict(in_channels=2, color_groups=3),
            ValueError,
            [
                "in_channels must be divisible by color_groups=3",
                "but got 2; nearest valid values: 3",
            ],
        ),
        (
            dict(stride=2),
            ValueError,
            ["stride must be 1: a strided masked conv cannot emit every pixel, but got 2"],
        ),
        (dict(padding=0), ValueError, ["padding must be None, 'same' or (1, 1)", "but got 0"]),
        (
            dict(padding="valid"),
            ValueError,
            ["padding must be None, 'same' or (1, 1)", "but got 'valid'"],
        ),
        (
            dict(padding_mode="reflect"),
            ValueError,
            ["padding_mode must be 'zeros': 'reflect' padding copies pixels"],
        ),
        (dict(padding_mode="circular"), ValueError, ["padding_mode must be 'zeros': 'circular'"]),
        (
            dict(groups=3, color_groups=3),
            ValueError,
            ["groups must be 1 when color_groups > 1", "but got groups=3 with color_groups=3"],
        ),
        (
            dict(group_layout="striped"),
            ValueError,
            ["group_layout must be one of ('blocked', 'interleaved'), but got 'striped'"],
        ),
        (dict(color_groups=0), ValueError, ["color_groups must be a positive int", "but got 0"]),
        (dict(in_channels=0), ValueError, ["in_channels must be a positive int, but got 0"]),
        (
            dict(mask_type=_wrong_shape),
            ValueError,
            ["must return a mask of the weight's shape (3, 3, 3, 3), but got (1, 1, 1, 1)"],
        ),
        (
            dict(mask_type=_not_binary),
            ValueError,
            ["must return only 0s and 1s, but got the value 0.5"],
        ),
        (dict(mask_type=_not_tensor), TypeError, ["must return a torch.Tensor, but got list"]),
    ],
)
def test_errors(kwargs: dict, error: type[Exception], fragments: list[str]) -> None:
    args = dict(in_channels=3, out_channels=3, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(error) as info:
        MaskedConv2d(**args)
    for fragment in fragments:
        assert fragment in str(info.value)


def _full_reference(conv: MaskedConv2d, x: torch.Tensor) -> torch.Tensor:
    # The masked convolution over the whole kernel, as the design blog computes it.
    return masked_conv2d(
        x, conv.weight, conv.mask, conv.bias, conv.padding, conv.dilation, conv.groups
    )


def _centre_column(*, out_channels, in_channels, kernel_size, color_groups, group_layout):
    # Not causal, but a valid mask: the crop must handle taps below the centre too.
    m = torch.zeros(out_channels, in_channels, *kernel_size)
    m[:, :, :, kernel_size[1] // 2] = 1
    return m


def _nothing(*, out_channels, in_channels, kernel_size, color_groups, group_layout):
    return torch.zeros(out_channels, in_channels, *kernel_size)


def _rows_above(*, out_channels, in_channels, kernel_size, color_groups, group_layout):
    # Nothing at the centre row: "split" is then the same as "pad".
    m = torch.zeros(out_channels, in_channels, *kernel_size)
    m[:, :, : kernel_size[0] // 2] = 1
    return m


def _future(*, out_channels, in_channels, kernel_size, color_groups, group_layout):
    # The mirror image of type A: only below and right of the centre (negative pads).
    m = torch.zeros(out_channels, in_channels, *kernel_size)
    ch, cw = kernel_size[0] // 2, kernel_size[1] // 2
    m[:, :, ch + 1 :] = 1
    m[:, :, ch, cw + 1 :] = 1
    return m


def _by(conv: MaskedConv2d, x: torch.Tensor, formulation: str) -> torch.Tensor:
    """``conv`` evaluated by one formulation (the layer itself when the mask keeps nothing)."""
    pieces = formulation_plan(conv.mask, conv.dilation, formulation)
    if pieces is None:  # the same as "pad" for this mask
        pieces = formulation_plan(conv.mask, conv.dilation, "pad")
    if not pieces:
        return conv(x)
    return run_formulation(pieces, x, conv.weight, conv.mask, conv.bias, conv.dilation, conv.groups)


@given(
    kind=st.sampled_from(["A", "B", _centre_column, _nothing, _rows_above, _future]),
    groups=st.integers(1, 3),
    mult=st.integers(1, 2),
    k=st.sampled_from([1, 3, 5, 7, (1, 5), (5, 1), (3, 7)]),
    dilation=st.sampled_from([1, 2]),
    layout=st.sampled_from(["blocked", "interleaved"]),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    formulation=st.sampled_from(FORMULATIONS),
)
def test_every_formulation_equals_full_masked_conv_float64(
    kind, groups, mult, k, dilation, layout, h, w, formulation
) -> None:
    c = groups * mult
    conv = MaskedConv2d(
        c,
        c,
        k,
        dilation=dilation,
        mask_type=kind,
        color_groups=groups,
        group_layout=layout,
        dtype=torch.float64,
    )
    with torch.no_grad():
        conv.weight.normal_()  # masked taps too: neither path may use them
    x = torch.randn(2, c, h, w, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, c, h, w, dtype=torch.float64)
    ref = _full_reference(conv, x)
    g_ref = torch.autograd.grad(ref, (x, conv.weight, conv.bias), grad_out)
    for ours in (conv(x), _by(conv, x, formulation)):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
        g_ours = torch.autograd.grad(ours, (x, conv.weight, conv.bias), grad_out)
        for a, b in zip(g_ours, g_ref, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_every_formulation_equals_full_masked_conv_float32(
    channels_last: bool, formulation: str
) -> None:
    conv = MaskedConv2d(64, 64, 7, mask_type="B")
    x = torch.randn(4, 64, 28, 28, requires_grad=True)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    ours, ref = _by(conv, x, formulation), _full_reference(conv, x)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    g_ours = torch.autograd.grad(ours.square().sum(), (x, conv.weight))
    g_ref = torch.autograd.grad(ref.square().sum(), (x, conv.weight))
    for a, b in zip(g_ours, g_ref, strict=True):  # float tolerance, relative to the scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_split_convolves_fewer_taps_than_the_crop() -> None:
    # 7x7 type B keeps 3 rows of 7 and 4 taps of the centre row: 25 taps in two pieces,
    # where "crop" and "pad" convolve the 4x7 block (28).
    mask = MaskedConv2d(1, 1, 7, mask_type="B").mask

    def taps(name: str) -> int:
        pieces = formulation_plan(mask, (1, 1), name)
        return sum(len(range(7)[p.rows]) * len(range(7)[p.cols]) for p in pieces)

    assert (taps("crop"), taps("pad"), taps("split")) == (28, 28, 25)


@pytest.fixture
def autotune():
    previous = set_conv_autotune(True)
    _formulations._chosen.clear()
    yield
    set_conv_autotune(previous)
    _formulations._chosen.clear()


def test_autotune_times_once_per_kind_of_call_and_touches_no_gradient(
    autotune, monkeypatch
) -> None:
    timed = []
    real = _formulations._time
    monkeypatch.setattr(
        _formulations, "_time", lambda *a, **k: timed.append(a[-1]) or real(*a, **k)
    )
    conv = MaskedConv2d(4, 4, 5, mask_type="A")
    other = MaskedConv2d(4, 4, 5, mask_type="A")  # same shape and mask: shares the choice
    x = torch.randn(2, 4, 8, 8)
    before = conv.weight.detach().clone()
    y = conv(x)
    assert conv.weight.grad is None  # timing the backward used copies
    torch.testing.assert_close(conv.weight, before, rtol=0, atol=0)
    torch.testing.assert_close(y, _full_reference(conv, x), rtol=1e-5, atol=1e-5)
    other(x)
    conv(x)
    with torch.no_grad():
        conv(x)
    conv(x.contiguous(memory_format=torch.channels_last))
    conv(torch.randn(3, 4, 8, 8))
    MaskedConv2d(4, 4, 5, mask_type="B")(x)  # another mask
    # grads / no grad / channels_last / another batch / another mask: five timings
    assert timed == [True, False, True, True, True]
    chosen = chosen_formulations()
    assert len(chosen) == 5 and set(chosen.values()) <= set(FORMULATIONS)
    assert any("channels_last" in k and "forward+backward" in k for k in chosen)
    assert any(k.endswith(", forward") for k in chosen)


def test_autotune_off_uses_the_rule_and_caches_nothing() -> None:
    assert set_conv_autotune(False) is False  # the default
    MaskedConv2d(4, 4, 5)(torch.randn(2, 4, 8, 8))
    assert chosen_formulations() == {}
    with pytest.raises(TypeError, match="enabled must be a bool, but got int 1"):
        set_conv_autotune(1)


def test_autotune_is_not_run_while_compiling(autotune) -> None:
    conv = MaskedConv2d(4, 4, 5)
    x = torch.randn(2, 4, 8, 8)
    compiled = torch.compile(conv, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), _full_reference(conv, x), rtol=1e-5, atol=1e-5)
    assert chosen_formulations() == {}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(kernel_size=3.0), TypeError, "kernel_size must be an int, but got float 3.0"),
        (dict(kernel_size="3"), TypeError, "kernel_size must be an int, but got str '3'"),
        (
            dict(kernel_size=(3, 3, 3)),
            ValueError,
            "kernel_size must be an int or a pair of ints, but got (3, 3, 3)",
        ),
        (dict(kernel_size=-3), ValueError, "kernel_size must be positive and odd, but got -3"),
        (
            dict(kernel_size=3, dilation=-1),
            ValueError,
            "dilation must be a positive int or pair, but got -1",
        ),
    ],
)
def test_clear_errors_for_kernel_and_dilation(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error) as info:
        MaskedConv2d(2, 2, **kwargs)
    assert message in str(info.value)


def test_numpy_integers_are_taken_as_nn_conv2d_takes_them() -> None:
    import numpy as np

    conv = MaskedConv2d(np.int64(2), np.int64(4), np.int64(3), dilation=np.int32(1))
    assert conv.in_channels == 2 and conv.kernel_size == (3, 3)
    assert conv(torch.zeros(1, 2, 5, 5)).shape == (1, 4, 5, 5)


def test_meta_construction_and_to_empty_rebuild_the_mask() -> None:
    from maskedconv import GatedPixelCNN

    for cls in (PixelCNN, GatedPixelCNN):
        torch.manual_seed(0)
        reference = cls(3, 4, hidden_channels=12, num_layers=2, kernel_size=3)
        x = torch.randint(0, 4, (2, 3, 5, 5))
        with torch.device("meta"):
            on_meta = cls(3, 4, hidden_channels=12, num_layers=2, kernel_size=3)
        moved = cls(3, 4, hidden_channels=12, num_layers=2, kernel_size=3).to("meta")
        for model in (on_meta, moved):
            model.to_empty(device="cpu")
            model.load_state_dict(reference.state_dict())
            torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
            conv = model.trunk[0].conv if cls is PixelCNN else model.trunk[0].h_conv
            assert torch.equal(conv.mask, conv._mask_source)


@pytest.mark.parametrize(
    ("saved", "loading", "says"),
    [
        (dict(mask_type="A"), dict(mask_type="B"), "mask_type='A'"),
        (dict(color_groups=3), dict(color_groups=1), "color_groups=3"),
        (
            dict(color_groups=3, group_layout="blocked"),
            dict(color_groups=3, group_layout="interleaved"),
            "group_layout='blocked'",
        ),
    ],
)
def test_weights_of_another_mask_are_refused(saved: dict, loading: dict, says: str) -> None:
    a = MaskedConv2d(6, 6, 3, **saved)
    b = MaskedConv2d(6, 6, 3, **loading)
    with pytest.raises(ValueError, match=f"saved from a MaskedConv2d with .*{says}"):
        b.load_state_dict(a.state_dict())
    b.load_state_dict(MaskedConv2d(6, 6, 3, **loading).state_dict())  # the same mask loads


def test_a_plain_conv2d_state_dict_still_loads() -> None:
    dense = nn.Conv2d(6, 6, 3, padding=1)
    layer = MaskedConv2d(6, 6, 3, mask_type="A", color_groups=3)
    layer.load_state_dict(dense.state_dict())
    assert torch.equal(layer.weight, dense.weight)
    assert layer.state_dict()["_extra_state"]["mask"].startswith("mask_type='A', color_groups=3")


def test_a_model_of_another_colour_layout_is_refused() -> None:
    blocked = PixelCNN(3, 4, hidden_channels=12, num_layers=2)
    for other in (
        PixelCNN(3, 4, hidden_channels=12, num_layers=2, group_layout="interleaved"),
        PixelCNN(3, 4, hidden_channels=12, num_layers=2, color_groups=1),
    ):
        with pytest.raises(ValueError, match="the masks differ"):
            other.load_state_dict(blocked.state_dict())
