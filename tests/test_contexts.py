"""Contexts beyond raster order: the checkerboard mask and schedule, uneven channel groups,
and the checker proving (and refusing) them.

Masks are checked against a brute force written from the definitions; models against
the checker, and their evaluators against their forward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pixelcnn_models import brute_groups, perturb_
from torch import nn

from maskedconv import (
    IncrementalEvaluator,
    MaskedConv2d,
    PixelCNN,
    Schedule,
    assert_causal,
    checkerboard,
    codec,
    mask_checkerboard,
    model_slope,
    raster,
    sample,
    wavefront,
)
from maskedconv._masks import channel_groups, group_slices

# --- brute forces -----------------------------------------------------------------------


def brute_checkerboard(out_c: int, in_c: int, kh: int, kw: int, sizes: list[int]) -> torch.Tensor:
    go, gi = brute_groups(out_c, sizes), brute_groups(in_c, sizes)
    mask = torch.zeros(out_c, in_c, kh, kw)
    for o in range(out_c):
        for i in range(in_c):
            for a in range(kh):
                for b in range(kw):
                    di, dj = a - kh // 2, b - kw // 2
                    if (di, dj) == (0, 0):
                        mask[o, i, a, b] = float(gi[i] < go[o])
                    else:
                        mask[o, i, a, b] = float((di + dj) % 2 != 0)
    return mask


def brute_checkerboard_conv(conv: MaskedConv2d, x: torch.Tensor) -> torch.Tensor:
    """The layer's rule, pixel by pixel: an odd tap reads its input only at an anchor."""
    weight = (conv.weight * conv.mask).detach()
    batch, _, height, width = x.shape
    kh, kw = weight.shape[-2:]
    out = conv.bias.detach().view(1, -1, 1, 1).repeat(batch, 1, height, width)
    for r in range(height):
        for c in range(width):
            for a in range(kh):
                for b in range(kw):
                    qr, qc = r + a - kh // 2, c + b - kw // 2
                    if not (0 <= qr < height and 0 <= qc < width):
                        continue
                    centre = (qr, qc) == (r, c)
                    if not centre and (qr + qc) % 2:
                        continue  # a non-anchor: never read through an odd tap
                    out[:, :, r, c] += x[:, :, qr, qc] @ weight[:, :, a, b].t()
    return out


SIZES = st.sampled_from([[1], [1, 1, 1], [1, 2], [2, 1, 1], [1, 1, 2], [3, 1]])


@settings(max_examples=40, deadline=None)
@given(
    sizes=SIZES,
    k=st.sampled_from([(1, 1), (3, 3), (5, 5), (3, 5), (7, 3)]),
    out_mult=st.integers(1, 3),
    in_mult=st.integers(1, 2),
)
def test_checkerboard_mask_matches_brute_force(sizes, k, out_mult, in_mult) -> None:
    out_c, in_c = out_mult * sum(sizes), in_mult * sum(sizes)
    got = mask_checkerboard(
        out_channels=out_c, in_channels=in_c, kernel_size=k, color_groups=sizes
    ).float()
    assert torch.equal(got, brute_checkerboard(out_c, in_c, *k, sizes))


@settings(max_examples=40, deadline=None)
@given(sizes=SIZES, mult=st.integers(1, 4))
def test_uneven_groups_match_brute_force(sizes, mult) -> None:
    channels = mult * sum(sizes)
    expected = brute_groups(channels, sizes)
    assert channel_groups(channels, sizes).tolist() == expected
    slices = group_slices(channels, sizes)
    assert [g for g, s in enumerate(slices) for _ in range(channels)[s]] == expected


def test_uneven_type_a_and_b_masks_follow_the_groups() -> None:
    sizes = [1, 1, 2]
    for kind, seen in (("A", lambda go, gi: gi < go), ("B", lambda go, gi: gi <= go)):
        conv = MaskedConv2d(8, 12, 3, mask_type=kind, color_groups=sizes)
        go, gi = brute_groups(12, sizes), brute_groups(8, sizes)
        centre = torch.tensor([[float(seen(go[o], gi[i])) for i in range(8)] for o in range(12)])
        assert torch.equal(conv.mask[:, :, 1, 1], centre)
        assert conv.mask[:, :, 0].eq(1).all() and conv.mask[:, :, 2].eq(0).all()


def test_equal_sizes_are_the_equal_groups_of_an_int() -> None:
    a = MaskedConv2d(6, 6, 3, mask_type="A", color_groups=[2, 2, 2])
    b = MaskedConv2d(6, 6, 3, mask_type="A", color_groups=3)
    assert torch.equal(a.mask, b.mask)


@pytest.mark.parametrize(
    ("sizes", "k", "channels"), [([1], 5, (1, 3)), ([1, 1, 1], 3, (3, 6)), ([1, 2], 5, (3, 3))]
)
def test_checkerboard_conv_matches_brute_force(sizes, k, channels) -> None:
    torch.manual_seed(0)
    conv = MaskedConv2d(*channels, k, mask_type="checkerboard", color_groups=sizes).double()
    x = torch.randn(2, channels[0], 6, 7, dtype=torch.float64)
    assert torch.allclose(conv(x), brute_checkerboard_conv(conv, x), atol=1e-12)


def test_checkerboard_masked_weights_get_no_gradient() -> None:
    conv = MaskedConv2d(2, 4, 5, mask_type="checkerboard", color_groups=2)
    conv(torch.randn(1, 2, 6, 6)).sum().backward()
    assert conv.weight.grad is not None
    assert conv.weight.grad[conv.mask == 0].eq(0).all()
    assert conv.weight.grad[conv.mask == 1].ne(0).any()


def test_bad_arguments_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="dilation must be odd for mask_type='checkerboard'"):
        MaskedConv2d(1, 4, 3, mask_type="checkerboard", dilation=2)
    with pytest.raises(ValueError, match=r"need group_layout='blocked'.*'interleaved'"):
        MaskedConv2d(4, 8, 3, color_groups=[1, 3], group_layout="interleaved")
    with pytest.raises(ValueError, match=r"out_channels must be divisible by sum\(color_groups\)"):
        MaskedConv2d(4, 6, 3, color_groups=[1, 3])
    with pytest.raises(ValueError, match=r"non-empty list of positive group sizes.*\[1, 0\]"):
        MaskedConv2d(4, 4, 3, color_groups=[1, 0])
    with pytest.raises(ValueError, match=r"order must be one of \('raster', 'checkerboard', 'grou"):
        PixelCNN(1, 2, order="zigzag")
    with pytest.raises(ValueError, match=r"in_channels must be divisible by sum\(color_groups\)"):
        PixelCNN(3, 4, color_groups=[1, 3])


# --- schedules -------------------------------------------------------------------------


def test_checkerboard_schedule_is_the_two_colours() -> None:
    schedule = checkerboard((4, 6))
    assert len(schedule) == 2
    assert schedule.rank.tolist() == [[(r + c) % 2 for c in range(6)] for r in range(4)]
    assert len(checkerboard((1, 1))) == 1


def _small_board(**kw) -> PixelCNN:
    torch.manual_seed(0)
    model = PixelCNN(kw.pop("channels", 1), 4, hidden_channels=12, num_layers=3, **kw)
    return perturb_(model, 0.3).eval()


def test_schedules_are_refused_for_the_other_order() -> None:
    board = _small_board(order="checkerboard", kernel_size=5)
    plain = _small_board(kernel_size=5)
    x = torch.randint(0, 4, (1, 1, 5, 5))
    for name in ("raster", "wavefront"):
        with pytest.raises(ValueError, match="not exact for a model built with order='checkerb"):
            sample(board, (1, 1, 5, 5), schedule=name)
        with pytest.raises(ValueError, match="not exact for a model built with order='checkerb"):
            codec.encode(board, x, schedule=name)
    with pytest.raises(ValueError, match="exact only for a model built with order='checkerboard'"):
        sample(plain, (1, 1, 5, 5), schedule="checkerboard")
    with pytest.raises(ValueError, match="no wavefront is exact"):
        model_slope(board)
    with pytest.raises(ValueError, match="no wavefront is exact"):
        wavefront(board, (5, 5))
    # "auto" is each model's own order.
    assert IncrementalEvaluator(board, 1, (5, 5)).schedule.name == "checkerboard"
    assert IncrementalEvaluator(plain, 1, (8, 8)).schedule.name == "wavefront, slope 3"


BOARD_MODELS = [
    ("G1", dict(order="checkerboard")),
    ("G3", dict(order="checkerboard", channels=3)),
    ("uneven", dict(order="checkerboard", channels=3, color_groups=[1, 2])),
    ("bottleneck", dict(order="checkerboard", block="bottleneck", hidden_channels=12)),
    ("labels", dict(order="checkerboard", num_classes=3)),
]


@pytest.mark.parametrize(("name", "options"), BOARD_MODELS, ids=[n for n, _ in BOARD_MODELS])
def test_checker_proves_the_checkerboard_models(name, options) -> None:
    options = dict(options)
    options.pop("hidden_channels", None)
    model = _small_board(**options)
    c = model.in_channels
    labels = torch.tensor([0, 1, 2]) if "num_classes" in options else None
    assert assert_causal(model, (3, c, 5, 6), schedule=checkerboard((5, 6)), labels=labels) == 2
    with pytest.raises(AssertionError, match="depends on input"):
        assert_causal(model, (3, c, 5, 6), labels=labels)  # not raster-causal


@pytest.mark.parametrize(("name", "options"), BOARD_MODELS, ids=[n for n, _ in BOARD_MODELS])
def test_evaluator_equals_forward_on_the_checkerboard(name, options) -> None:
    options = dict(options)
    options.pop("hidden_channels", None)
    model = _small_board(**options).double()
    c = model.in_channels
    x = torch.randint(0, 4, (2, c, 6, 7))
    labels = torch.tensor([0, 2]) if "num_classes" in options else None
    kwargs = {} if labels is None else {"labels": labels}
    full = model(x, **kwargs)
    ev = IncrementalEvaluator(model, 2, (6, 7), labels=labels)
    assert len(ev.schedule) == 2
    while not ev.done:
        at = ev.schedule[ev.step]
        values = x[:, :, at.rows, at.cols]
        for chans in ev.groups:  # the groups in order, as a decoder calls it
            partial = values.clone()
            partial[:, chans.stop or c :] = 0  # later groups not decoded yet
            got = ev.params(partial)[:, chans]
            assert torch.allclose(got, full[:, chans][..., at.rows, at.cols], atol=1e-10)
        ev.advance(values)


@pytest.mark.parametrize(
    ("name", "options"), BOARD_MODELS[:3], ids=[n for n, _ in BOARD_MODELS[:3]]
)
def test_checkerboard_sampling_and_coding_are_exact(name, options) -> None:
    model = _small_board(**options)
    c = model.in_channels
    a = sample(model, (3, c, 6, 5), generator=torch.Generator().manual_seed(1))
    b = sample(model, (3, c, 6, 5), generator=torch.Generator().manual_seed(1), method="naive")
    assert torch.equal(a, b)
    data = codec.encode(model, a)
    assert torch.equal(codec.decode(model, data), a)
    bits = -model.log_prob(a).sum().item() / torch.log(torch.tensor(2.0)).item()
    assert 8 * len(data) < bits + 8 * 80  # the NLL plus the header and CRCs


def test_uneven_raster_model_is_causal_and_exact() -> None:
    model = _small_board(channels=4, color_groups=[1, 1, 2], kernel_size=3).double()
    assert assert_causal(model, (3, 4, 4, 4)) == 16
    # Four groups are not [1, 1, 2]: channel 3 sees channel 2, one group with it there.
    four = _small_board(channels=4, kernel_size=3)
    with pytest.raises(
        AssertionError, match=r"channel 3 \[group 2\].*depends on input .*channel 2 \[group 2\]"
    ):
        assert_causal(four, (3, 4, 4, 4), color_groups=[1, 1, 2])
    x = torch.randint(0, 4, (2, 4, 5, 5))
    a = sample(model, (2, 4, 5, 5), generator=torch.Generator().manual_seed(3))
    b = sample(model, (2, 4, 5, 5), generator=torch.Generator().manual_seed(3), method="naive")
    assert torch.equal(a, b)
    assert torch.equal(codec.decode(model.float(), codec.encode(model.float(), x)), x)


@pytest.mark.parametrize("block", ["residual", "bottleneck", "gated"])
def test_uneven_groups_in_every_block_are_causal_and_exact(block) -> None:
    from maskedconv import GatedPixelCNN

    torch.manual_seed(0)
    if block == "gated":
        model = GatedPixelCNN(
            3, 4, hidden_channels=12, num_layers=2, kernel_size=3, color_groups=[1, 2]
        )
    else:
        model = PixelCNN(
            3, 4, hidden_channels=12, num_layers=2, kernel_size=3, color_groups=[1, 2], block=block
        )
    model = perturb_(model, 0.3).double().eval()
    assert model.color_groups == [1, 2]
    assert assert_causal(model, (3, 3, 4, 4)) == 16
    x = torch.randint(0, 4, (2, 3, 5, 4))
    full = model(x)
    ev = IncrementalEvaluator(model, 2, (5, 4), schedule="raster")
    while not ev.done:
        at = ev.schedule[ev.step]
        values = x[:, :, at.rows, at.cols]
        assert torch.allclose(ev.params(values), full[..., at.rows, at.cols], atol=1e-10)
        ev.advance(values)


def test_saved_checkerboard_and_uneven_models_load(tmp_path) -> None:
    for options in (dict(order="checkerboard"), dict(channels=4, color_groups=[1, 3])):
        model = _small_board(**options)
        model.save_pretrained(tmp_path / "m")
        loaded = PixelCNN.from_pretrained(tmp_path / "m")
        assert loaded.config == model.config
        x = torch.randint(0, 4, (2, model.in_channels, 5, 5))
        assert torch.equal(loaded.log_prob(x), model.log_prob(x))


# --- the checker against mutations ----------------------------------------------------


class _WideBlock(nn.Module):
    """A block that ignores the kernel size it is given: a 3x3 after the context."""

    def __init__(self, channels: int, kernel_size: int, **options: object) -> None:
        super().__init__()
        options.pop("num_classes", None)
        options.pop("cond_channels", None)
        self.conv = MaskedConv2d(channels, channels, 3, mask_type="B", **options)

    def forward(self, x, rows=None, cond=None):
        return x + torch.relu(self.conv(x)), rows


def test_mutation_a_3x3_layer_after_the_checkerboard_context_is_caught() -> None:
    context = MaskedConv2d(1, 8, 5, mask_type="checkerboard")
    stack = nn.Sequential(context, nn.ReLU(), MaskedConv2d(8, 8, 3, mask_type="B"))
    # An anchor reads a non-anchor, which read its anchor neighbours: anchors see each other.
    with pytest.raises(
        AssertionError, match=r"row 0, col 2, step 0\) depends on input .*row 0, col 0, step 0\)"
    ):
        assert_causal(stack, (3, 1, 6, 6), mask_type="A", schedule=checkerboard((6, 6)))
    # The same stack with a pointwise layer is proven.
    pointwise = nn.Sequential(context, nn.ReLU(), MaskedConv2d(8, 8, 1, mask_type="B"))
    assert assert_causal(pointwise, (3, 1, 6, 6), mask_type="A", schedule=checkerboard((6, 6))) == 2
    # And inside a model, as a block of one's own.
    from maskedconv import CausalUnit

    wide = type("WideBlock", (_WideBlock, CausalUnit), {})
    model = _small_board(order="checkerboard", block=wide)
    with pytest.raises(
        AssertionError, match=r"row 0, col 2, step 0\) depends on input .*row 0, col 0, step 0\)"
    ):
        assert_causal(model, (3, 1, 6, 6), schedule=checkerboard((6, 6)))


def test_mutation_an_anchor_that_sees_a_non_anchor_is_caught() -> None:
    # The mask function as a callable builds a plain conv: its odd taps read every pixel.
    plain = MaskedConv2d(1, 4, 3, mask_type=mask_checkerboard)
    with pytest.raises(AssertionError, match=r"row 0, col 0, step 0\) depends on input .*step 1\)"):
        assert_causal(plain, (3, 1, 4, 4), mask_type="A", schedule=checkerboard((4, 4)))
    gated = MaskedConv2d(1, 4, 3, mask_type="checkerboard")
    assert assert_causal(gated, (3, 1, 4, 4), mask_type="A", schedule=checkerboard((4, 4))) == 2


class _ContextWithSkip(nn.Module):
    """A checkerboard context plus a 1x1 path from the same pixel: ELIC's channel context."""

    def __init__(self, skip_mask: object) -> None:
        super().__init__()
        sizes = [1, 2]
        self.context = MaskedConv2d(3, 6, 3, mask_type="checkerboard", color_groups=sizes)
        self.skip = MaskedConv2d(3, 6, 1, mask_type=skip_mask, color_groups=sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.context(x) + self.skip(x)


def test_mutation_a_group_that_sees_a_later_group_is_caught() -> None:
    from maskedconv import mask_a

    def leaky(**kw):
        mask = mask_a(**kw)
        mask[0, 1, 0, 0] = 1  # output channel 0 (group 0) sees input channel 1 (group 1)
        return mask

    shape, board = (3, 3, 4, 4), checkerboard((4, 4))
    assert assert_causal(_ContextWithSkip("A"), shape, mask_type="A", schedule=board) == 2
    with pytest.raises(
        AssertionError,
        match=r"channel 0 \[group 0\], row 0, col 0, step 0\) depends on input \(image \d, "
        r"channel 1 \[group 1\], row 0, col 0, step 0\)",
    ):
        assert_causal(_ContextWithSkip(leaky), shape, mask_type="A", schedule=board)


def test_checker_names_the_step_count_of_a_custom_schedule() -> None:
    model = _small_board(order="checkerboard", kernel_size=3)
    board = checkerboard((4, 4))
    same = Schedule([board[0].tolist(), board[1].tolist()], (4, 4))
    assert assert_causal(model, (3, 1, 4, 4), schedule=same) == 2
    # Split in four (the anchors in two halves, the others in two): still exact.
    a, b = board[0].tolist(), board[1].tolist()
    four = Schedule([a[:4], a[4:], b[:4], b[4:]], (4, 4))
    assert assert_causal(model, (3, 1, 4, 4), schedule=four) == 4
    # Non-anchors first: wrong, and the message names both steps.
    swapped = Schedule([b, a], (4, 4))
    with pytest.raises(
        AssertionError, match=r"row 0, col 1, step 0\) depends on input .*row 0, col 0, step 1\)"
    ):
        assert_causal(model, (3, 1, 4, 4), schedule=swapped)


def test_an_evaluator_runs_with_autograd_after_a_sampler_under_inference_mode() -> None:
    # The schedule and the index tensors kept with its positions are shared: the sampler
    # (inference mode) makes them first, then an evaluator runs with gradients on (the
    # bottleneck's norm has trainable parameters), as CI's test order once did.
    torch.manual_seed(0)
    model = PixelCNN(3, 4, hidden_channels=12, num_layers=2, kernel_size=3, block="bottleneck")
    sample(model, (1, 3, 5, 3), schedule="raster", generator=torch.Generator().manual_seed(0))
    x = torch.randint(0, 4, (1, 3, 5, 3))
    ev = IncrementalEvaluator(model, 1, (5, 3), schedule="raster")
    at = ev.schedule[0]
    params = ev.params(x[:, :, at.rows, at.cols])
    assert params.requires_grad  # and no "inference tensors cannot be saved for backward"


def test_schedules_made_under_inference_mode_hold_normal_tensors() -> None:
    # A schedule is cached and shared: one first made by the sampler (inference mode)
    # must still feed torch.export or autograd (found by the contexts.md example).
    with torch.inference_mode():
        board = checkerboard((5, 9))
        front = raster((5, 9))
    for schedule in (board, front):
        assert not schedule.rank.is_inference()
        assert not schedule[0].rows.is_inference() and not schedule[0].cols.is_inference()


def test_checkerboard_model_has_no_blind_spot() -> None:
    # complete=True: every anchor within the kernel reaches a non-anchor, and every earlier
    # group of its own pixel reaches a group (the plain PixelCNN fails this in raster order).
    for options in (dict(kernel_size=5), dict(channels=3, color_groups=[1, 2], kernel_size=3)):
        model = _small_board(order="checkerboard", **options)
        c = model.in_channels
        board = checkerboard((5, 6))
        assert assert_causal(model, (3, c, 5, 6), schedule=board, complete=True) == 2


def test_uneven_groups_with_the_embedding_stem() -> None:
    # The stem's D channels per image channel follow their channel into its group.
    for sizes in ([1, 2], [2, 1]):
        torch.manual_seed(0)
        model = PixelCNN(
            3, 4, hidden_channels=12, num_layers=2, kernel_size=3, input="embedding",
            embedding_dim=4, color_groups=sizes,
        )  # fmt: skip
        assert assert_causal(perturb_(model, 0.3), (3, 3, 4, 4)) == 16


def test_the_plain_loop_feeds_every_row_to_a_checkerboard_model() -> None:
    # A non-anchor sees the anchor below it: the plain loop must not crop the rows below a
    # step (as it may for a raster model), or a finer schedule computes other parameters.
    from maskedconv import FullForwardEvaluator

    model = _small_board(order="checkerboard", kernel_size=3)
    assert not model.causal_rows and _small_board(kernel_size=3).causal_rows
    board = checkerboard((4, 4))
    a, b = board[0].tolist(), board[1].tolist()
    four = Schedule([a[:4], a[4:], b[:4], b[4:]], (4, 4))
    x = torch.randint(0, 4, (2, 1, 4, 4))
    naive = FullForwardEvaluator(model, 2, (4, 4), schedule=four)
    cached = IncrementalEvaluator(model, 2, (4, 4), schedule=four)
    with torch.no_grad():
        for t in range(4):
            at = four[t]
            values = x[:, :, at.rows, at.cols]
            assert torch.allclose(naive.params(values), cached.params(values), atol=1e-5), t
            naive.advance(values)
            cached.advance(values)
