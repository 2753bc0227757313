"""The group checkerboard (ELIC's space-channel context): colour groups decoded one after
another, each as a checkerboard, in 2G steps.

The mask and the layer are checked against brute forces written from the definition; the
models by the checker (which also refuses the wrong orders and the mutations), and their
evaluators, samplers and codec streams against their forward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pixelcnn_models import brute_groups, perturb_
from torch import nn

from maskedconv import (
    ConvUnit,
    FullForwardEvaluator,
    GatedPixelCNN,
    IncrementalEvaluator,
    MaskedConv2d,
    PixelCNN,
    Schedule,
    assert_causal,
    checkerboard,
    codec,
    group_checkerboard,
    mask_a,
    mask_checkerboard,
    mask_group_checkerboard,
    model_slope,
    sample,
)


def brute_mask(out_c: int, in_c: int, kh: int, kw: int, sizes: list[int]) -> torch.Tensor:
    """Output group g: every tap of an earlier group, the odd taps of its own."""
    go, gi = brute_groups(out_c, sizes), brute_groups(in_c, sizes)
    mask = torch.zeros(out_c, in_c, kh, kw)
    for o in range(out_c):
        for i in range(in_c):
            for a in range(kh):
                for b in range(kw):
                    odd = (a - kh // 2 + b - kw // 2) % 2 != 0
                    mask[o, i, a, b] = float(gi[i] < go[o] or (gi[i] == go[o] and odd))
    return mask


def brute_conv(conv: MaskedConv2d, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Pixel by pixel: an input of the output's own group is read at an anchor only."""
    weight = (conv.weight * conv.mask).detach()
    batch, in_c, height, width = x.shape
    out_c, _, kh, kw = weight.shape
    go, gi = brute_groups(out_c, sizes), brute_groups(in_c, sizes)
    own = torch.tensor([[float(go[o] == gi[i]) for i in range(in_c)] for o in range(out_c)])
    out = conv.bias.detach().view(1, -1, 1, 1).repeat(batch, 1, height, width)
    for r in range(height):
        for c in range(width):
            for a in range(kh):
                for b in range(kw):
                    qr, qc = r + a - kh // 2, c + b - kw // 2
                    if not (0 <= qr < height and 0 <= qc < width):
                        continue
                    w = weight[:, :, a, b]
                    if (qr + qc) % 2:  # not an anchor: its own group is not read there
                        w = w * (1 - own)
                    out[:, :, r, c] += x[:, :, qr, qc] @ w.t()
    return out


SIZES = st.sampled_from([[1], [1, 1, 1], [1, 2], [2, 1, 1], [1, 1, 2]])


@settings(max_examples=40, deadline=None)
@given(
    sizes=SIZES,
    k=st.sampled_from([(1, 1), (3, 3), (5, 5), (3, 5)]),
    out_mult=st.integers(1, 3),
    in_mult=st.integers(1, 2),
)
def test_mask_matches_brute_force(sizes, k, out_mult, in_mult) -> None:
    out_c, in_c = out_mult * sum(sizes), in_mult * sum(sizes)
    options = dict(out_channels=out_c, in_channels=in_c, kernel_size=k, color_groups=sizes)
    got = mask_group_checkerboard(**options).float()
    assert torch.equal(got, brute_mask(out_c, in_c, *k, sizes))
    if len(sizes) == 1:  # one group: the checkerboard
        assert torch.equal(got, mask_checkerboard(**options).float())


@pytest.mark.parametrize(
    ("sizes", "k", "channels"), [([1], 3, (1, 2)), ([1, 1, 1], 3, (3, 6)), ([1, 2], 5, (3, 6))]
)
def test_conv_matches_brute_force(sizes, k, channels) -> None:
    torch.manual_seed(0)
    conv = MaskedConv2d(*channels, k, mask_type="group-checkerboard", color_groups=sizes)
    conv = conv.double()
    x = torch.randn(2, channels[0], 5, 6, dtype=torch.float64)
    assert torch.allclose(conv(x), brute_conv(conv, x, sizes), atol=1e-12)


def test_masked_weights_get_no_gradient_and_even_dilation_is_refused() -> None:
    conv = MaskedConv2d(3, 6, 3, mask_type="group-checkerboard", color_groups=3)
    conv(torch.randn(1, 3, 5, 5)).sum().backward()
    assert conv.weight.grad is not None
    assert conv.weight.grad[conv.mask == 0].eq(0).all()
    assert conv.weight.grad[conv.mask == 1].ne(0).all()
    with pytest.raises(ValueError, match="dilation must be odd for mask_type='group-checkerb"):
        MaskedConv2d(3, 6, 3, mask_type="group-checkerboard", color_groups=3, dilation=2)


def test_schedule_is_each_group_in_two_steps() -> None:
    schedule = group_checkerboard((4, 6), 3)
    assert len(schedule) == 6 and schedule.group_passes == 3
    assert [schedule.group(t) for t in range(6)] == [0, 0, 1, 1, 2, 2]
    board = checkerboard((4, 6))
    assert list(schedule) == [*list(board)] * 3
    ranks = schedule.group_rank
    assert ranks.shape == (3, 4, 6)
    for g in range(3):
        assert torch.equal(ranks[g], board.rank + 2 * g)
    assert len(group_checkerboard((3, 3), [1, 1, 2])) == 6
    assert len(group_checkerboard((1, 1), 2)) == 2
    assert board.group(1) is None and board.group_passes == 1
    with pytest.raises(IndexError, match="step 6 is outside the 6 steps"):
        schedule[6]
    assert "6 steps" in repr(schedule)


def _model(**kw) -> PixelCNN:
    torch.manual_seed(0)
    options = dict(hidden_channels=12, num_layers=3, kernel_size=3, order="group-checkerboard")
    options.update(kw)
    model = PixelCNN(options.pop("channels", 3), 4, **options)
    return perturb_(model, 0.3).eval()


MODELS = [
    ("G3", dict()),
    ("uneven", dict(channels=4, color_groups=[1, 1, 2], hidden_channels=32)),
    ("G1", dict(channels=1)),
    ("bottleneck k5", dict(block="bottleneck", kernel_size=5)),
    ("labels", dict(num_classes=3)),
]


@pytest.mark.parametrize(("name", "options"), MODELS, ids=[n for n, _ in MODELS])
def test_checker_proves_the_models_and_refuses_the_pixel_order(name, options) -> None:
    model = _model(**options)
    c = model.in_channels
    groups = model.color_groups
    labels = torch.tensor([0, 1, 2]) if "num_classes" in options else None
    schedule = group_checkerboard((5, 6), groups)
    steps = assert_causal(model, (3, c, 5, 6), schedule=schedule, labels=labels, complete=True)
    assert steps == len(schedule) == 2 * (len(groups) if isinstance(groups, list) else groups)
    if len(schedule) > 2:  # pixel-major, a later group's anchor sees an earlier group's rest
        with pytest.raises(
            AssertionError,
            match=r"\[group 1\], row 0, col 0, step 0\) depends on input .*\[group 0\], "
            r"row \d, col \d, step 1\)",
        ):
            assert_causal(model, (3, c, 5, 6), schedule=checkerboard((5, 6)), labels=labels)


@pytest.mark.parametrize(("name", "options"), MODELS, ids=[n for n, _ in MODELS])
def test_evaluator_equals_forward(name, options) -> None:
    model = _model(**options).double()
    c = model.in_channels
    x = torch.randint(0, 4, (2, c, 6, 7))
    labels = torch.tensor([0, 2]) if "num_classes" in options else None
    kwargs = {} if labels is None else {"labels": labels}
    full = model(x, **kwargs)
    ev = IncrementalEvaluator(model, 2, (6, 7), labels=labels)
    assert ev.schedule.group_passes == len(ev._groups)
    seen = 0
    while not ev.done:
        at = ev.schedule[ev.step]
        (chans,) = ev.groups  # one group a step
        assert chans == ev._groups[ev.schedule.group(ev.step) or 0]
        values = x[:, :, at.rows, at.cols].clone()
        values[:, chans.start :] = 0  # this group and the later ones not decoded yet
        got = ev.params(values)[:, chans]
        assert torch.allclose(got, full[:, chans][..., at.rows, at.cols], atol=1e-10)
        values[:, chans] = x[:, chans][:, :, at.rows, at.cols]
        ev.advance(values)
        seen += len(at)
    assert seen == len(ev._groups) * 6 * 7


def test_a_step_of_anchors_and_non_anchors_is_exact() -> None:
    # Each pass: the anchors of rows 0-1; row 0's non-anchors with the anchors of rows 2-3
    # (one step of both kinds); the other non-anchors. Exact for a 3x3 context.
    model = _model(kernel_size=3).double()
    board = checkerboard((4, 4))
    anchors, rest = board[0].tolist(), board[1].tolist()
    steps = [
        [p for p in anchors if p[0] < 2],
        [p for p in rest if p[0] == 0] + [p for p in anchors if p[0] >= 2],
        [p for p in rest if p[0] > 0],
    ]
    mixed = Schedule(steps, (4, 4), "mixed").by_group(3)
    assert assert_causal(model, (3, 3, 4, 4), schedule=mixed) == 9
    x = torch.randint(0, 4, (2, 3, 4, 4))
    full = model(x)
    cached = IncrementalEvaluator(model, 2, (4, 4), schedule=mixed)
    naive = FullForwardEvaluator(model, 2, (4, 4), schedule=mixed)
    while not cached.done:
        at = cached.schedule[cached.step]
        (chans,) = cached.groups
        values = x[:, :, at.rows, at.cols].clone()
        values[:, chans.start :] = 0
        for ev in (cached, naive):
            got = ev.params(values)[:, chans]
            assert torch.allclose(got, full[:, chans][..., at.rows, at.cols], atol=1e-10)
        values[:, chans] = x[:, chans][:, :, at.rows, at.cols]
        cached.advance(values)
        naive.advance(values)


@pytest.mark.parametrize(("name", "options"), MODELS[:3], ids=[n for n, _ in MODELS[:3]])
def test_sampling_and_coding_are_exact(name, options) -> None:
    model = _model(**options)
    c = model.in_channels
    a = sample(model, (3, c, 6, 5), generator=torch.Generator().manual_seed(1))
    b = sample(model, (3, c, 6, 5), generator=torch.Generator().manual_seed(1), method="naive")
    assert torch.equal(a, b)
    data = codec.encode(model, a)
    assert torch.equal(codec.decode(model, data), a)
    bits = -model.log_prob(a).sum().item() / torch.log(torch.tensor(2.0)).item()
    assert 8 * len(data) < bits + 8 * 80  # the NLL plus the header and CRCs
    # Completion keeps the known sub-pixels and draws the rest in the same steps.
    known = torch.zeros_like(a, dtype=torch.bool)
    known[:, 0] = True
    done = sample(model, x=a, known=known, generator=torch.Generator().manual_seed(2))
    assert torch.equal(done[:, 0], a[:, 0])


def test_the_wrong_orders_are_refused() -> None:
    grouped = _model()
    board = _model(order="checkerboard")
    x = torch.randint(0, 4, (1, 3, 5, 5))
    for name in ("raster", "wavefront"):
        with pytest.raises(ValueError, match="not exact for a model built with order='group-"):
            sample(grouped, (1, 3, 5, 5), schedule=name)
    with pytest.raises(ValueError, match="exact only for a model built with order='checkerboard'"):
        sample(grouped, (1, 3, 5, 5), schedule="checkerboard")
    with pytest.raises(ValueError, match="exact only for a model built with order='group-check"):
        codec.encode(board, x, schedule="group-checkerboard")
    with pytest.raises(ValueError, match=r"group_checkerboard\(\(H, W\), G\) \(2G steps\)"):
        model_slope(grouped)
    with pytest.raises(ValueError, match="decodes 2 colour groups one after another, but the m"):
        IncrementalEvaluator(grouped, 1, (5, 5), schedule=group_checkerboard((5, 5), 2))
    gated = GatedPixelCNN(3, 4, hidden_channels=12, num_layers=2, kernel_size=3)
    with pytest.raises(ValueError, match=r"a row stream .* cannot follow"):
        IncrementalEvaluator(gated, 1, (5, 5), schedule=group_checkerboard((5, 5), 3))
    # A checkerboard model decoded group by group: group 0's rest sees group 1's anchors.
    with pytest.raises(AssertionError, match=r"\[group 0\], row 0, col 1, step 1\) depends on"):
        assert_causal(board, (3, 3, 5, 5), schedule=group_checkerboard((5, 5), 3))
    assert IncrementalEvaluator(grouped, 1, (5, 5)).schedule.name == "group checkerboard, 3 groups"


class _ContextWithSkip(nn.Module):
    """A group-checkerboard context plus a 1x1 path from the same pixel."""

    def __init__(self, skip_mask: object) -> None:
        super().__init__()
        self.context = MaskedConv2d(3, 6, 3, mask_type="group-checkerboard", color_groups=3)
        self.skip = MaskedConv2d(3, 6, 1, mask_type=skip_mask, color_groups=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.context(x) + self.skip(x)


def test_mutation_a_group_that_sees_a_later_group_is_caught() -> None:
    def leaky(**kw):
        mask = mask_a(**kw)
        mask[0, 1, 0, 0] = 1  # output channel 0 (group 0) sees input channel 1 (group 1)
        return mask

    shape, order = (3, 3, 4, 4), group_checkerboard((4, 4), 3)
    assert assert_causal(_ContextWithSkip("A"), shape, mask_type="A", schedule=order) == 6
    with pytest.raises(
        AssertionError,
        match=r"channel 0 \[group 0\], row 0, col 0, step 0\) depends on input \(image \d, "
        r"channel 1 \[group 1\], row 0, col 0, step 2\)",
    ):
        assert_causal(_ContextWithSkip(leaky), shape, mask_type="A", schedule=order)


def test_mutation_an_anchor_that_sees_its_own_groups_rest_is_caught() -> None:
    # The mask function as a callable: a plain conv, whose odd taps read every pixel.
    plain = MaskedConv2d(3, 6, 3, mask_type=mask_group_checkerboard, color_groups=3)
    with pytest.raises(
        AssertionError,
        match=r"\[group 0\], row 0, col 0, step 0\) depends on input .*\[group 0\], row \d, "
        r"col \d, step 1\)",
    ):
        assert_causal(plain, (3, 3, 4, 4), mask_type="A", schedule=group_checkerboard((4, 4), 3))


def test_saved_model_loads_and_decodes(tmp_path) -> None:
    model = _model(channels=4, color_groups=[1, 1, 2], hidden_channels=16)
    model.save_pretrained(tmp_path / "m")
    loaded = PixelCNN.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and loaded.order == "group-checkerboard"
    x = torch.randint(0, 4, (2, 4, 5, 5))
    assert torch.equal(loaded.log_prob(x), model.log_prob(x))
    assert torch.equal(codec.decode(loaded, codec.encode(model, x)), x)


def _earlier_groups_everywhere(**given) -> torch.Tensor:
    """A k x k mask: every tap of the earlier groups, the centre of the own group."""
    from maskedconv._masks import channel_groups

    out_c, in_c, (kh, kw) = given["out_channels"], given["in_channels"], given["kernel_size"]
    go = channel_groups(out_c, given["color_groups"], given["group_layout"])
    gi = channel_groups(in_c, given["color_groups"], given["group_layout"])
    mask = (gi[None, :] < go[:, None]).view(out_c, in_c, 1, 1).repeat(1, 1, kh, kw)
    mask[:, :, kh // 2, kw // 2] = gi[None, :] <= go[:, None]
    return mask


class _WideEarlierGroups(ConvUnit):
    """A 3x3 unit after the context that reads the earlier groups everywhere: exact
    group-major, and it keeps a cache, so the evaluator reruns it to store final values."""

    def __init__(self, channels: int, kernel_size: int, **options: object) -> None:
        groups = options["color_groups"]
        conv = MaskedConv2d(channels, channels, 3, mask_type=_earlier_groups_everywhere,
                            color_groups=groups)  # fmt: skip
        super().__init__(conv)


def test_a_unit_with_a_cache_after_the_context_is_exact() -> None:
    model = _model(block=_WideEarlierGroups).double()
    order = group_checkerboard((5, 6), 3)
    assert assert_causal(model, (3, 3, 5, 6), schedule=order) == 6
    ev = IncrementalEvaluator(model, 2, (5, 6))
    assert not all(step.stateless for step in ev._steps[1:])  # the rerun path
    x = torch.randint(0, 4, (2, 3, 5, 6))
    full = model(x)
    while not ev.done:
        at = ev.schedule[ev.step]
        (chans,) = ev.groups
        values = x[:, :, at.rows, at.cols].clone()
        values[:, chans.start :] = 0
        got = ev.params(values)[:, chans]
        assert torch.allclose(got, full[:, chans][..., at.rows, at.cols], atol=1e-10)
        values[:, chans] = x[:, chans][:, :, at.rows, at.cols]
        ev.advance(values)
    a = sample(model.float(), (2, 3, 5, 6), generator=torch.Generator().manual_seed(4))
    b = sample(model, (2, 3, 5, 6), generator=torch.Generator().manual_seed(4), method="naive")
    assert torch.equal(a, b)
