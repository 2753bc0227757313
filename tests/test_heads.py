"""Output distributions: normalisation, the mixture against a brute-force reference,
stability at the edges, and draws that follow the exact probabilities."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from pixelcnn_models import perturb_

from maskedconv import Categorical, DiscretizedLogisticMixture, PixelCNN

HEADS = ["categorical", "dmol"]
STEMS = ["scaled", "embedding"]


def all_images(c: int, h: int, w: int, levels: int) -> torch.Tensor:
    values = list(itertools.product(range(levels), repeat=c * h * w))
    return torch.tensor(values).view(-1, c, h, w)


def small_model(c: int, k: int, head: str, stem: str, seed: int = 0) -> PixelCNN:
    torch.manual_seed(seed)
    model = PixelCNN(
        c, k, hidden_channels=6 * c, num_layers=2, kernel_size=3, head=head, input=stem
    ).double()
    return perturb_(model, 0.5)  # far from the tidy initial values


@pytest.mark.parametrize("stem", STEMS)
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize(
    ("c", "k", "h", "w"),
    [
        *[(1, k, 1, w) for k in (2, 3, 16, 256) for w in (1, 2)],
        *[(3, k, 1, w) for k in (2, 4) for w in (1, 2)],
    ],
)
def test_normalised_by_enumeration(head: str, stem: str, c: int, k: int, h: int, w: int) -> None:
    model = small_model(c, k, head, stem)
    with torch.no_grad():
        total = sum(
            model.log_prob(chunk).exp().sum().item() for chunk in all_images(c, h, w, k).split(8192)
        )
    assert abs(total - 1) <= 1e-10


def test_normalisation_test_can_fail() -> None:
    # A mixture whose edge bins were closed at -1 and 1 would lose the tails.
    head = DiscretizedLogisticMixture(4, 2)
    params = torch.randn(1, head.num_params(1), dtype=torch.float64)
    x = torch.arange(4)[:, None]
    good = head.log_prob(params.expand(4, -1), x).exp().sum()
    assert abs(good.item() - 1) < 1e-12
    closed = head._bin_log_prob  # the real bins, less the open tails
    head._bin_log_prob = lambda x, m, s: torch.log(  # type: ignore[method-assign]
        closed(x, m, s).exp()
        - torch.where(x == 0, torch.sigmoid(torch.exp(-s) * (-4 / 3 - m)), 0.0)
        - torch.where(x == 3, 1 - torch.sigmoid(torch.exp(-s) * (4 / 3 - m)), 0.0)
    )
    bad = head.log_prob(params.expand(4, -1), x).exp().sum()
    assert abs(bad.item() - 1) > 1e-6


def mixture_reference(params: torch.Tensor, x: torch.Tensor, k: int, m: int) -> torch.Tensor:
    """Per-sub-pixel log p from the definition: CDF differences bin by bin, float64.

    params (N, P), x (N, C) -> (N, C).
    """
    n, c = x.shape
    logits = params[:, :m]
    rest = params[:, m:].reshape(n, -1, m)
    means, log_scales = rest[:, :c], rest[:, c : 2 * c].clamp(min=-7)
    coeffs = torch.tanh(rest[:, 2 * c :])
    pairs = [(a, b) for a in range(c) for b in range(a)]
    scaled = x.double() * 2 / (k - 1) - 1
    weights = torch.softmax(logits, dim=1)  # (N, M)
    out = torch.zeros(n, c, dtype=torch.float64)
    prefix_before = torch.ones(n, dtype=torch.float64)
    running = weights.clone()  # pi_m * prod_{c' < c} P_c'm
    for ch in range(c):
        mean = means[:, ch].clone()
        for index, (a, b) in enumerate(pairs):
            if a == ch:
                mean = mean + coeffs[:, index] * scaled[:, b, None]
        scale = log_scales[:, ch].exp()
        lo = torch.where(x[:, ch] == 0, -math.inf, scaled[:, ch] - 1 / (k - 1))[:, None]
        hi = torch.where(x[:, ch] == k - 1, math.inf, scaled[:, ch] + 1 / (k - 1))[:, None]
        cdf_hi = torch.sigmoid((hi - mean) / scale)
        cdf_lo = torch.sigmoid((lo - mean) / scale)
        running = running * (cdf_hi - cdf_lo)
        prefix = running.sum(1)
        out[:, ch] = torch.log(prefix) - torch.log(prefix_before)
        prefix_before = prefix
    return out


@pytest.mark.parametrize(("c", "k", "m"), [(1, 256, 5), (3, 256, 5), (3, 4, 2), (2, 17, 3)])
def test_mixture_matches_brute_force(c: int, k: int, m: int) -> None:
    head = DiscretizedLogisticMixture(k, m)
    gen = torch.Generator().manual_seed(0)
    n = 2000
    params = torch.randn(n, head.num_params(c), generator=gen, dtype=torch.float64)
    params[:, m:] *= 0.6  # moderate scales, so that plain CDF differences are exact
    x = torch.randint(0, k, (n, c), generator=gen)
    x[:50] = 0  # both open edges, every channel
    x[50:100] = k - 1
    ours = head.log_prob(params, x)
    ref = mixture_reference(params, x, k, m)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-9)


def test_mixture_is_finite_with_extreme_parameters() -> None:
    k, m = 256, 3
    head = DiscretizedLogisticMixture(k, m)
    rows = []
    for log_scale, mean, logit in itertools.product(
        [-30.0, -7.0, 0.0, 20.0, 80.0], [-50.0, -1.0, 0.3, 1.0, 50.0], [-1e4, 0.0, 1e4]
    ):
        p = torch.zeros(head.num_params(3))
        p[:m] = torch.tensor([logit, 0.0, -logit])
        p[m : m + 3 * m] = mean
        p[m + 3 * m : m + 6 * m] = log_scale
        p[m + 6 * m :] = 5.0
        rows.append(p)
    params = torch.stack(rows)  # float32
    for value in (0, 1, 127, k - 2, k - 1):
        x = torch.full((len(rows), 3), value)
        leaf = params.clone().requires_grad_(True)
        logp = head.log_prob(leaf, x)
        assert torch.isfinite(logp).all(), value
        logp.sum().backward()
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), value


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 5  # pool the rare cells, as the test requires
    observed = torch.cat([counts[keep], counts[~keep].sum()[None]])
    expected = torch.cat([expected[keep], expected[~keep].sum()[None]])
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    stat = ((observed - expected) ** 2 / expected).sum()
    dof = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2))


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_categorical_draws_follow_the_probabilities(temperature: float) -> None:
    head = Categorical(6)
    logits = torch.tensor([[[2.0, 0.5, -1.0, 0.0, 1.0, -3.0]]], dtype=torch.float64)
    n = 40000
    draws = head.sample(
        logits.expand(n, 1, 6),
        torch.zeros(n, 1, dtype=torch.long),
        None,
        channels=slice(0, 1),
        noise=torch.rand(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
        temperature=temperature,
    )
    counts = torch.bincount(draws.flatten(), minlength=6).double()
    probs = torch.softmax(logits[0, 0] / temperature, dim=0)
    assert chi_square_p_value(counts, probs) > 1e-3
    # And the test can fail: the untempered probabilities are rejected at T = 0.6.
    if temperature != 1.0:
        assert chi_square_p_value(counts, torch.softmax(logits[0, 0], 0)) < 1e-6


@pytest.mark.parametrize(("c", "k", "temperature"), [(1, 12, 1.0), (2, 5, 1.0), (3, 3, 0.7)])
def test_mixture_draws_follow_the_probabilities(c: int, k: int, temperature: float) -> None:
    head = DiscretizedLogisticMixture(k, 3)
    gen = torch.Generator().manual_seed(1)
    params = torch.randn(1, head.num_params(c), generator=gen, dtype=torch.float64)
    n = 60000
    draws = head.sample(
        params.expand(n, -1),
        torch.zeros(n, c, dtype=torch.long),
        None,
        channels=slice(0, c),
        noise=torch.rand(n, c, generator=torch.Generator().manual_seed(2), dtype=torch.float64),
        temperature=temperature,
    )
    codes = (draws * k ** torch.arange(c - 1, -1, -1)).sum(1)
    counts = torch.bincount(codes, minlength=k**c).double()
    # Exact joint probabilities of every pixel value; with a temperature, each channel's
    # conditional is tempered in turn, as the sampler documents.
    pixels = all_images(c, 1, 1, k)[:, :, 0, 0]  # (k^c, C), the same order as codes
    terms = head.log_prob(params.expand(len(pixels), -1), pixels)  # (k^c, C)
    if temperature != 1.0:
        tempered = torch.zeros_like(terms)
        rows = pixels.tolist()
        cond = {tuple(r[: ch + 1]): terms[i, ch] for i, r in enumerate(rows) for ch in range(c)}
        for i, r in enumerate(rows):
            for ch in range(c):
                levels = torch.stack([cond[(*r[:ch], v)] for v in range(k)])
                tempered[i, ch] = torch.log_softmax(levels / temperature, 0)[r[ch]]
        terms = tempered
    probs = terms.sum(1).exp()
    assert abs(probs.sum().item() - 1) < 1e-9
    assert chi_square_p_value(counts, probs) > 1e-3


def test_mixture_completion_conditions_on_known_channels() -> None:
    # R known: G and B are drawn from p(G, B | R), not from the marginal.
    k, c = 3, 3
    head = DiscretizedLogisticMixture(k, 2)
    params = torch.tensor([[3.0, -3.0, -0.8, 0.8, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    params = torch.cat([params, torch.full((1, 12), -2.0, dtype=torch.float64)], 1)
    n = 20000
    given = torch.zeros(n, c, dtype=torch.long)
    given[:, 0] = 2  # R = 2 is likely only under the second component
    wanted = torch.tensor([False, True, True]).expand(n, c)
    draws = head.sample(
        params.expand(n, -1),
        given,
        wanted,
        channels=slice(0, 3),
        noise=torch.rand(n, c, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
        temperature=1.0,
    )
    assert (draws[:, 0] == 2).all()
    pixels = all_images(c, 1, 1, k)[:, :, 0, 0]
    pixels = pixels[pixels[:, 0] == 2]
    joint = head.log_prob(params.expand(len(pixels), -1), pixels)[:, 1:].sum(1).exp()
    codes = draws[:, 1] * k + draws[:, 2]
    counts = torch.bincount(codes, minlength=k * k).double()
    assert chi_square_p_value(counts, joint / joint.sum()) > 1e-3


def test_head_errors() -> None:
    with pytest.raises(ValueError, match="levels must be an int >= 2, but got 1"):
        Categorical(1)
    with pytest.raises(ValueError, match="num_mixtures must be an int >= 1, but got 0"):
        DiscretizedLogisticMixture(256, 0)
    with pytest.raises(
        ValueError,
        match="color_groups must be 1 with the discretized logistic mixture head, which orders a pixel's channels itself, but got color_groups=3",
    ):
        PixelCNN(3, 256, head="dmol", color_groups=3, hidden_channels=12)
    with pytest.raises(ValueError, match="head has levels=4, but the model has levels=256"):
        PixelCNN(1, 256, head=Categorical(4))
    with pytest.raises(ValueError, match=r"head must be one of \('categorical', 'dmol'\)"):
        PixelCNN(1, 2, head="softmax")


def test_heads_given_as_instances_round_trip() -> None:
    model = PixelCNN(3, 16, head=DiscretizedLogisticMixture(16, 4), hidden_channels=12)
    assert model.color_groups == 1 and model.trunk[-1].conv.out_channels == 4 * 10
    again = PixelCNN.from_config(model.config.to_dict())
    assert again.head.num_mixtures == 4 and again.config == model.config
    assert model.config.to_dict()["head"] == "dmol"


def test_embedding_stem_memory_is_linear_in_k_with_no_one_hot() -> None:
    # K = 4096 codes, 64 maps of 32x32: a float32 one-hot would take 1 GiB; the lookup
    # takes 64 * 8 * 32 * 32 floats (2 MiB) and a 4096 x 8 table. Measured in a fresh
    # process as the growth of its peak resident memory over forward and backward.
    code = """
import resource, torch
from maskedconv._stems import EmbeddingInput
stem = EmbeddingInput(1, 4096, 8, "blocked")
x = torch.randint(0, 4096, (64, 1, 32, 32))
stem(x[:1]).sum().backward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = stem(x)
out.square().sum().backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert out.shape == (64, 8, 32, 32)
print((after - before) / 1024)
"""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    grown_mib = float(result.stdout.strip())
    assert grown_mib < 64, f"peak memory grew by {grown_mib:.0f} MiB"
