"""GatedPixelCNN: causality, no blind spot, receptive fields against an independent
oracle, mutations that must fail, conditioning, and exact cached sampling."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pixelcnn_models import cached_and_naive, decode_like_a_decoder, perturb_
from torch import nn

import maskedconv._blocks as gated_module
from maskedconv import (
    GatedPixelCNN,
    MaskedConv2d,
    PixelCNN,
    allowed_dependencies,
    assert_causal,
    receptive_field,
)


def perturbed(model: nn.Module, seed: int = 0, scale: float = 0.3) -> nn.Module:
    torch.manual_seed(seed)
    return perturb_(model, scale).double().eval()


gated_configs = st.fixed_dictionaries(
    {
        "in_channels": st.sampled_from([1, 3]),
        "levels": st.integers(2, 4),
        "num_layers": st.integers(1, 3),
        "kernel_size": st.sampled_from([3, 5]),
        "grouped": st.booleans(),
        "group_layout": st.sampled_from(["blocked", "interleaved"]),
        "conditioned": st.booleans(),
        "height": st.integers(2, 5),
        "width": st.integers(2, 5),
    }
)


def build_gated(cfg: dict) -> GatedPixelCNN:
    c = cfg["in_channels"]
    torch.manual_seed(0)
    model = GatedPixelCNN(
        c,
        cfg["levels"],
        hidden_channels=6 * c,
        num_layers=cfg["num_layers"],
        kernel_size=cfg["kernel_size"],
        color_groups=c if cfg["grouped"] else 1,
        group_layout=cfg["group_layout"],
        num_classes=3 if cfg["conditioned"] else None,
        cond_channels=2 if cfg["conditioned"] else None,
    )
    return perturbed(model)  # type: ignore[return-value]


def conditioning(cfg: dict, batch: int) -> dict:
    if not cfg["conditioned"]:
        return {}
    gen = torch.Generator().manual_seed(4)
    return {
        "labels": torch.randint(0, 3, (batch,), generator=gen),
        "cond": torch.randn(batch, 2, 2, 3, generator=gen, dtype=torch.float64),
    }


@given(cfg=gated_configs)
def test_gated_has_zero_dependence_on_every_forbidden_input(cfg: dict) -> None:
    model = build_gated(cfg)
    c, h, w = cfg["in_channels"], cfg["height"], cfg["width"]
    kwargs = conditioning(cfg, 2)
    # Through the float features after the stem: an exact float64 Jacobian.
    x = torch.randint(0, cfg["levels"], (2, c, h, w), generator=torch.Generator().manual_seed(1))
    cond = model.conditioning(kwargs.get("labels"), kwargs.get("cond"), 2, (h, w))
    feats = model.stem(x)
    jac = torch.autograd.functional.jacobian(lambda f: model.forward_features(f, cond), feats)
    dep = (jac != 0).flatten(2, -3)  # (B, C, K*, H, W, B, C, H, W) with K folded
    dep = dep.reshape(2, c, -1, h, w, 2, c, h, w).any(2)
    allowed = allowed_dependencies(
        c, c, h, w, mask_type="A", color_groups=model.color_groups, group_layout=cfg["group_layout"]
    )
    for b_out, b_in in itertools.product(range(2), range(2)):
        seen = dep[b_out, :, :, :, b_in]
        if b_out != b_in:
            assert not seen.any()
        else:
            assert not (seen & ~allowed).any()
    # And through the public forward on integer images, with the library's checker.
    assert_causal(model, (2, c, h, w), **kwargs)


def plain_oracle(k: int, layers: int) -> set[tuple[int, int]]:
    """Offsets a plain PixelCNN's output sees (G = 1), composed from its masks."""
    r = k // 2
    a = {(dr, dc) for dr in range(-r, 1) for dc in range(-r, r + 1) if dr < 0 or dc < 0}
    b = a | {(0, 0)}
    seen = a
    for _ in range(layers - 1):
        seen = {(p + q, s + t) for p, s in seen for q, t in b}
    return seen


def gated_oracle(k: int, layers: int) -> set[tuple[int, int]]:
    """Offsets a gated PixelCNN's output sees (G = 1), from the definition of its stacks."""
    r = k // 2
    v = {(dr, dc) for dr in range(-r, 0) for dc in range(-r, r + 1)}  # rows above only
    h = {(0, dc) for dc in range(-r, 0)} | v
    for _ in range(layers - 1):
        v = {(p + q, s + t) for p, s in v for q in range(-r, 1) for t in range(-r, r + 1)}
        h = h | {(p, s + t) for p, s in h for t in range(-r, 1)} | v
    return h


def as_map(offsets: set[tuple[int, int]], pixel: tuple[int, int], h: int, w: int) -> torch.Tensor:
    out = torch.zeros(h, w, dtype=torch.bool)
    for dr, dc in offsets:
        r, c = pixel[0] + dr, pixel[1] + dc
        if 0 <= r < h and 0 <= c < w:
            out[r, c] = True
    return out


@pytest.mark.parametrize(("k", "layers"), [(3, 1), (3, 2), (3, 3), (5, 2)])
@pytest.mark.parametrize("pixel", [(5, 4), (2, 7), (0, 3), (6, 0)])
def test_receptive_fields_equal_the_oracles(k: int, layers: int, pixel: tuple[int, int]) -> None:
    h, w = 7, 9
    plain = perturbed(PixelCNN(1, 3, hidden_channels=16, num_layers=layers, kernel_size=k))
    gated = perturbed(GatedPixelCNN(1, 3, hidden_channels=16, num_layers=layers, kernel_size=k))
    for model, oracle in ((plain, plain_oracle), (gated, gated_oracle)):
        seen = receptive_field(model, (1, h, w), pixel)[0]
        assert torch.equal(seen, as_map(oracle(k, layers), pixel, h, w)), type(model).__name__


def test_the_plain_models_wedge_by_hand() -> None:
    # 3x3 kernels, 2 layers, output at the centre of a 5x5 image: the pixel two to the
    # right in the row above is never seen (the blind spot); the gated model sees it.
    plain = perturbed(PixelCNN(1, 2, hidden_channels=16, num_layers=2, kernel_size=3))
    gated = perturbed(GatedPixelCNN(1, 2, hidden_channels=16, num_layers=2, kernel_size=3))
    expected_plain = torch.tensor(
        [
            [1, 1, 1, 1, 1],
            [1, 1, 1, 1, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    expected_gated = expected_plain.clone()
    expected_gated[1, 4] = True
    assert torch.equal(receptive_field(plain, (1, 5, 5), (2, 2))[0], expected_plain)
    assert torch.equal(receptive_field(gated, (1, 5, 5), (2, 2))[0], expected_gated)


def test_blind_spot_fails_complete_and_the_gated_model_passes() -> None:
    plain = perturbed(PixelCNN(1, 2, hidden_channels=16, num_layers=3, kernel_size=3))
    with pytest.raises(AssertionError, match="a blind spot or a dead path"):
        assert_causal(plain, (1, 1, 7, 7), complete=True)
    for groups in (1, 3):
        gated = perturbed(
            GatedPixelCNN(
                3, 2, hidden_channels=12, num_layers=3, kernel_size=3, color_groups=groups
            )
        )
        assert_causal(gated, (1, 3, 7, 7), complete=True)


# --- mutations that must fail ------------------------------------------------------


def remask(conv: MaskedConv2d, mask_type: object, **kwargs: object) -> MaskedConv2d:
    """The same conv with another mask; the newly kept taps get random weights."""
    new = MaskedConv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        mask_type=mask_type,  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    ).to(conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_((conv.weight + torch.randn_like(conv.weight)) * new.mask)
        if new.bias is not None and conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def below_centre(**kw: int) -> torch.Tensor:
    kh, kw_ = kw["kernel_size"]
    out = torch.zeros(kw["out_channels"], kw["in_channels"], kh, kw_, dtype=torch.bool)
    out[:, :, : kh // 2 + 2] = True  # one row below the centre too
    return out


def small_gated(groups: int = 1, layout: str = "blocked") -> GatedPixelCNN:
    model = GatedPixelCNN(
        3,
        3,
        hidden_channels=12,
        num_layers=2,
        kernel_size=3,
        color_groups=groups,
        group_layout=layout,
    )
    return perturbed(model)  # type: ignore[return-value]


def test_mutation_first_vertical_layer_seeing_its_own_row_fails() -> None:
    # In this design the down-shift is the first vertical conv keeping only rows above.
    model = small_gated()
    first = model.trunk[0]
    first.v_conv = remask(first.v_conv, gated_module.vertical_with_centre_row)
    with pytest.raises(AssertionError, match="which it must not see"):
        assert_causal(model, (2, 3, 4, 4))


def test_mutation_later_vertical_layer_seeing_below_fails() -> None:
    model = small_gated()
    later = model.trunk[1]
    later.v_conv = remask(later.v_conv, lambda **kw: below_centre(**kw))
    with pytest.raises(AssertionError, match="which it must not see"):
        assert_causal(model, (2, 3, 4, 4))


def test_mutation_gate_split_mixing_colour_groups_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    model = small_gated(groups=3)
    assert_causal(model, (2, 3, 3, 3))
    monkeypatch.setattr(
        gated_module,
        "gate",
        lambda x, *args: torch.tanh(x.chunk(2, 1)[0]) * torch.sigmoid(x.chunk(2, 1)[1]),
    )
    with pytest.raises(AssertionError, match=r"\[group 0\].*which it must not see"):
        assert_causal(model, (2, 3, 3, 3))


def test_mutation_first_horizontal_kernel_seeing_the_centre_fails() -> None:
    for groups in (1, 3):
        model = small_gated(groups=groups)
        first = model.trunk[0]
        first.h_conv = remask(first.h_conv, "B", color_groups=groups)
        with pytest.raises(AssertionError, match=r"row 0, col 0\), which it must not see"):
            assert_causal(model, (2, 3, 3, 3))


def test_gate_keeps_each_group_in_its_place() -> None:
    # blocked, G = 3, 2h = 12: group g's output channels come from group g's channels.
    x = torch.zeros(1, 12, 1, 1)
    x[0, 4:6] = 5.0  # the tanh half of group 1 (channels 4..7: a = 4, 5; b = 6, 7)
    out = gated_module.gate(x, 3, "blocked")[0, :, 0, 0]
    assert out[2:4].abs().min() > 0.4 and out[:2].abs().max() == 0 and out[4:].abs().max() == 0


# --- conditioning --------------------------------------------------------------------


@pytest.mark.parametrize("cls", [PixelCNN, GatedPixelCNN])
def test_labels_and_maps_reach_every_output_and_leave_causality(cls: type) -> None:
    torch.manual_seed(0)
    model = perturbed(
        cls(3, 4, hidden_channels=12, num_layers=2, kernel_size=3, num_classes=5, cond_channels=2)
    )
    x = torch.randint(0, 4, (2, 3, 4, 4))
    labels = torch.tensor([1, 3])
    cond = torch.randn(2, 2, 2, 2, dtype=torch.float64)
    out = model(x, labels=labels, cond=cond)
    other = model(x, labels=torch.tensor([2, 3]), cond=cond)
    assert (out[0] != other[0]).flatten(0, -3).all(0).all()  # every position of image 0
    assert torch.equal(out[1], other[1])  # and only image 0
    jac = torch.autograd.functional.jacobian(lambda m: model(x, labels=labels, cond=m), cond)
    assert (jac[0, ..., 0, 0, 0] != 0).any()
    # A half-size map is resized to the image by nearest: each cell covers a 2x2 block.
    maps = model.conditioning(labels, cond, 2, (4, 4)).maps
    assert maps.shape == (2, 2, 4, 4)
    assert torch.equal(maps[:, :, :2, :2], cond[:, :, :1, :1].expand(-1, -1, 2, 2))
    assert torch.equal(maps[:, :, 2:, 2:], cond[:, :, 1:, 1:].expand(-1, -1, 2, 2))
    assert_causal(model, (2, 3, 4, 4), labels=labels, cond=cond)
    # log_prob with labels is the sum of the per-sub-pixel terms.
    terms = model.head.log_prob(out, x)
    torch.testing.assert_close(model.log_prob(x, labels=labels, cond=cond), terms.sum((1, 2, 3)))


@pytest.mark.parametrize("cls", [PixelCNN, GatedPixelCNN])
def test_conditional_model_is_normalised_for_each_label(cls: type) -> None:
    model = perturbed(cls(1, 3, hidden_channels=8, num_layers=2, kernel_size=3, num_classes=2))
    images = torch.tensor(list(itertools.product(range(3), repeat=4))).view(-1, 1, 2, 2)
    for label in range(2):
        labels = torch.full((len(images),), label)
        total = model.log_prob(images, labels=labels).exp().sum().item()
        assert abs(total - 1) < 1e-10


@pytest.mark.parametrize("cls", [PixelCNN, GatedPixelCNN])
def test_conditioning_errors(cls: type) -> None:
    plain = cls(1, 2, hidden_channels=8, num_layers=2, kernel_size=3)
    labelled = cls(1, 2, hidden_channels=8, num_layers=2, kernel_size=3, num_classes=10)
    mapped = cls(1, 2, hidden_channels=8, num_layers=2, kernel_size=3, cond_channels=4)
    x = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    with pytest.raises(
        ValueError, match="labels must be None: this model was built without num_classes"
    ):
        plain(x, labels=torch.tensor([0, 1]))
    with pytest.raises(
        ValueError, match="cond must be None: this model was built without cond_channels"
    ):
        plain(x, cond=torch.zeros(2, 4, 4, 4))
    with pytest.raises(
        ValueError,
        match=r"labels are required: this model was built with num_classes=10; pass labels=, an int64 tensor of shape \(2,\)",
    ):
        labelled(x)
    with pytest.raises(
        ValueError,
        match=r"labels must be in \[0, 10\) \(num_classes=10\), but got values in \[3, 10\]",
    ):
        labelled(x, labels=torch.tensor([3, 10]))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        labelled(x, labels=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\), but got \(3,\)"):
        labelled(x, labels=torch.tensor([0, 1, 2]))
    with pytest.raises(
        ValueError, match="cond is required: this model was built with cond_channels=4"
    ):
        mapped(x)
    with pytest.raises(
        ValueError, match=r"cond must have shape \(2, 4, h, w\), but got \(2, 3, 4, 4\)"
    ):
        mapped(x, cond=torch.zeros(2, 3, 4, 4))
    with pytest.raises(TypeError, match="cond must be a float tensor"):
        mapped(x, cond=torch.zeros(2, 4, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels are required"):
        labelled.sample(2, (3, 3))


# --- exact cached sampling --------------------------------------------------------------

CASES = [
    (GatedPixelCNN, 1, 2, "categorical", "scaled", {}),
    (GatedPixelCNN, 3, 4, "categorical", "scaled", {"color_groups": 3}),
    (
        GatedPixelCNN,
        3,
        4,
        "categorical",
        "embedding",
        {"color_groups": 3, "group_layout": "interleaved"},
    ),
    (GatedPixelCNN, 3, 8, "dmol", "scaled", {}),
    (GatedPixelCNN, 1, 9, "categorical", "embedding", {"num_classes": 3, "cond_channels": 2}),
    (GatedPixelCNN, 3, 6, "dmol", "embedding", {"num_classes": 3, "cond_channels": 2}),
    (PixelCNN, 3, 4, "categorical", "scaled", {"num_classes": 3, "cond_channels": 2}),
    (PixelCNN, 1, 8, "dmol", "scaled", {"num_classes": 3, "block": "bottleneck"}),
]


@pytest.mark.parametrize(("cls", "c", "k", "head", "stem", "extra"), CASES)
@pytest.mark.parametrize("complete", [False, True])
def test_cached_sampling_equals_the_plain_loop(cls, c, k, head, stem, extra, complete) -> None:
    model = perturbed(
        cls(
            c,
            k,
            hidden_channels=12,
            num_layers=3,
            kernel_size=3,
            head=head,
            input=stem,
            num_mixtures=2,
            **extra,
        )
    )
    shape = (3, c, 4, 5)
    kwargs: dict = {"temperature": 0.9}
    gen = torch.Generator().manual_seed(5)
    if extra.get("num_classes"):
        kwargs["labels"] = torch.tensor([0, 2, 1])
    if extra.get("cond_channels"):
        kwargs["cond"] = torch.randn(3, 2, 2, 3, generator=gen, dtype=torch.float64)
    fast, slow, _ = cached_and_naive(model, shape, complete, gen, **kwargs)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("schedule", ["raster", "wavefront"])
@pytest.mark.parametrize("groups", [1, 3])
def test_gated_evaluator_equals_forward_with_conditioning(groups: int, schedule: str) -> None:
    model = perturbed(
        GatedPixelCNN(
            3,
            4,
            hidden_channels=12,
            num_layers=3,
            kernel_size=5,
            color_groups=groups,
            num_classes=4,
            cond_channels=2,
        )
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (2, 3, 5, 14), generator=gen)
    labels, cond = torch.tensor([3, 1]), torch.randn(2, 2, 3, 3, generator=gen, dtype=torch.float64)
    steps = decode_like_a_decoder(model, x, 1e-10, schedule, labels=labels, cond=cond)
    # Three layers of reach 2: slope 7, so 14 + 7 * 4 = 42 steps instead of 70.
    assert steps == (70 if schedule == "raster" else 42)


def test_labels_give_one_row_per_class() -> None:
    model = GatedPixelCNN(1, 2, hidden_channels=8, num_layers=2, kernel_size=3, num_classes=10)
    images = model.sample(
        10, (4, 4), labels=torch.arange(10), generator=torch.Generator().manual_seed(0)
    )
    assert images.shape == (10, 1, 4, 4)


def test_gated_config_round_trip_and_errors() -> None:
    model = GatedPixelCNN(3, 16, hidden_channels=12, head="dmol", num_classes=4)
    again = GatedPixelCNN.from_config(model.config.to_dict())
    assert again.config == model.config and type(again) is GatedPixelCNN
    again.load_state_dict(model.state_dict())
    assert model.config.num_layers == 8
    with pytest.raises(ValueError, match="kernel_size must be >= 3 for the gated PixelCNN"):
        GatedPixelCNN(1, 2, kernel_size=1)
    with pytest.raises(ValueError, match="hidden_channels must be divisible by color_groups=3"):
        GatedPixelCNN(3, 4, hidden_channels=64)


@pytest.mark.parametrize("cls", [PixelCNN, GatedPixelCNN])
def test_a_conditioned_model_starts_as_its_unconditioned_twin(cls: type) -> None:
    torch.manual_seed(0)
    plain = cls(1, 2, hidden_channels=8, num_layers=2, kernel_size=3)
    torch.manual_seed(0)
    conditioned = cls(
        1, 2, hidden_channels=8, num_layers=2, kernel_size=3, num_classes=10, cond_channels=3
    )
    x = torch.randint(0, 2, (2, 1, 5, 5))
    out = conditioned(x, labels=torch.tensor([1, 7]), cond=torch.randn(2, 3, 5, 5))
    torch.testing.assert_close(out, plain(x))  # equal up to float rounding
