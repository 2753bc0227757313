"""Causality proofs: zero dependence on every input a sub-pixel must not see.

A single layer must also depend on every tap its mask keeps (so a mask cannot be
wrong by having extra zeros); whole PixelCNNs must depend on the previous pixel, the
pixel above and the earlier groups at the same pixel.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pixelcnn_models import build
from torch import nn

from maskedconv import MaskedConv2d, PixelCNN, allowed_dependencies, assert_causal


def jacobian(fn, shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return torch.autograd.functional.jacobian(fn, x)


def expected_support(conv: MaskedConv2d, h: int, w: int, kind: str) -> torch.Tensor:
    """Reference, written from DESIGN.md directly: (O, H, W, I, H, W) bool."""
    o_c, i_c = conv.out_channels, conv.in_channels
    g = conv.color_groups
    kh, kw = conv.kernel_size
    dil_h, dil_w = conv.dilation

    def group(c: int, n: int) -> int:
        return c // (n // g) if conv.group_layout == "blocked" else c % g

    out = torch.zeros(o_c, h, w, i_c, h, w, dtype=torch.bool)
    for o in range(o_c):
        for i in range(i_c):
            for r in range(h):
                for c in range(w):
                    for y in range(kh):
                        for x in range(kw):
                            dy, dx = y - kh // 2, x - kw // 2
                            qr, qc = r + dy * dil_h, c + dx * dil_w
                            if not (0 <= qr < h and 0 <= qc < w):
                                continue
                            if dy < 0 or (dy == 0 and dx < 0):
                                ok = True
                            elif dy == 0 and dx == 0:
                                go, gi = group(o, o_c), group(i, i_c)
                                ok = gi < go if kind == "A" else gi <= go
                            else:
                                ok = False
                            out[o, r, c, i, qr, qc] |= ok
    return out


@given(
    kind=st.sampled_from(["A", "B"]),
    groups=st.integers(1, 4),
    out_mult=st.integers(1, 2),
    in_mult=st.integers(1, 2),
    k=st.sampled_from([1, 3, 5, 7, (3, 5), (5, 3)]),
    dilation=st.sampled_from([1, 2]),
    layout=st.sampled_from(["blocked", "interleaved"]),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
)
def test_conv_depends_exactly_on_allowed_taps(
    kind: str,
    groups: int,
    out_mult: int,
    in_mult: int,
    k: object,
    dilation: int,
    layout: str,
    h: int,
    w: int,
) -> None:
    conv = MaskedConv2d(
        groups * in_mult,
        groups * out_mult,
        k,
        dilation=dilation,
        mask_type=kind,
        color_groups=groups,
        group_layout=layout,
        dtype=torch.float64,
    )
    with torch.no_grad():  # every kept weight clearly non-zero, every masked one zero
        conv.weight.copy_((torch.rand_like(conv.weight) + 0.5) * conv.mask)
    support = expected_support(conv, h, w, kind)
    if support.any():
        assert_causal(conv, (1, conv.in_channels, h, w))
    else:  # nothing to see (a 1x1 type-A conv, G = 1): a pass would be vacuous
        with pytest.raises(AssertionError, match="the check would pass vacuously"):
            assert_causal(conv, (1, conv.in_channels, h, w))
    jac = jacobian(conv, (1, conv.in_channels, h, w))[0, :, :, :, 0]  # (O, H, W, I, H, W)
    assert torch.equal(jac != 0, support)


@pytest.mark.parametrize("kind", ["A", "B"])
def test_allowed_dependencies_matches_reference(kind: str) -> None:
    conv = MaskedConv2d(6, 6, 9, mask_type=kind, color_groups=3)  # kernel covers the image
    ref = expected_support(conv, 4, 4, kind)
    ours = allowed_dependencies(6, 6, 4, 4, mask_type=kind, color_groups=3)
    assert torch.equal(ours, ref)


pixelcnn_configs = st.fixed_dictionaries(
    {
        "in_channels": st.sampled_from([1, 3]),
        "levels": st.integers(2, 4),
        "num_layers": st.integers(1, 4),
        "kernel_size": st.sampled_from([3, 5]),
        "grouped": st.booleans(),
        "group_layout": st.sampled_from(["blocked", "interleaved"]),
        "block": st.sampled_from(["residual", "bottleneck"]),
        "size": st.integers(2, 6),
    }
)


def check_pixelcnn(model: PixelCNN, size: int) -> None:
    c = model.in_channels
    assert_causal(model, (2, c, size, size))
    # And it is not causal by being blind: it sees the pixel to the left, the pixel
    # above, and the earlier groups at its own pixel.
    m = _float64(model)
    jac = jacobian(m.forward_features, (1, c, size, size))  # (1, C, K, H, W, 1, C, H, W)
    dep = jac.abs().sum(dim=(0, 2, 5))  # (C, H, W, C, H, W)
    last = size - 1
    assert dep[:, last, last, :, last, last - 1].sum() > 0
    assert dep[:, last, last, :, last - 1, last].sum() > 0
    if model.color_groups > 1:
        for later in range(1, c):
            assert dep[later, last, last, :later, last, last].sum() > 0


def _float64(model: PixelCNN) -> PixelCNN:
    import copy

    return copy.deepcopy(model).to(torch.float64)


@given(cfg=pixelcnn_configs)
def test_fresh_pixelcnn_is_causal(cfg: dict) -> None:
    check_pixelcnn(build(cfg), cfg["size"])


@given(cfg=pixelcnn_configs)
def test_pixelcnn_is_causal_after_optimizer_steps(cfg: dict) -> None:
    model = build(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x = torch.randint(
        0,
        cfg["levels"],
        (4, cfg["in_channels"], cfg["size"], cfg["size"]),
        generator=torch.Generator().manual_seed(1),
    )
    for _ in range(3):
        opt.zero_grad()
        (-model.log_prob(x).mean()).backward()
        opt.step()
    check_pixelcnn(model, cfg["size"])


@given(cfg=pixelcnn_configs)
def test_pixelcnn_is_causal_after_loading_non_causal_weights(cfg: dict) -> None:
    model = build(cfg)
    state = model.state_dict()
    for name, value in state.items():
        if name.endswith("weight") and value.dim() == 4:
            state[name] = torch.randn_like(value)  # masked taps now non-zero
    model.load_state_dict(state)
    check_pixelcnn(model, cfg["size"])


def test_detects_unmasked_conv() -> None:
    with pytest.raises(AssertionError) as info:
        assert_causal(nn.Conv2d(1, 1, 3, padding=1), (1, 1, 3, 3))
    assert "output (image 0, channel 0 [group 0], row 0, col 0) depends on input " in str(
        info.value
    )
    assert "input (image 0, channel 0 [group 0], row 0, col 0), which it must not see" in str(
        info.value
    )


def test_detects_type_b_when_type_a_is_required() -> None:
    conv = MaskedConv2d(3, 3, 3, mask_type="B", color_groups=3)
    assert_causal(conv, (1, 3, 3, 3))  # checked as its own type, B
    with pytest.raises(
        AssertionError,
        match=r"channel 0 \[group 0\], row 0, col 0\) depends on input \(image 0, channel 0 \[group 0\], row 0, col 0\)",
    ):
        assert_causal(conv, (1, 3, 3, 3), mask_type="A")


def test_detects_wrong_rgb_order() -> None:
    # B order reversed: output group 0 (R) sees group 2 (B) at the same pixel.
    def reversed_b(*, out_channels, in_channels, kernel_size, color_groups, group_layout):
        from maskedconv import mask_b

        return mask_b(
            out_channels=out_channels,
            in_channels=in_channels,
            kernel_size=kernel_size,
            color_groups=color_groups,
            group_layout=group_layout,
        ).flip(0, 1)

    conv = MaskedConv2d(3, 3, 1, mask_type=reversed_b, color_groups=3)
    with pytest.raises(
        AssertionError,
        match=r"channel 0 \[group 0\].*depends on input \(image 0, channel 1 \[group 1\]",
    ):
        assert_causal(conv, (1, 3, 2, 2), mask_type="B")


def test_detects_leak_across_the_batch() -> None:
    class MixesImages(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = MaskedConv2d(1, 2, 3, mask_type="A")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)
            return h + h.roll(1, dims=0)  # causal within an image, but mixes images

    net = MixesImages()
    # The checker takes 3 images: image 0 is mixed with image 2 (roll by one).
    with pytest.raises(AssertionError, match=r"output \(image 0, .* depends on input \(image 2"):
        assert_causal(net, (2, 1, 3, 3))


def test_detects_leak_through_reflect_padding_of_a_user_layer() -> None:
    class Leaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = MaskedConv2d(1, 1, 3, mask_type="A")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
            return nn.functional.conv2d(padded, self.conv.weight * self.conv.mask)

    with pytest.raises(AssertionError, match="depends on input"):
        assert_causal(Leaky(), (1, 1, 4, 4))


def test_bad_input_shape() -> None:
    with pytest.raises(
        ValueError,
        match=r"input_shape must be \(B, C, H, W\) or \(C, H, W\) of positive ints, but got \(3, 3\)",
    ):
        assert_causal(MaskedConv2d(1, 1, 3), (3, 3))


HEAD_STEM_CASES = [
    (1, 3, "categorical", "scaled", None),
    (1, 7, "categorical", "embedding", None),
    (1, 16, "dmol", "scaled", None),
    (1, 16, "dmol", "embedding", None),
    (3, 3, "categorical", "scaled", 3),
    (3, 3, "categorical", "embedding", 3),
    (3, 3, "categorical", "embedding", 1),
    (3, 5, "dmol", "scaled", 1),
    (3, 5, "dmol", "embedding", 1),
]


@pytest.mark.parametrize("layout", ["blocked", "interleaved"])
@pytest.mark.parametrize(("c", "k", "head", "stem", "groups"), HEAD_STEM_CASES)
def test_every_head_and_stem_is_causal_through_forward(
    c: int, k: int, head: str, stem: str, groups: int | None, layout: str
) -> None:
    torch.manual_seed(0)
    model = PixelCNN(
        c,
        k,
        hidden_channels=6 * c,
        num_layers=2,
        kernel_size=3,
        head=head,
        input=stem,
        color_groups=groups,
        group_layout=layout,
        num_mixtures=2,
    )
    assert_causal(model, (2, c, 4, 4))
    # An independent oracle: change one sub-pixel's value at a time.
    seen = dependence_by_single_changes(model.double(), k, (c, 4, 4))  # (C_out, H, W, C, H, W)
    groups = model.color_groups
    allowed = allowed_dependencies(
        seen.shape[0], c, 4, 4, mask_type="A", color_groups=groups, group_layout=layout
    )
    assert not (seen & ~allowed).any()
    assert seen[:, 3, 3, :, 3, 2].any() and seen[:, 3, 3, :, 2, 3].any()  # left and above
    if groups > 1:
        out_group = torch.arange(seen.shape[0]) // (seen.shape[0] // groups)
        if layout == "interleaved":
            out_group = torch.arange(seen.shape[0]) % groups
        last = out_group == groups - 1
        assert seen[last, 3, 3][:, :, 3, 3].any()  # B sees R and G at its own pixel
    model.float()
    # The same model with a type-B first layer sees its own sub-pixel: caught.
    leaky = MaskedConv2d(
        model.trunk[0].conv.in_channels,
        model.trunk[0].conv.out_channels,
        3,
        mask_type="B",
        color_groups=model.color_groups,
        group_layout=layout,
    )
    with torch.no_grad():
        leaky.weight.copy_(model.trunk[0].conv.weight)
        leaky.weight[:, :, 1, 1] = 0.5
    model.trunk[0].conv = leaky
    leak = dependence_by_single_changes(model.double(), k, (c, 4, 4)) & ~allowed
    assert leak.any()  # the oracle sees it too
    model.float()
    # Named as an output that depends on an input of its own pixel.
    with pytest.raises(
        AssertionError,
        match=r"row (\d), col (\d)\) depends on input \(image \d, channel \d \[group \d\], "
        r"row \1, col \2\)",
    ):
        assert_causal(model, (2, c, 4, 4))


def dependence_by_single_changes(model: nn.Module, levels: int, shape: tuple) -> torch.Tensor:
    """Which outputs move when one input sub-pixel changes, each change alone.

    Every changed image is its own batch entry; returns (C_out, H, W, C, H, W) bool. A
    float64 conv may sum in another order at another batch size, so "moved" means by
    more than 1e-9: a real dependence moves an output by far more.
    """
    c, h, w = shape
    x = torch.randint(0, levels, (1, *shape), generator=torch.Generator().manual_seed(2))
    changed = []
    for shift in range(1, min(levels, 3)):
        for index in range(c * h * w):
            y = x.clone().flatten()
            y[index] = (y[index] + shift) % levels
            changed.append(y.view(1, *shape))
    with torch.no_grad():
        base = model(x)
        out = model(torch.cat(changed))  # (N, C_out, *extra, H, W)
    moved = ((out - base).abs() > 1e-9).reshape(len(changed), out.shape[1], -1, h, w).any(2)
    moved = moved.view(-1, c * h * w, out.shape[1], h, w).any(0)  # (C*H*W, C_out, H, W)
    return moved.permute(1, 2, 3, 0).reshape(out.shape[1], h, w, c, h, w)


class EmbeddingThenUnmaskedConv(nn.Module):
    """Fully non-causal: its Jacobian through the lookup is zero, yet it sees everything."""

    levels = 5

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.conv = nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.embed(x[:, 0]).permute(0, 3, 1, 2)).unsqueeze(1)


def test_a_non_causal_embedding_model_is_caught() -> None:
    with pytest.raises(
        AssertionError,
        match=r"output \(image 0, channel 0 \[group 0\], index 0 of|output \(image 0, channel 0 \[group 0\], row 0, col 0\) depends on input \(image 0, channel 0 \[group 0\], row 0, col 0\)",
    ):
        assert_causal(EmbeddingThenUnmaskedConv(), (2, 1, 3, 3))


def test_a_leak_across_the_batch_is_caught_through_forward() -> None:
    class Mixes(nn.Module):
        levels = 3

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = PixelCNN(1, 3, hidden_channels=8, num_layers=2, kernel_size=3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.model(x)
            return out + out.mean(0, keepdim=True)  # causal per image, mixes images

    with pytest.raises(AssertionError, match=r"output \(image 0, .* depends on input \(image 1"):
        assert_causal(Mixes(), (2, 1, 3, 3))


# --- the checker's own gaps, each closed ---------------------------------------------


def test_a_batchnorm_that_leaks_in_training_is_caught_after_eval() -> None:
    net = nn.Sequential(MaskedConv2d(1, 4, 3, mask_type="A"), nn.BatchNorm2d(4)).eval()
    with pytest.raises(AssertionError, match="depends on input"):
        assert_causal(net, (2, 1, 4, 4))
    assert not net.training  # the mode is restored


def test_a_leak_between_images_is_caught_with_a_batch_of_one() -> None:
    class Mixes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = MaskedConv2d(1, 2, 3, mask_type="A")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)
            return h + h.flip(0)

    # Checked with 3 images: flipped, image 0 meets image 2.
    with pytest.raises(AssertionError, match=r"depends on input \(image 2"):
        assert_causal(Mixes(), (1, 1, 3, 3))


def test_a_leak_only_in_float32_is_caught() -> None:
    class Float32Leak(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = MaskedConv2d(1, 1, 3, mask_type="A")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.conv(x)
            return out + x if x.dtype == torch.float32 else out

    with pytest.raises(AssertionError, match=r"in torch\.float32"):
        assert_causal(Float32Leak(), (2, 1, 3, 3))


def test_a_detached_statistic_is_caught() -> None:
    class Centred(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = MaskedConv2d(1, 2, 3, mask_type="A")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) - x.mean(dim=(1, 2, 3), keepdim=True).detach()

    with pytest.raises(AssertionError, match="its value changed"):
        assert_causal(Centred(), (2, 1, 3, 3))


def test_a_sequential_of_grouped_layers_is_checked_with_its_groups() -> None:
    opts = dict(color_groups=3)
    good = nn.Sequential(
        MaskedConv2d(3, 6, 3, mask_type="A", **opts),
        nn.ReLU(),
        MaskedConv2d(6, 6, 3, mask_type="B", **opts),
    )
    assert_causal(good, (1, 3, 4, 4))  # no false alarm: G = 3, type A inferred
    bad = nn.Sequential(
        MaskedConv2d(3, 6, 3, mask_type="A", **opts),
        nn.ReLU(),
        MaskedConv2d(6, 6, 3, mask_type="B", **opts),
        nn.Conv2d(6, 6, 1),  # mixes the groups at each pixel
    )
    with pytest.raises(
        AssertionError, match="which it must not see under mask type A with color_groups=3"
    ):
        assert_causal(bad, (1, 3, 4, 4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(mask_type="b"), "mask_type must be 'A' or 'B', but got 'b'"),
        (dict(mask_type="C"), "mask_type must be 'A' or 'B', but got 'C'"),
        (
            dict(color_groups=0),
            "color_groups must be a positive int or a non-empty list of positive group sizes, but got 0",
        ),
        (
            dict(group_layout="rows"),
            "group_layout must be one of ('blocked', 'interleaved'), but got 'rows'",
        ),
    ],
)
def test_bad_checker_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        assert_causal(MaskedConv2d(3, 3, 3, color_groups=3), (1, 3, 3, 3), **kwargs)
    assert message in str(info.value)


def test_an_image_smaller_than_the_reach_warns() -> None:
    with pytest.warns(UserWarning, match="smaller than the reach of the module's largest kernel"):
        assert_causal(MaskedConv2d(1, 1, 7, mask_type="A"), (1, 1, 3, 3))


def test_a_huge_jacobian_is_refused_before_it_is_built() -> None:
    net = nn.Sequential(MaskedConv2d(3, 300, 3, mask_type="A", color_groups=3))
    with pytest.raises(
        ValueError, match=r"the Jacobian at input_shape \(4, 3, 32, 32\) would take .* GiB"
    ):
        assert_causal(net, (4, 3, 32, 32))


def test_no_dependence_at_all_fails() -> None:
    class Blind(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(1, 2, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bias.expand(x.shape[0], 2, *x.shape[2:])

    with pytest.raises(AssertionError, match="the check would pass vacuously"):
        assert_causal(Blind(), (2, 1, 3, 3))


def test_input_channels_must_match_the_model() -> None:
    with pytest.raises(
        ValueError, match=r"input_shape must have 3 channels, the module's in_channels, but got 1"
    ):
        assert_causal(PixelCNN(3, 4, hidden_channels=12, num_layers=1), (1, 1, 4, 4))
