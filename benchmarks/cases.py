"""Benchmark cases: each times its variants interleaved and reports ratios.

A case returns a plain dict that the pytest-benchmark tests store in ``extra_info``
and ``report.py`` prints: the median seconds of every variant, and ratios of one
variant's median to another's, each with the target it is held to (if any).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from blog_baseline import BlogMaskedConv2d, BlogPixelCNN
from timing import Timings, spread
from timing import interleaved as _interleaved
from torch import nn

from maskedconv import (
    GatedPixelCNN,
    IncrementalEvaluator,
    MaskedConv2d,
    PixelCNN,
    chosen_formulations,
    sample,
    set_conv_autotune,
    wavefront,
)
from maskedconv._formulations import run as run_formulation

Result = dict[str, Any]

# report.py --device sets this; the default is the CPU.
DEVICE = torch.device(os.environ.get("MASKEDCONV_BENCH_DEVICE", "cpu"))


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


@contextlib.contextmanager
def autotuned(enabled: bool) -> Iterator[None]:
    """``set_conv_autotune(enabled)`` for the block, then as it was."""
    previous = set_conv_autotune(enabled)
    try:
        yield
    finally:
        set_conv_autotune(previous)


def interleaved(variants: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> Timings:
    """``timing.interleaved`` on ``DEVICE``: each call is timed until the device is done."""
    return _interleaved(variants, rounds, warmup, sync=_sync)


def ratio(name: str, num: str, den: str, target: str | None = None) -> dict[str, Any]:
    """``num``'s median over ``den``'s; ``target`` like ``"<= 0.65"`` or ``">= 150"``."""
    return {"name": name, "num": num, "den": den, "target": target}


def finish(medians: dict[str, float], ratios: list[dict[str, Any]], **extra: Any) -> Result:
    """Each ratio's median over paired rounds, with its spread (``timing.spread``)."""
    for r in ratios:
        if isinstance(medians, Timings):
            r.update(spread(medians.ratios(r["num"], r["den"])))
        else:
            r.update(spread([medians[r["num"]] / medians[r["den"]]]))
    return {"medians": dict(medians), "ratios": ratios, **extra}


# --- one layer -------------------------------------------------------------------


def conv_case(kind: str, channels: int, groups: int, backward: bool, rounds: int = 15) -> Result:
    """A 7x7 masked layer at batch 32, 28x28: ours (the default rule, and autotuned, in
    both memory formats), the blog's, a dense nn.Conv2d."""
    torch.manual_seed(0)
    known = chosen_formulations()
    x = torch.randn(32, channels, 28, 28, device=DEVICE)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    conv = MaskedConv2d(channels, channels, 7, mask_type=kind, color_groups=groups).to(DEVICE)
    conv_cl = copy.deepcopy(conv).to(memory_format=torch.channels_last)
    layers: dict[str, tuple[nn.Module, torch.Tensor, bool]] = {
        "dense": (nn.Conv2d(channels, channels, 7, padding=3).to(DEVICE), x, False),
        "blog": (BlogMaskedConv2d(kind, channels, channels, 7, groups).to(DEVICE), x, False),
        "ours": (conv, x, False),
        "ours_autotuned": (conv, x, True),
        "ours_channels_last": (conv_cl, x_cl, False),
        "ours_channels_last_autotuned": (conv_cl, x_cl, True),
    }

    def run(layer: nn.Module, inp: torch.Tensor, tuned: bool) -> Callable[[], None]:
        def go() -> None:
            with autotuned(tuned):
                if backward:
                    xx = inp.detach().requires_grad_(True)
                    layer(xx).sum().backward()
                else:
                    with torch.no_grad():
                        layer(inp)

        return go

    medians = interleaved({n: run(*v) for n, v in layers.items()}, rounds)
    target = "<= 0.65" if backward and kind == "B" and groups == 1 else None
    return finish(
        medians,
        [
            ratio("ours / dense", "ours", "dense", target),
            ratio("ours autotuned / dense", "ours_autotuned", "dense"),
            ratio("ours / blog", "ours", "blog"),
            ratio("ours channels_last / dense", "ours_channels_last", "dense"),
            ratio("ours channels_last autotuned / dense", "ours_channels_last_autotuned", "dense"),
            ratio("blog / dense", "blog", "dense"),
        ],
        chosen={k: v for k, v in chosen_formulations().items() if k not in known},
    )


def conv_formulations_case(channels: int, batch: int, rounds: int) -> Result:
    """A 7x7 type-B layer, forward+backward, by each formulation in each memory format,
    against a dense nn.Conv2d: the measurements behind the default rule."""
    torch.manual_seed(0)
    conv = MaskedConv2d(channels, channels, 7, mask_type="B").to(DEVICE)
    dense = nn.Conv2d(channels, channels, 7, padding=3).to(DEVICE)
    x = torch.randn(batch, channels, 28, 28, device=DEVICE)
    formats = {"": torch.contiguous_format, " NHWC": torch.channels_last}
    variants: dict[str, Callable[[], None]] = {}

    def run(fn: Callable[[torch.Tensor], torch.Tensor], inp: torch.Tensor) -> Callable[[], None]:
        def go() -> None:
            fn(inp.detach().requires_grad_(True)).sum().backward()

        return go

    for suffix, memory_format in formats.items():
        inp = x.contiguous(memory_format=memory_format)
        layer = copy.deepcopy(conv).to(memory_format=memory_format)
        dense_layer = copy.deepcopy(dense).to(memory_format=memory_format)
        variants["dense" + suffix] = run(dense_layer, inp)
        for name, pieces in layer._plans.items():
            args = (layer.weight, layer.mask, layer.bias, layer.dilation, layer.groups)

            def by(t: torch.Tensor, pieces: Any = pieces, args: Any = args) -> torch.Tensor:
                return run_formulation(pieces, t, *args)

            variants[name + suffix] = run(by, inp)
    medians = interleaved(variants, rounds)
    return finish(
        medians,
        [
            ratio(f"{name} / dense (NCHW)", name, "dense")
            for name in variants
            if not name.startswith("dense")
        ],
    )


# --- training step -----------------------------------------------------------------


def train_case(color: bool, rounds: int) -> Result:
    """One Adam step with gradient clipping: images/s of ours against the blog's model."""
    torch.manual_seed(0)
    channels, levels, filters, layers, batch = (3, 4, 120, 8, 32) if color else (1, 2, 64, 5, 128)
    y = torch.randint(0, levels, (batch, channels, 28, 28), device=DEVICE)
    x_blog = y.float() / (levels - 1) * 2 - 1
    blog = BlogPixelCNN(channels, levels, filters, layers).to(DEVICE)
    ours = PixelCNN(channels, levels, hidden_channels=filters, num_layers=layers).to(DEVICE)
    ours_cl = copy.deepcopy(ours).to(memory_format=torch.channels_last)
    ours_tuned = copy.deepcopy(ours)

    def step(
        model: nn.Module, loss: Callable[[], torch.Tensor], tuned: bool = False
    ) -> Callable[[], None]:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def go() -> None:
            with autotuned(tuned):
                opt.zero_grad(set_to_none=True)
                loss().backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()

        return go

    known = chosen_formulations()
    medians = interleaved(
        {
            "blog": step(blog, lambda: blog.loss(x_blog, y)),
            "ours": step(ours, lambda: -ours.log_prob(y).sum()),
            "ours_autotuned": step(ours_tuned, lambda: -ours_tuned.log_prob(y).sum(), True),
            "ours_channels_last": step(ours_cl, lambda: -ours_cl.log_prob(y).sum()),
        },
        rounds,
    )
    target = None if color else ">= 1.45"
    # Speed-ups: the baseline's time over ours (images/s ratio).
    return finish(
        medians,
        [
            ratio("blog / ours (speed-up)", "blog", "ours", target),
            ratio("blog / ours autotuned (speed-up)", "blog", "ours_autotuned"),
            ratio("blog / ours channels_last (speed-up)", "blog", "ours_channels_last"),
        ],
        chosen={k: v for k, v in chosen_formulations().items() if k not in known},
        images_per_s={name: batch / t for name, t in medians.items()},
    )


# --- sampling -----------------------------------------------------------------------


def sample_case(color: bool, batch: int, naive_rows: int | None, rounds: int) -> Result:
    """The cached sampler on the wavefront and in raster order against one batched forward,
    against the blog's loop, and (binary, batch 16) a decoder's loop over the evaluator."""
    torch.manual_seed(0)
    channels, levels, filters, layers = (3, 4, 120, 8) if color else (1, 2, 64, 5)
    ours = PixelCNN(channels, levels, hidden_channels=filters, num_layers=layers).to(DEVICE).eval()
    blog = BlogPixelCNN(channels, levels, filters, layers).to(DEVICE).eval()
    shape = (batch, channels, 28, 28)
    zeros = torch.zeros(shape, dtype=torch.long, device=DEVICE)

    def forward() -> None:
        with torch.no_grad():
            ours(zeros)

    def blog_forward() -> None:
        with torch.no_grad():
            blog(zeros.float())

    def drawn(schedule: str) -> Callable[[], None]:
        def go() -> None:
            gen = torch.Generator(DEVICE).manual_seed(0)
            sample(ours, shape, generator=gen, schedule=schedule)

        return go

    variants = {
        "ours_forward": forward,
        "blog_forward": blog_forward,
        "wavefront": drawn("wavefront"),
        "raster": drawn("raster"),
    }
    if batch == 16 and not color:
        variants["decoder_loop"] = decoder_loop(ours, zeros)
    medians = interleaved(variants, rounds)
    denominator = "ours_forward_x_groups" if color else "ours_forward"
    ratios = [
        ratio(
            "wavefront / ours forward" + (" / groups" if color else ""),
            "wavefront",
            denominator,
            _sample_target(color, batch),
        ),
        ratio("raster / ours forward" + (" / groups" if color else ""), "raster", denominator),
        ratio("raster / wavefront (speed-up)", "raster", "wavefront"),
        ratio("wavefront / blog forward", "wavefront", "blog_forward"),
    ]
    if "decoder_loop" in variants:
        ratios.append(
            ratio("decoder loop / wavefront sampling", "decoder_loop", "wavefront", "<= 1.3")
        )
    if color:
        medians.add_scaled("ours_forward_x_groups", medians, "ours_forward", channels)
    evaluator = IncrementalEvaluator(ours, batch, (28, 28))
    extra: dict[str, Any] = {
        "cache_bytes": evaluator.cache_bytes(),
        "steps": {"wavefront": len(evaluator.schedule), "raster": 28 * 28},
    }
    if naive_rows:
        # The blog's loop costs the same for every row: time a few, scale by 28 / rows.
        naive = interleaved({"naive": lambda: blog.sample(batch, 28, rows=naive_rows)}, 1, 0)
        medians.add_scaled("blog_naive_loop", naive, "naive", 28 / naive_rows)
        ratios.append(
            ratio(
                "blog naive loop / wavefront (speed-up)",
                "blog_naive_loop",
                "wavefront",
                ">= 600" if batch == 16 and not color else None,
            )
        )
        extra["naive_note"] = (
            f"blog loop timed on {naive_rows} of 28 rows, scaled by {28 / naive_rows:g}"
        )
    return finish(medians, ratios, **extra)


def sample_floor_case(batch: int, rounds: int) -> Result:
    """What the cached sampler's design cannot go under, against one batched forward:
    for every wavefront step, every k x k layer's gather of its kept taps from a cache of
    the layer's input and its one product with the gathered weights, at the sampler's
    shapes (the blog's binary model, 28x28). These products are the forward's
    multiply-adds (25 taps a position where the forward's "pad" convolution does 28);
    the 1x1 layers, the head, the draw and every op's dispatch come on top."""
    torch.manual_seed(0)
    model = PixelCNN(1, 2, hidden_channels=64, num_layers=5).to(DEVICE).eval()
    schedule = wavefront(model, (28, 28))
    steps = [schedule[t] for t in range(len(schedule))]  # each step's Positions
    zeros = torch.zeros(batch, 1, 28, 28, dtype=torch.long, device=DEVICE)
    layers = []  # (cache, weight, bias, per-step tap indices) of each k x k layer
    for conv in model.modules():
        if not isinstance(conv, MaskedConv2d) or conv.kernel_size == (1, 1):
            continue
        kh, kw = conv.kernel_size
        taps = torch.nonzero(conv.mask.bool().any(0).any(0)).tolist()
        width = 28 + 2 * (kw // 2)
        offsets = torch.tensor([i * width + j for i, j in taps], device=DEVICE)
        cache = torch.randn(batch, (28 + 2 * (kh // 2)) * width, conv.in_channels, device=DEVICE)
        weight = torch.randn(len(taps) * conv.in_channels, conv.out_channels, device=DEVICE)
        reads = [
            ((at.rows * width + at.cols).to(DEVICE).unsqueeze(1) + offsets).flatten()
            for at in steps
        ]
        layers.append((cache, weight, torch.randn(conv.out_channels, device=DEVICE), reads))
    # The products alone read patches made once per layer and step size (no gather).
    sizes = sorted({len(at) for at in steps})
    patches = [
        {n: torch.randn(batch * n, weight.shape[0], device=DEVICE) for n in sizes}
        for _, weight, _, _ in layers
    ]

    def forward() -> None:
        with torch.no_grad():
            model(zeros)

    def drawn() -> None:
        sample(model, zeros.shape, generator=torch.Generator(DEVICE).manual_seed(0))

    def products() -> None:
        for at in steps:
            for (_, weight, bias, _), made in zip(layers, patches, strict=True):
                torch._addmm_activation(bias, made[len(at)], weight)

    def gathers() -> None:
        for t in range(len(schedule)):
            for cache, _, _, reads in layers:
                cache.index_select(1, reads[t])

    def both() -> None:
        for t in range(len(schedule)):
            for cache, weight, bias, reads in layers:
                got = cache.index_select(1, reads[t]).view(-1, weight.shape[0])
                torch._addmm_activation(bias, got, weight)

    medians = interleaved(
        {
            "ours_forward": forward,
            "sample": drawn,
            "every_op": _bare_steps(model, batch, steps),
            "gather_and_product": both,
            "product": products,
            "gather": gathers,
        },
        rounds,
    )
    return finish(
        medians,
        [
            ratio("sample / ours forward", "sample", "ours_forward", _sample_target(False, batch)),
            ratio("every op of every step / forward", "every_op", "ours_forward"),
            ratio("k x k gathers + products / forward", "gather_and_product", "ours_forward"),
            ratio("k x k products / forward", "product", "ours_forward"),
            ratio("k x k gathers / forward", "gather", "ours_forward"),
        ],
        steps={"wavefront": len(steps)},
    )


def _bare_steps(model: PixelCNN, batch: int, steps: list[Any]) -> Callable[[], None]:
    """The blog's binary model sampled on the wavefront with nothing but the ops its
    maths needs, written out by hand for this one model: per step, the drawn values of
    the step before into the first layer's cache; each 7x7 layer's cache write, gather
    and product; the 1x1 products, the residual sums; the logits; a Gumbel-max draw with
    noise drawn beforehand. No checks, no schedule or unit machinery, no image kept:
    the least any eager, step-by-step sampler of this model dispatches."""
    stem, *blocks, _, logits = model.trunk
    width = 28 + 6
    made: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[Any]]] = []
    for conv in [stem.conv] + [block.conv_mid for block in blocks]:
        taps = torch.nonzero(conv.mask.bool().any(0).any(0)).tolist()
        offsets = torch.tensor([i * width + j for i, j in taps], device=DEVICE)
        weight = torch.randn(len(taps) * conv.in_channels, conv.out_channels, device=DEVICE)
        cache = torch.zeros(batch, width * width, conv.in_channels, device=DEVICE)
        reads = [((at.rows * width + at.cols).to(DEVICE).unsqueeze(1) + offsets).flatten()
                 for at in steps]  # fmt: skip
        made.append((cache, weight, torch.randn(conv.out_channels, device=DEVICE), reads))
    puts = [((at.rows + 3) * width + at.cols + 3).to(DEVICE) for at in steps]
    hidden = blocks[0].conv_in.in_channels
    square = torch.randn(hidden, hidden, device=DEVICE)
    bias = torch.randn(hidden, device=DEVICE)
    to_logits = torch.randn(hidden, logits.conv.out_channels, device=DEVICE)
    noise = [torch.rand(batch, len(at), 2, device=DEVICE).log_().neg_().log_().neg_()
             for at in steps]  # fmt: skip

    def go() -> None:
        with torch.no_grad():
            drawn = None
            for t in range(len(steps)):
                cache, weight, out_bias, reads = made[0]
                if drawn is not None:
                    cache.index_copy_(1, puts[t - 1], drawn)
                patches = cache.index_select(1, reads[t]).view(-1, weight.shape[0])
                h = torch._addmm_activation(out_bias, patches, weight)
                for cache, weight, out_bias, reads in made[1:]:
                    inner = torch._addmm_activation(bias, h, square)
                    cache.index_copy_(1, puts[t], inner.view(batch, -1, hidden))
                    patches = cache.index_select(1, reads[t]).view(-1, weight.shape[0])
                    inner = torch._addmm_activation(out_bias, patches, weight)
                    h = h + torch._addmm_activation(bias, inner, square)
                h = torch._addmm_activation(bias, h, square)
                out = torch.addmm(bias[:2], h, to_logits).view(batch, -1, 2)
                # The stem's scaling of the drawn level to [-1, 1]: two ops.
                drawn = (out + noise[t]).argmax(-1, keepdim=True).float().mul_(2.0).sub_(1.0)

    return go


def _sample_target(color: bool, batch: int) -> str | None:
    if color:
        return None
    return {1: "<= 5", 16: "<= 1.5", 64: "<= 1.2"}.get(batch)


def decoder_loop(model: nn.Module, images: torch.Tensor) -> Callable[[], None]:
    """An entropy decoder's loop over ``IncrementalEvaluator`` (the wavefront), with the
    known image's values in place of the entropy decoder: what decoding costs beside
    sampling the same image."""

    def go() -> None:
        with torch.inference_mode():
            batch, _, height, width = images.shape
            ev = IncrementalEvaluator(model, batch, (height, width))
            while not ev.done:
                values = images[:, :, ev.rows, ev.cols]
                for _ in ev.groups:
                    ev.params(values)
                ev.advance(values)

    return go


def head_sample_case(kind: str, rounds: int) -> Result:
    """8x8 maps, batch 64: the cached sampler against the plain loop (``method="naive"``).

    ``kind``: ``"dmol"`` (8-bit grayscale, the mixture head) or ``"embedding"`` (a prior
    over K = 512 codes, the embedding stem). The blog's model size otherwise.
    """
    torch.manual_seed(0)
    batch, size = 64, 8
    model = PixelCNN(1, 256, head="dmol") if kind == "dmol" else PixelCNN(1, 512, input="embedding")
    model.to(DEVICE).eval()
    zeros = torch.zeros(batch, 1, size, size, dtype=torch.long, device=DEVICE)

    def forward() -> None:
        with torch.no_grad():
            model(zeros)

    def draw(method: str) -> Callable[[], None]:
        def go() -> None:
            gen = torch.Generator(DEVICE).manual_seed(0)
            sample(model, (batch, 1, size, size), generator=gen, method=method)

        return go

    medians = interleaved(
        {"ours_forward": forward, "cached": draw("cached"), "naive": draw("naive")}, rounds
    )
    return finish(
        medians,
        [
            ratio("naive loop / cached (speed-up)", "naive", "cached", ">= 100"),
            ratio("cached / ours forward", "cached", "ours_forward"),
            ratio("naive loop / ours forward", "naive", "ours_forward"),
        ],
        cache_bytes=IncrementalEvaluator(model, batch, (size, size)).cache_bytes(),
    )


# --- the gated model --------------------------------------------------------------------


def gated_train_case(rounds: int) -> Result:
    """One Adam step, binary MNIST size, batch 128: gated against plain at equal width/depth."""
    torch.manual_seed(0)
    batch = 128
    y = torch.randint(0, 2, (batch, 1, 28, 28), device=DEVICE)
    models = {
        "plain": PixelCNN(1, 2, hidden_channels=64, num_layers=5).to(DEVICE),
        "gated": GatedPixelCNN(1, 2, hidden_channels=64, num_layers=5).to(DEVICE),
    }

    def step(model: nn.Module) -> Callable[[], None]:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def go() -> None:
            opt.zero_grad(set_to_none=True)
            (-model.log_prob(y).sum()).backward()  # type: ignore[operator]
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

        return go

    medians = interleaved({name: step(m) for name, m in models.items()}, rounds)
    return finish(
        medians,
        [ratio("gated / plain (time per step)", "gated", "plain")],
        images_per_s={name: batch / t for name, t in medians.items()},
    )


def gated_sample_case(batch: int, rounds: int) -> Result:
    """Binary 28x28, the default gated model (8 layers of 7x7): its cached sampler in each
    schedule against one gated forward, against the plain model's, and against the plain
    loop (``method="naive"``, timed once)."""
    torch.manual_seed(0)
    plain = PixelCNN(1, 2, hidden_channels=64, num_layers=5).to(DEVICE).eval()
    gated = GatedPixelCNN(1, 2).to(DEVICE).eval()
    shape = (batch, 1, 28, 28)
    zeros = torch.zeros(shape, dtype=torch.long, device=DEVICE)

    def draw(
        model: nn.Module, method: str = "cached", schedule: str = "auto"
    ) -> Callable[[], None]:
        def go() -> None:
            gen = torch.Generator(DEVICE).manual_seed(0)
            sample(model, shape, generator=gen, method=method, schedule=schedule)

        return go

    def forward() -> None:
        with torch.no_grad():
            gated(zeros)

    medians = interleaved(
        {
            "gated_forward": forward,
            "gated_cached": draw(gated),
            "gated_wavefront": draw(gated, schedule="wavefront"),
            "plain_cached": draw(plain),
        },
        rounds,
    )
    medians.update(interleaved({"gated_naive": draw(gated, "naive", "raster")}, 1, 0))
    auto = IncrementalEvaluator(gated, batch, (28, 28))
    return finish(
        medians,
        [
            ratio("gated cached (auto) / gated forward", "gated_cached", "gated_forward", "<= 2"),
            ratio("gated wavefront / gated forward", "gated_wavefront", "gated_forward"),
            ratio("gated cached / plain cached", "gated_cached", "plain_cached"),
            ratio("plain loop / gated cached (speed-up)", "gated_naive", "gated_cached", ">= 100"),
        ],
        cache_bytes=auto.cache_bytes(),
        steps={
            "auto": len(auto.schedule),
            "wavefront": len(
                IncrementalEvaluator(gated, 1, (28, 28), schedule="wavefront").schedule
            ),
            "raster": 28 * 28,
        },
    )


# --- a prior over VQ-VAE codes ------------------------------------------------------------


def code_prior_sample_case(rounds: int) -> Result:
    """100 class-conditional 7x7 maps of K = 512 codes (examples/vqvae_prior.py's prior):
    the cached sampler against the plain loop as users write it (the whole model once
    per position, ``torch.multinomial``, under ``no_grad``), and against the library's
    own loop (``method="naive"``, which feeds only the rows so far)."""
    torch.manual_seed(0)
    prior = (
        GatedPixelCNN(
            1,
            512,
            input="embedding",
            num_classes=10,
            hidden_channels=64,
            num_layers=6,
            kernel_size=3,
        )
        .to(DEVICE)
        .eval()
    )
    shape, labels = (100, 1, 7, 7), torch.arange(10, device=DEVICE).repeat_interleave(10)
    zeros = torch.zeros(shape, dtype=torch.long, device=DEVICE)

    def draw(method: str) -> Callable[[], None]:
        def go() -> None:
            gen = torch.Generator(DEVICE).manual_seed(0)
            sample(prior, shape, labels=labels, generator=gen, method=method)

        return go

    def forward() -> None:
        with torch.no_grad():
            prior(zeros, labels=labels)

    def plain_loop() -> None:
        gen = torch.Generator(DEVICE).manual_seed(0)
        codes = torch.zeros(shape, dtype=torch.long, device=DEVICE)
        with torch.no_grad():
            for i in range(7):
                for j in range(7):
                    logits = prior(codes, labels=labels)[:, 0, :, i, j]  # (B, K)
                    draw = torch.multinomial(logits.softmax(-1), 1, generator=gen)
                    codes[:, 0, i, j] = draw[:, 0]

    medians = interleaved(
        {
            "forward": forward,
            "cached": draw("cached"),
            "naive": draw("naive"),
            "plain_loop": plain_loop,
        },
        rounds,
    )
    return finish(
        medians,
        [
            ratio("plain loop / cached (speed-up)", "plain_loop", "cached", ">= 50"),
            ratio("naive (rows so far) / cached", "naive", "cached"),
            ratio("cached / one forward", "cached", "forward"),
            ratio("plain loop / one forward", "plain_loop", "forward"),
        ],
        cache_bytes=IncrementalEvaluator(prior, 100, (7, 7), labels=labels).cache_bytes(),
    )


def codec_case(batch: int, rounds: int) -> Result:
    """Decoding binary MNIST-sized images with ``maskedconv.codec`` against sampling the
    same number with the same (wavefront) schedule: what the range coder and the
    frequencies add to the model's steps. The images are the model's own samples."""
    from maskedconv import codec

    torch.manual_seed(0)
    model = PixelCNN(1, 2, hidden_channels=64, num_layers=5).to(DEVICE).eval()
    shape = (batch, 1, 28, 28)
    images = sample(model, shape, generator=torch.Generator(DEVICE).manual_seed(1))
    data = codec.encode(model, images, schedule="wavefront")

    def sampled() -> None:
        sample(model, shape, generator=torch.Generator(DEVICE).manual_seed(0), schedule="wavefront")

    medians = interleaved(
        {
            "sample": sampled,
            "encode": lambda: codec.encode(model, images, schedule="wavefront"),
            "decode": lambda: codec.decode(model, data),
        },
        rounds,
    )
    symbols = images.numel()
    return finish(
        medians,
        [
            ratio("decode / sample", "decode", "sample", "<= 1.5"),
            ratio("encode / sample", "encode", "sample"),
        ],
        symbols=symbols,
        decode_symbols_per_s=symbols / medians["decode"],
        encode_symbols_per_s=symbols / medians["encode"],
        bytes=len(data),
    )


def checkerboard_sample_case(rounds: int) -> Result:
    """Sampling with a checkerboard context (2 steps) against raster order, at equal width
    and depth: the blog's binary 28x28 PixelCNN (wavefront, 136 steps) at batch 16, and
    examples/vqvae_prior.py's 7x7 code prior (the gated prior, 49 steps, against
    ``--order checkerboard``) at 100 maps. What the faster order costs in NLL is measured
    on trained models by benchmarks/checkerboard_cost.py."""
    torch.manual_seed(0)
    binary = {
        order: PixelCNN(1, 2, order=order).to(DEVICE).eval() for order in ("raster", "checkerboard")
    }
    prior_options: dict[str, Any] = dict(
        input="embedding", num_classes=10, hidden_channels=64, num_layers=6
    )
    priors = {
        "raster": GatedPixelCNN(1, 512, kernel_size=3, **prior_options),
        "checkerboard": PixelCNN(1, 512, kernel_size=7, order="checkerboard", **prior_options),
    }
    labels = torch.arange(10, device=DEVICE).repeat_interleave(10)

    def draw(model: nn.Module, shape: tuple[int, ...], **kwargs: Any) -> Callable[[], None]:
        def go() -> None:
            sample(model, shape, generator=torch.Generator(DEVICE).manual_seed(0), **kwargs)

        return go

    medians = interleaved(
        {
            **{f"binary_{k}": draw(m, (16, 1, 28, 28)) for k, m in binary.items()},
            **{
                f"prior_{k}": draw(m.to(DEVICE).eval(), (100, 1, 7, 7), labels=labels)
                for k, m in priors.items()
            },
        },
        rounds,
    )
    names = ("binary 28x28 b16", "code prior 7x7 b100")
    return finish(
        medians,
        [
            ratio(f"{name}: raster / checkerboard", f"{k}_raster", f"{k}_checkerboard", ">= 10")
            for name, k in zip(names, ("binary", "prior"), strict=True)
        ],
    )
