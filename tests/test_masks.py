"""Masks: equality with the design blog's rule, the drawn pictures, and the group semantics."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from maskedconv import make_mask, mask_a, mask_b
from maskedconv._masks import channel_groups, group_slices, spatial_mask


def blog_single_channel(kind: str, out_c: int, in_c: int, k: int) -> torch.Tensor:
    # The design blog's rule, written out independently of the library.
    m = torch.zeros(out_c, in_c, k, k)
    m[:, :, : k // 2, :] = 1
    m[:, :, k // 2, : k // 2 + (kind == "B")] = 1
    return m


def blog_rgb(kind: str, out_c: int, in_c: int, k: int) -> torch.Tensor:
    m = blog_single_channel("A", out_c, in_c, k)
    i3, o3 = in_c // 3, out_c // 3
    c = k // 2
    if kind == "A":
        m[o3 : 2 * o3, :i3, c, c] = 1
        m[2 * o3 :, : 2 * i3, c, c] = 1
    else:
        m[:o3, :i3, c, c] = 1
        m[o3 : 2 * o3, : 2 * i3, c, c] = 1
        m[2 * o3 :, :, c, c] = 1
    return m


@pytest.mark.parametrize("kind", ["A", "B"])
@pytest.mark.parametrize("k", [1, 3, 5, 7])
@pytest.mark.parametrize(("out_c", "in_c"), [(1, 1), (64, 1), (64, 64), (2, 64)])
def test_single_channel_equals_blog(kind: str, k: int, out_c: int, in_c: int) -> None:
    ours = make_mask(kind, out_channels=out_c, in_channels=in_c, kernel_size=(k, k))
    assert torch.equal(ours, blog_single_channel(kind, out_c, in_c, k))


@pytest.mark.parametrize("kind", ["A", "B"])
@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize(("out_c", "in_c"), [(3, 3), (120, 3), (120, 120), (12, 120), (6, 9)])
def test_rgb_blocked_equals_blog(kind: str, k: int, out_c: int, in_c: int) -> None:
    ours = make_mask(kind, out_channels=out_c, in_channels=in_c, kernel_size=(k, k), color_groups=3)
    assert torch.equal(ours, blog_rgb(kind, out_c, in_c, k))


def test_type_b_7x7_picture() -> None:
    drawn = torch.tensor(
        [
            [1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0],
        ],
        dtype=torch.float32,
    )
    b = make_mask("B", out_channels=1, in_channels=1, kernel_size=(7, 7))[0, 0]
    a = make_mask("A", out_channels=1, in_channels=1, kernel_size=(7, 7))[0, 0]
    assert torch.equal(b, drawn)
    drawn[3, 3] = 0
    assert torch.equal(a, drawn)


def test_rectangular_kernel() -> None:
    m = spatial_mask((3, 5), include_center=True).int()
    assert m.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]
    m = spatial_mask((5, 3), include_center=False).int()
    assert m.tolist() == [[1, 1, 1], [1, 1, 1], [1, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_interleaved_groups() -> None:
    assert channel_groups(6, 3, "interleaved").tolist() == [0, 1, 2, 0, 1, 2]
    assert channel_groups(6, 3, "blocked").tolist() == [0, 0, 1, 1, 2, 2]
    m = mask_b(
        out_channels=6,
        in_channels=6,
        kernel_size=(3, 3),
        color_groups=3,
        group_layout="interleaved",
    )
    centre = m[:, :, 1, 1].int()
    # out channel o (group o % 3) sees in channel i (group i % 3) iff i % 3 <= o % 3
    expected = torch.tensor([[int(i % 3 <= o % 3) for i in range(6)] for o in range(6)])
    assert torch.equal(centre, expected)


@pytest.mark.parametrize("layout", ["blocked", "interleaved"])
@pytest.mark.parametrize(("channels", "groups"), [(1, 1), (6, 3), (12, 4), (8, 2)])
def test_group_slices_agree_with_channel_groups(channels: int, groups: int, layout: str) -> None:
    of_group = channel_groups(channels, groups, layout)
    index = torch.arange(channels)
    for g, chans in enumerate(group_slices(channels, groups, layout)):
        assert index[chans].tolist() == torch.nonzero(of_group == g).flatten().tolist()


@given(
    kind=st.sampled_from(["A", "B"]),
    groups=st.integers(1, 4),
    out_mult=st.integers(1, 3),
    in_mult=st.integers(1, 3),
    kh=st.sampled_from([1, 3, 5]),
    kw=st.sampled_from([1, 3, 5]),
    layout=st.sampled_from(["blocked", "interleaved"]),
)
def test_mask_matches_definition(
    kind: str, groups: int, out_mult: int, in_mult: int, kh: int, kw: int, layout: str
) -> None:
    out_c, in_c = groups * out_mult, groups * in_mult
    fn = mask_a if kind == "A" else mask_b
    m = fn(
        out_channels=out_c,
        in_channels=in_c,
        kernel_size=(kh, kw),
        color_groups=groups,
        group_layout=layout,
    )
    for o in range(out_c):
        go = o // out_mult if layout == "blocked" else o % groups
        for i in range(in_c):
            gi = i // in_mult if layout == "blocked" else i % groups
            for y in range(kh):
                for x in range(kw):
                    dy, dx = y - kh // 2, x - kw // 2
                    if dy < 0 or (dy == 0 and dx < 0):
                        want = True
                    elif dy == 0 and dx == 0:
                        want = gi < go if kind == "A" else gi <= go
                    else:
                        want = False
                    assert bool(m[o, i, y, x]) == want, (o, i, y, x)


def test_make_mask_takes_an_int_kernel_and_refuses_nonsense() -> None:
    square = make_mask("A", out_channels=2, in_channels=2, kernel_size=5)
    assert torch.equal(square, make_mask("A", out_channels=2, in_channels=2, kernel_size=(5, 5)))
    for bad in (2.5, "7", (3, 3, 3), (0, 3)):
        with pytest.raises(ValueError, match="kernel_size must be a positive int or a pair"):
            make_mask("B", out_channels=1, in_channels=1, kernel_size=bad)
