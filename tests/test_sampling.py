"""The sampler against the likelihood, seeding, completion, protocol and errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from maskedconv import PixelCNN, nll_per_dim, sample


def peaked_model(c: int, levels: int = 2, seed: int = 0, **kwargs) -> PixelCNN:
    torch.manual_seed(seed)
    model = PixelCNN(c, levels, hidden_channels=6 * c, num_layers=2, kernel_size=3, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.5)  # far from uniform, so a wrong sampler shows
    return model.double()


def all_images(c: int, h: int, w: int, levels: int = 2) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(levels), repeat=c * h * w))).view(-1, c, h, w)


def chi_square_bound(df: int, z: float = 3.09) -> float:
    # Wilson-Hilferty: the 0.999 quantile of chi-square with df degrees of freedom.
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def index_of(images: torch.Tensor, levels: int = 2) -> torch.Tensor:
    flat = images.flatten(1)
    weights = levels ** torch.arange(flat.shape[1] - 1, -1, -1)
    return (flat * weights).sum(1)


def assert_matches(samples: torch.Tensor, probs: torch.Tensor) -> None:
    counts = torch.bincount(index_of(samples), minlength=probs.numel()).double()
    expected = probs * samples.shape[0]
    stat = ((counts - expected) ** 2 / expected).sum().item()
    assert stat < chi_square_bound(probs.numel() - 1), stat


@pytest.mark.parametrize(("c", "h", "w"), [(1, 2, 2), (3, 1, 2)])
def test_samples_follow_the_likelihood(c: int, h: int, w: int) -> None:
    model = peaked_model(c)
    probs = model.log_prob(all_images(c, h, w)).exp().detach()
    assert abs(probs.sum().item() - 1) < 1e-9
    g = torch.Generator().manual_seed(0)
    samples = sample(model, (20000, c, h, w), generator=g)
    assert_matches(samples, probs)


def test_temperature_divides_the_logits() -> None:
    model = peaked_model(1)
    images = all_images(1, 2, 2)
    t = 0.5
    logp = torch.log_softmax(model(images) / t, dim=2).gather(2, images.unsqueeze(2))
    probs = logp.sum(dim=(1, 2, 3, 4)).exp().detach()
    samples = sample(
        model, (20000, 1, 2, 2), temperature=t, generator=torch.Generator().manual_seed(1)
    )
    assert_matches(samples, probs)


def test_low_temperature_approaches_the_mode() -> None:
    model = peaked_model(3, seed=3)
    # Greedy decoding, step by step: what temperature -> 0 must give.
    greedy = torch.zeros(1, 3, 2, 2, dtype=torch.long)
    for r, c, ch in itertools.product(range(2), range(2), range(3)):
        greedy[0, ch, r, c] = model(greedy)[0, ch, :, r, c].argmax()
    samples = sample(
        model, (64, 3, 2, 2), temperature=1e-3, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(samples, greedy.expand(64, -1, -1, -1))
    warm = sample(model, (64, 3, 2, 2), temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(warm, greedy.expand(64, -1, -1, -1))


def test_completion_keeps_known_and_follows_the_conditional() -> None:
    model = peaked_model(1, seed=1)
    images = all_images(1, 2, 2)
    probs = model.log_prob(images).exp().detach()
    top = torch.tensor([1, 0])
    rows = (images[:, 0, 0] == top).all(dim=1)
    cond = probs[rows] / probs[rows].sum()  # p(bottom row | top row), 4 outcomes
    x = torch.zeros(20000, 1, 2, 2, dtype=torch.long)
    x[:, 0, 0] = top
    known = torch.zeros_like(x, dtype=torch.bool)
    known[:, :, 0] = True
    out = sample(model, x=x, known=known, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out[:, :, 0], x[:, :, 0])
    assert_matches(out[:, :, 1], cond)


def test_completion_of_some_channels_keeps_them() -> None:
    model = peaked_model(3)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2, (8, 3, 3, 3), generator=g)
    known = torch.rand(8, 3, 3, 3, generator=g) < 0.5
    out = sample(model, x=x, known=known, generator=g)
    assert torch.equal(out[known], x[known])


def test_same_seed_same_samples_and_global_rng_untouched() -> None:
    model = peaked_model(3)
    state = torch.get_rng_state()
    a = sample(model, (4, 3, 3, 3), generator=torch.Generator().manual_seed(7))
    b = sample(model, (4, 3, 3, 3), generator=torch.Generator().manual_seed(7))
    c = sample(model, (4, 3, 3, 3), generator=torch.Generator().manual_seed(8))
    sample(model, (4, 3, 3, 3))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_output_dtype_device_mode_and_no_autograd() -> None:
    model = PixelCNN(1, 4, hidden_channels=8, num_layers=2)
    model.train()
    out = model.sample(3, (4, 5), generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.long and out.shape == (3, 1, 4, 5) and not out.requires_grad
    assert out.min() >= 0 and out.max() < 4
    assert model.training
    model.eval()
    model.sample(1, (2, 2))
    assert not model.training


class UserModel(nn.Module):
    """A model that follows the protocol but declares nothing about itself."""

    def __init__(self, inner: PixelCNN) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@pytest.mark.parametrize("layout", ["blocked", "interleaved"])
def test_generic_models_and_row_cropping_agree(layout: str) -> None:
    model = peaked_model(3, group_layout=layout)
    user = UserModel(model)  # no causal_rows: the full image every step
    a = sample(model, (5, 3, 4, 3), generator=torch.Generator().manual_seed(3))
    b = sample(
        user,
        (5, 3, 4, 3),
        generator=torch.Generator().manual_seed(3),
        color_groups=3,
        group_layout=layout,
    )
    assert torch.equal(a, b)


class FakeCudaGenerator:
    device = torch.device("cuda")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            dict(shape=(1, 1, 2, 2), temperature=0.0),
            ValueError,
            "temperature must be a finite float > 0, but got 0.0",
        ),
        (
            dict(shape=(1, 1, 2, 2), temperature=-1),
            ValueError,
            "temperature must be a finite float > 0, but got -1",
        ),
        (dict(shape=(1, 1, 2, 2), temperature=float("nan")), ValueError, "but got nan"),
        (
            dict(shape=(1, 1, 2, 2), temperature="hot"),
            TypeError,
            "temperature must be a float > 0, but got str",
        ),
        (dict(), ValueError, "give either shape=(B, C, H, W) or a partial image x= with known="),
        (
            dict(shape=(1, 2, 2)),
            ValueError,
            "shape must be 4 positive ints (B, C, H, W), but got (1, 2, 2)",
        ),
        (dict(x=torch.zeros(1, 1, 2, 2, dtype=torch.long)), ValueError, "x and known go together"),
        (
            dict(x=torch.zeros(1, 1, 2, 2), known=torch.ones(1, 1, 2, 2, dtype=torch.bool)),
            TypeError,
            "x must be an integer image tensor, but got dtype torch.float32",
        ),
        (
            dict(x=torch.zeros(1, 1, 2, 2, dtype=torch.long), known=torch.ones(1, 1, 2, 2)),
            TypeError,
            "known must be a bool tensor, but got dtype torch.float32",
        ),
        (
            dict(
                x=torch.zeros(1, 1, 2, 2, dtype=torch.long),
                known=torch.ones(1, 1, 2, 3, dtype=torch.bool),
            ),
            ValueError,
            "known must have its shape, but got x (1, 1, 2, 2) and known (1, 1, 2, 3)",
        ),
        (
            dict(
                x=torch.full((1, 1, 2, 2), 5),
                known=torch.tensor([[[[True, False], [False, False]]]]),
            ),
            ValueError,
            "x must have values in [0, 2) where known is True (the model has 2 levels), but got values in [5, 5]",
        ),
        (
            dict(shape=(1, 1, 2, 2), generator=FakeCudaGenerator()),
            ValueError,
            "generator must be on the model's device cpu, but got a generator on cuda",
        ),
    ],
)
def test_errors(kwargs: dict, error: type[Exception], message: str) -> None:
    model = PixelCNN(1, 2, hidden_channels=4, num_layers=1)
    shape = kwargs.pop("shape", None)
    with pytest.raises(error) as info:
        sample(model, shape, **kwargs)
    assert message in str(info.value)


def test_pixelcnn_sample_needs_both_sizes() -> None:
    model = PixelCNN(1, 2, hidden_channels=4, num_layers=1)
    with pytest.raises(ValueError, match="num_samples and image_size go together"):
        model.sample(4)


# --- bad and edge inputs found by a careful user (issue 10) ---------------------------


def test_a_tiny_temperature_takes_the_most_likely_level() -> None:
    from maskedconv._heads import draw_from_log_probs

    logits = torch.tensor([[[0.0, 3.0, 1.0], [5.0, -2.0, 4.9]]])
    for temperature in (1e-3, 1e-30, 1e-45, 5e-324):
        draws = draw_from_log_probs(logits, temperature, torch.rand(1, 2))
        assert draws.tolist() == [[1, 0]], temperature


def test_a_contradicting_colour_order_is_refused() -> None:
    model = PixelCNN(3, 2, hidden_channels=6, num_layers=1, kernel_size=3)
    with pytest.raises(ValueError, match="color_groups=1 contradicts the model's color_groups=3"):
        sample(model, (1, 3, 2, 2), color_groups=1)
    with pytest.raises(
        ValueError,
        match="group_layout='interleaved' contradicts the model's group_layout='blocked'",
    ):
        sample(model, (1, 3, 2, 2), group_layout="interleaved")
    sample(model, (1, 3, 2, 2), color_groups=3, group_layout="blocked")  # agreeing is fine


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda m: sample(m, (1, 1, 2, 2), generator=0),
            TypeError,
            "generator must be a torch.Generator",
        ),
        (
            lambda m: m.sample(2, 28),
            ValueError,
            "image_size must be (H, W), two positive ints, but got 28",
        ),
        (
            lambda m: nll_per_dim(torch.zeros(2), 784),
            ValueError,
            "image_shape must be (C, H, W) or (B, C, H, W), e.g. x.shape, but got 784",
        ),
    ],
)
def test_clear_errors_for_common_slips(call, error, message) -> None:
    model = PixelCNN(1, 2, hidden_channels=4, num_layers=1, kernel_size=3)
    with pytest.raises(error) as info:
        call(model)
    assert message in str(info.value)


def test_a_pixelcnn_that_could_never_see_its_input_is_refused() -> None:
    with pytest.raises(
        ValueError, match="kernel_size must be >= 3: with 1 the type-A conv sees no other pixel"
    ):
        PixelCNN(1, 2, kernel_size=1)


def test_a_generator_on_another_gpu_is_another_device() -> None:
    from maskedconv._evaluation import _same_device

    assert not _same_device(torch.device("cuda:1"), torch.device("cuda:0"))
    assert _same_device(torch.device("cuda"), torch.device("cuda:0"))
    assert _same_device(torch.device("cpu"), torch.device("cpu"))
    assert not _same_device(torch.device("cuda:0"), torch.device("cpu"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", ["cached", "naive"])
def test_a_model_with_a_nan_weight_is_refused_not_sampled_as_zeros(method: str, bad: float) -> None:
    model = PixelCNN(1, 2, hidden_channels=8, num_layers=2)
    with torch.no_grad():
        model.trunk[-1].conv.bias[1] = bad
    with pytest.raises(ValueError, match=r"the model's output is NaN or \+inf in row 0"):
        model.sample(2, (4, 4), method=method)


def test_a_nan_in_a_later_row_is_found_in_that_row() -> None:
    # Skipped positions (all known) must not be read as NaN, and a NaN that reaches the
    # output only from row 2 on is reported there.
    class NanFromRow2(torch.nn.Module):
        head = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(x.shape[0], 1, 2, *x.shape[2:])
            logits[:, :, :, 2:] = float("nan")
            return logits

    x = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    known = torch.zeros_like(x, dtype=torch.bool)
    known[:, :, 0, :2] = True
    with pytest.raises(ValueError, match="in row 2"):
        sample(NanFromRow2(), x=x, known=known, generator=torch.Generator().manual_seed(0))


def test_minus_infinity_logits_are_allowed() -> None:
    # A model may rule levels out with -inf logits: only NaN is refused.
    class Never3(torch.nn.Module):
        head = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(x.shape[0], 1, 4, *x.shape[2:])
            logits[:, :, 3] = float("-inf")
            return logits

    images = sample(Never3(), (64, 1, 3, 3), generator=torch.Generator().manual_seed(0))
    assert images.max() <= 2 and images.min() == 0


@pytest.mark.parametrize("tqdm_installed", [True, False])
def test_progress_shows_rows_and_changes_nothing(
    tqdm_installed: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    if not tqdm_installed:
        monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails
    model = PixelCNN(1, 2, hidden_channels=8, num_layers=2)
    quiet = model.sample(3, (5, 4), generator=torch.Generator().manual_seed(0))
    assert capsys.readouterr().err == ""
    shown = model.sample(3, (5, 4), generator=torch.Generator().manual_seed(0), progress=True)
    assert torch.equal(quiet, shown)
    err = capsys.readouterr().err
    assert "sampling 3x1x5x4" in err
    if not tqdm_installed:
        # 7x7 kernels: slope 4, which on a 4-wide image is raster order, 20 steps
        assert err.splitlines()[-1] == "sampling 3x1x5x4: step 20/20"
