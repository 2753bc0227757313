"""Issue 20's findings fixed so far, each with the input that went through before."""

from __future__ import annotations

import pytest
import torch

from maskedconv import (
    IncrementalEvaluator,
    PixelCNN,
    allowed_dependencies,
    make_mask,
    masked_conv2d,
    nll_per_dim,
)


def test_log_prob_from_params_refuses_parameters_of_another_level_count() -> None:
    # Item 7: a 3-level softmax was scored for a 2-level model.
    model = PixelCNN(1, 2, hidden_channels=4, num_layers=1)
    x = torch.zeros(2, 1, 5, 5, dtype=torch.long)
    with pytest.raises(
        ValueError,
        match=r"params must have the shape model\(x\) gives for x of shape \(2, 1, 5, 5\), \(2, 1, 2, 5, 5\), but got \(2, 1, 3, 5, 5\)",
    ):
        model.log_prob_from_params(torch.randn(2, 1, 3, 5, 5), x)
    torch.testing.assert_close(model.log_prob_from_params(model(x), x), model.log_prob(x))


def test_a_mask_of_other_values_than_0_and_1_is_refused() -> None:
    # Item 9: masked_conv2d accepted a 0.5 mask.
    x, w = torch.randn(1, 1, 3, 3), torch.randn(1, 1, 3, 3)
    with pytest.raises(ValueError, match=r"mask must hold only zeros and ones .* but got 0\.5"):
        masked_conv2d(x, w, torch.full((1, 1, 3, 3), 0.5), padding=1)
    masked_conv2d(x, w, torch.ones(1, 1, 3, 3), padding=1)


def test_an_even_kernel_for_mask_type_b_is_refused() -> None:
    # Item 9: make_mask("B", kernel_size=(4, 4)) returned an off-centre mask.
    with pytest.raises(ValueError, match=r"kernel_size must be odd for mask type 'B' .* \(4, 4\)"):
        make_mask("B", out_channels=1, in_channels=1, kernel_size=(4, 4))
    # A user's mask function may have its own idea of an even kernel.
    ones = make_mask(
        lambda **kw: torch.ones(1, 1, 4, 4), out_channels=1, in_channels=1, kernel_size=4
    )
    assert ones.shape == (1, 1, 4, 4)


def test_nll_per_dim_refuses_an_empty_image_shape() -> None:
    # Item 9: nll_per_dim(lp, (1, 0, 28)) returned inf.
    with pytest.raises(ValueError, match=r"of positive ints, but got \(1, 0, 28\)"):
        nll_per_dim(torch.tensor([-1.0]), (1, 0, 28))


def test_allowed_dependencies_refuses_zero_colour_groups() -> None:
    # Item 9: ZeroDivisionError.
    with pytest.raises(
        ValueError, match=r"color_groups must be a positive int or a non-empty list .* but got 0"
    ):
        allowed_dependencies(2, 2, 2, 2, color_groups=0)


def test_the_evaluator_refuses_a_colour_order_contradicting_the_model() -> None:
    # Item 6: the evaluator accepted color_groups=1 on a G=3 model.
    model = PixelCNN(3, 2, hidden_channels=6, num_layers=1, kernel_size=3)
    with pytest.raises(ValueError, match="color_groups=1 contradicts the model's color_groups=3"):
        IncrementalEvaluator(model, 1, (2, 2), color_groups=1)


def test_a_nan_in_a_masked_out_weight_changes_nothing_on_any_path() -> None:
    # Item 8: forward, the plain loop and the cached sampler disagreed about it.
    torch.manual_seed(0)
    model = PixelCNN(1, 2, hidden_channels=4, num_layers=2)
    x = torch.randint(0, 2, (2, 1, 4, 8))
    before = model.log_prob(x)
    with torch.no_grad():
        model.trunk[1].conv_mid.weight[0, 0, 6, 6] = float("nan")  # below the centre: masked
    torch.testing.assert_close(model.log_prob(x), before)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    cached = model.sample(2, (4, 8), method="cached", generator=g())
    assert torch.equal(cached, model.sample(2, (4, 8), method="naive", generator=g()))


def test_an_infinite_conditioning_map_is_refused() -> None:
    # Item 8: forward with an inf cond returned NaN silently.
    model = PixelCNN(1, 2, hidden_channels=4, num_layers=2, cond_channels=1)
    with pytest.raises(ValueError, match="cond must be finite, but it holds inf or NaN"):
        model(
            torch.zeros(1, 1, 4, 4, dtype=torch.long), cond=torch.full((1, 1, 2, 2), float("inf"))
        )


def test_a_masked_conv_names_a_wrong_channel_count() -> None:
    # Item 9: the error quoted the internal split kernel's shapes.
    from maskedconv import MaskedConv2d

    conv = MaskedConv2d(3, 6, 3, color_groups=3)
    with pytest.raises(
        ValueError,
        match=r"input must have shape \(B, 3, H, W\) \(in_channels=3\), but got \(1, 4, 5, 5\)",
    ):
        conv(torch.randn(1, 4, 5, 5))


@pytest.mark.parametrize(
    "edit", [{"group_layout": "interleaved"}, {"color_groups": 1}], ids=["layout", "groups"]
)
def test_a_config_edited_to_build_other_masks_is_refused(tmp_path, edit: dict) -> None:
    # Item 4: the safetensors file dropped the masks' description, so a hand-edited
    # config.json rebuilt other masks around the same weights.
    import json

    PixelCNN(3, 4, hidden_channels=6, num_layers=2).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(
        ValueError, match=r"config\.json: these weights were saved from a MaskedConv2d"
    ):
        PixelCNN.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"num_layers": 10_000_000}, "GiB of parameters .*num_layers=10000000"),
        ({"hidden_channels": 10**6}, "GiB of parameters .*hidden_channels=1000000"),
    ],
)
def test_sizes_that_cannot_fit_in_memory_are_refused_before_allocating(
    tmp_path, edit: dict, message: str
) -> None:
    # Item 5: from_pretrained hung on num_layers 10,000,000; huge sizes gave raw
    # allocator errors.
    import json

    PixelCNN(1, 2, hidden_channels=4, num_layers=2).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(ValueError, match=message):
        PixelCNN.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="more than this machine's"):
        PixelCNN(1, 2, **edit)


def test_a_deeply_nested_config_is_refused(tmp_path) -> None:
    # Item 5: a 200,000-deep JSON gave RecursionError.
    PixelCNN(1, 2, hidden_channels=4, num_layers=2).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError, match="nested too deeply to be a config"):
        PixelCNN.from_pretrained(tmp_path)


def test_a_conditioning_map_computed_from_the_image_is_caught_on_a_fresh_model() -> None:
    # Item 1: conditioning weights start at zero, which hid the leak from the checker.
    import torch.nn.functional as F
    from torch import nn

    from maskedconv import assert_causal

    class MapFromTheImage(nn.Module):
        levels, in_channels = 4, 1

        def __init__(self) -> None:
            super().__init__()
            self.inner = PixelCNN(
                1, 4, hidden_channels=8, num_layers=2, kernel_size=3, cond_channels=1
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x, cond=F.avg_pool2d(x.float(), 2))

    with pytest.raises(AssertionError, match="which it must not see"):
        assert_causal(MapFromTheImage(), (2, 1, 4, 4))
    # The same model with a map that does not come from the image passes.
    fresh = PixelCNN(1, 4, hidden_channels=8, num_layers=2, kernel_size=3, cond_channels=1)
    assert_causal(fresh, (2, 1, 4, 4), cond=torch.randn(2, 1, 2, 2))


def test_a_stack_of_type_b_layers_checked_without_mask_type_warns() -> None:
    # Item 2: the classic bug (a type-B first layer) passed by default.
    from torch import nn

    from maskedconv import MaskedConv2d, assert_causal

    stack = nn.Sequential(
        MaskedConv2d(1, 8, 3, mask_type="B"), nn.ReLU(), MaskedConv2d(8, 2, 3, mask_type="B")
    )
    with pytest.warns(UserWarning, match="pass mask_type='A' to check that"):
        assert_causal(stack, (2, 1, 5, 5))
    with pytest.raises(AssertionError, match="which it must not see"):
        assert_causal(stack, (2, 1, 5, 5), mask_type="A")


def test_the_evaluator_names_values_out_of_range() -> None:
    # Item 9: an IndexError from the embedding, or silently wrong parameters.
    model = PixelCNN(1, 4, hidden_channels=4, num_layers=1, kernel_size=3, input="embedding")
    ev = IncrementalEvaluator(model, 1, (2, 2))
    bad = torch.full((1, 1, len(ev.positions)), 4)
    with pytest.raises(
        ValueError, match=r"values must be in \[0, 4\) \(levels=4\), but got values in \[4, 4\]"
    ):
        ev.params(bad)
    with pytest.raises(ValueError, match=r"values must be in \[0, 4\)"):
        ev.advance(bad - 5)


def test_a_leak_that_skips_an_image_is_caught() -> None:
    # Item 3: image 0 seeing image 2 passed with the checker's batch of 2.
    from maskedconv import assert_causal

    def sees_two_ahead(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # The row above, of the image two further on: with 2 images, its own.
        above = torch.nn.functional.pad(x.roll(-2, dims=0), (0, 0, 1, 0))[:, :, :-1]
        return out + 0.1 * above

    with pytest.raises(AssertionError, match=r"image 0.*depends on input \(image 2"):
        assert_causal(_FloatLeak(sees_two_ahead), (2, 1, 4, 4))


def test_an_in_place_edit_of_a_mask_is_refused_not_half_honoured() -> None:
    # Item 9: an edit took effect for some taps and not others.
    from maskedconv import MaskedConv2d

    conv = MaskedConv2d(1, 2, 3, mask_type="A")
    x = torch.randn(1, 1, 4, 4)
    conv(x)
    with torch.no_grad():
        conv.mask[:, :, 2, 2] = 1  # a tap below the centre, outside the planned rows
    with pytest.raises(ValueError, match="the mask of this MaskedConv2d was edited in place"):
        conv(x)
    model = PixelCNN(1, 2, hidden_channels=4, num_layers=1, kernel_size=3)
    model.trunk[0].conv.mask.fill_(1)
    with pytest.raises(ValueError, match="edited in place"):
        model.sample(1, (2, 2))
    moved = MaskedConv2d(1, 2, 3).to(torch.float64)  # rebuilt masks are not edits
    moved(x.double())


class _FloatLeak(torch.nn.Module):
    """A type-A masked conv plus a leak that only some inputs show."""

    def __init__(self, leak) -> None:
        super().__init__()
        from maskedconv import MaskedConv2d

        self.conv = MaskedConv2d(1, 2, 3, mask_type="A")
        self.leak = leak

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.leak(self.conv(x), x)


def _dead_relu(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # Zero, with zero gradient, unless a mirrored (future) value exceeds 5.
    return out + torch.relu(x.flip(-1) - 5)


def _branch_on_a_future_pixel(threshold: float, above: bool):
    def leak(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # A Python branch: no gradient flows through the condition.
        value = float(x.detach()[0, 0, -1, -1])
        return out * 2 if (value > threshold) == above else out

    return leak


@pytest.mark.parametrize(
    "leak",
    [_dead_relu]
    + [_branch_on_a_future_pixel(t, above) for t in (-2.0, 0.0, 2.0) for above in (True, False)],
    ids=["dead-relu"] + [f"branch-{w}-{t}" for t in (-2, 0, 2) for w in ("above", "below")],
)
def test_a_leak_that_a_gradient_cannot_see_is_caught(leak) -> None:
    # Item 3: these passed, the Jacobian being zero and the values moved only up a little.
    from maskedconv import assert_causal

    with pytest.raises(AssertionError, match="which it must not see"):
        assert_causal(_FloatLeak(leak), (3, 1, 5, 5))
    assert_causal(_FloatLeak(lambda out, x: out), (3, 1, 5, 5))  # no false alarm


class _WrappedPixelCNN(torch.nn.Module):
    """A model of integer images whose forward adds ``leak(x)`` to the logits."""

    in_channels = 1

    def __init__(self, levels: int, leak) -> None:
        super().__init__()
        self.levels = levels
        self.inner = PixelCNN(1, levels, hidden_channels=8, num_layers=2, kernel_size=3)
        self.leak = leak

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + self.leak(x)


def test_a_leak_only_where_a_future_value_is_the_top_level_is_caught() -> None:
    # Item 3: random other levels hit 255 one time in 255.
    from maskedconv import assert_causal

    def where_top(x: torch.Tensor) -> torch.Tensor:
        return (x.flip(-1) == 255).float()[:, :, None]

    def where_top_in_an_if(x: torch.Tensor) -> torch.Tensor:
        return torch.ones(()) if int(x[0, 0, -1, -1]) == 255 else torch.zeros(())

    for leak in (where_top, where_top_in_an_if):
        with pytest.raises(AssertionError, match="which it must not see"):
            assert_causal(_WrappedPixelCNN(256, leak), (3, 1, 4, 4))


def test_a_leak_in_a_custom_heads_log_prob_is_caught() -> None:
    # Item 3: only forward was checked; log_prob could read the future.
    from maskedconv import Categorical, assert_causal

    class PeeksRight(Categorical):
        def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return super().log_prob(params, x) + 1e-3 * x.roll(-1, dims=-1)

    class PeeksAtLaterParameters(Categorical):
        def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return super().log_prob(params.roll(-1, dims=-2), x)

    model = PixelCNN(1, 4, hidden_channels=8, num_layers=2, kernel_size=3, head=PeeksRight(4))
    with pytest.raises(AssertionError, match=r"log_prob of sub-pixel \(image \d, channel 0"):
        assert_causal(model, (3, 1, 4, 4))
    model.head = PeeksAtLaterParameters(4)
    with pytest.raises(AssertionError, match="parameters of later pixels move"):
        assert_causal(model, (3, 1, 4, 4))
    model.head = Categorical(4)  # the library's own head: no false alarm
    assert_causal(model, (3, 1, 4, 4))


def _counted_pixelcnn(levels: int) -> tuple[PixelCNN, list[int]]:
    """A small PixelCNN that records the batch of every forward pass."""
    calls: list[int] = []

    class Counted(PixelCNN):
        def forward(self, x, labels=None, cond=None):  # type: ignore[override]
            calls.append(len(x))
            return super().forward(x, labels, cond)

    return Counted(1, levels, hidden_channels=4, num_layers=1, kernel_size=3), calls


def test_the_checker_runs_one_test_per_image_of_the_batch() -> None:
    # Item 3: the default GatedPixelCNN took 129 s. Each image of the batch now runs a
    # different test, instead of all of them the same one.
    from maskedconv import assert_causal

    model, calls = _counted_pixelcnn(levels=2)
    assert_causal(model, (3, 1, 6, 6))
    per_pass = len(calls) / 4  # 2 dtypes x 2 modes
    # A base, all changed (once: it moves), 3 images x 2 trials for the batch, 36 pixels
    # x 3 trials / 3 images (was x 2 trials x 3 images), the parameters for the head.
    assert per_pass == 1 + 1 + 6 + 36 + 1


def test_a_costly_check_says_what_it_costs(monkeypatch) -> None:
    # Item 3: 129 s with no output. The count it gives is the count it runs, but for
    # the second all-inputs-changed pass, run only when the first moves nothing.
    import maskedconv._causality as causality
    from maskedconv import assert_causal

    model, calls = _counted_pixelcnn(levels=4)
    monkeypatch.setattr(causality, "_COSTLY", 100)
    with pytest.warns(UserWarning, match=r"about ([\d,]+) forward passes .* at 3x3 already") as w:
        assert_causal(model, (3, 1, 6, 6))
    said = int(
        next(str(m.message) for m in w if "forward passes" in str(m.message))
        .split("about ")[1]
        .split(" ")[0]
        .replace(",", "")
    )
    assert len(calls) <= said <= len(calls) + 4


def test_loading_another_block_names_how_the_layers_differ() -> None:
    # Item 9: residual weights into a bottleneck model were refused with two identical
    # descriptions ("saved from ... mask_type='B' ..., but this layer has mask_type='B' ...").
    residual = PixelCNN(1, 2, hidden_channels=8, num_layers=2, block="residual")
    bottleneck = PixelCNN(1, 2, hidden_channels=8, num_layers=2, block="bottleneck")
    with pytest.raises(ValueError, match="saved from a MaskedConv2d") as error:
        bottleneck.load_state_dict(residual.state_dict())
    saved, this = (
        str(error.value)
        .split(" with ", 1)[1]
        .split(": the masks")[0]
        .split(", but this layer has ")
    )
    assert saved != this
    assert "kernel of 8 -> 8 channels" in saved and "kernel of 8 -> 4 channels" in this
