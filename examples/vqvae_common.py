"""The VQ-VAE prior example's parts: the VQ-VAE, the priors, the stages, the outputs.

``vqvae_prior.py`` declares the experiment (a :class:`VQExperiment`) and runs it:
stage 1 trains the VQ-VAE (its own loop, :func:`train_stage`), then encodes the images
once; stage 2 trains a prior per level of codes on the examples' training loop
(``train.py``); stage 3 samples, decodes and writes the outputs and the final models.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from files import (
    DataError,
    StopFlag,
    atomic_write_bytes,
    load_checkpoint,
    prepare_out_dir,
    save_checkpoint,
)
from mnist_common import HelpFormatter
from mnist_data import load_mnist
from plots import save_grid, save_png
from train import (
    LogProb,
    Recipe,
    Split,
    Trainer,
    add_threads_flag,
    check_identity,
    evaluate,
    keep_freed_memory,
    pick_device,
    torch_threads,
)

from maskedconv import GatedPixelCNN, PixelCNN

Prior = GatedPixelCNN | PixelCNN

FORMAT = "maskedconv-example-vqvae-prior/1"
STAGE_FILES = ("vqvae.ckpt.pt", "codes.pt", "prior_top.ckpt.pt", "prior_bottom.ckpt.pt")


@dataclass(frozen=True)
class VQExperiment:
    """The VQ-VAE prior experiment: each value is its flag's default."""

    # stage 1: the VQ-VAE
    hierarchy: int = 1  # levels of codes: 1, a 7x7 map; 2, a 7x7 and a 14x14 map
    vq_channels: int = 64
    code_dim: int = 64
    codebook_size: int = 512
    vq_steps: int = 1500
    vq_lr: float = 2e-3
    # stage 2: a prior per level
    order: str = "raster"  # raster: a gated PixelCNN; checkerboard: a PixelCNN, 2 steps
    prior_channels: int = 64
    prior_layers: int = 6
    prior_kernel: int = 3
    context_kernel: int = 7  # of the checkerboard context
    prior_steps: int = 2000
    prior_lr: float = 1e-3
    # both
    batch_size: int = 128
    seed: int = 0


# --------------------------------------------------------------------------- VQ-VAE


@dataclass(frozen=True)
class VQVAEConfig:
    """Everything needed to rebuild a :class:`VQVAE`; plain values, safe to save."""

    hierarchy: int = 1  # 1: a 7x7 map; 2: a 7x7 top map and a 14x14 bottom map
    hidden_channels: int = 64
    code_dim: int = 64
    codebook_size: int = 512
    decay: float = 0.9  # EMA decay of the codebook
    commitment_weight: float = 0.25
    dead_code_threshold: float = 2.0  # codes used fewer times in a batch are re-drawn


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = x + self.body(x)
        return out


def _down(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)  # halves H and W


def _up(c_in: int, c_out: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)  # doubles H and W


class VQVAE(nn.Module):
    """A small VQ-VAE for 28x28 grayscale images, one or two levels of codes.

    One level: encoder 28 -> 14 -> 7, a codebook of K vectors, decoder 7 -> 14 -> 28.
    Two levels (VQ-VAE-2's structure): the bottom encoder stops at 14x14; the top map is
    encoded from it at 7x7 and quantized; the bottom map is quantized from the bottom
    features joined with the decoded top map; the decoder reads both. Code maps are
    listed top first. The decoder gives logits of each pixel's gray value in [0, 1].
    """

    def __init__(self, config: VQVAEConfig) -> None:
        from vector_quantize_pytorch import VectorQuantize

        super().__init__()
        self.config = config
        h, d = config.hidden_channels, config.code_dim

        def quantizer() -> nn.Module:
            layer: nn.Module = VectorQuantize(
                dim=d,
                codebook_size=config.codebook_size,
                decay=config.decay,
                commitment_weight=config.commitment_weight,
                kmeans_init=True,
                threshold_ema_dead_code=config.dead_code_threshold,
                accept_image_fmap=True,
            )
            return layer

        self.enc_bottom = nn.Sequential(
            _down(1, h), nn.ReLU(), nn.Conv2d(h, h, 3, padding=1), _Residual(h)
        )
        self.enc_top = nn.Sequential(_down(h, h), _Residual(h), nn.ReLU(), nn.Conv2d(h, d, 1))
        self.vq_top = quantizer()
        if config.hierarchy == 2:
            self.dec_top = nn.Sequential(nn.Conv2d(d, h, 3, padding=1), _Residual(h), _up(h, h))
            self.pre_bottom = nn.Conv2d(2 * h, d, 1)
            self.vq_bottom = quantizer()
            self.up_top = _up(d, d)
            self.decoder = nn.Sequential(
                nn.Conv2d(2 * d, h, 3, padding=1), _Residual(h), nn.ReLU(), _up(h, 1)
            )
        else:
            self.decoder = nn.Sequential(
                nn.Conv2d(d, h, 3, padding=1),
                _Residual(h),
                nn.ReLU(),
                _up(h, h),
                nn.ReLU(),
                _up(h, 1),
            )

    @property
    def map_sizes(self) -> list[tuple[int, int]]:
        return [(7, 7)] if self.config.hierarchy == 1 else [(7, 7), (14, 14)]

    def quantizers(self) -> list[nn.Module]:
        return [self.vq_top] if self.config.hierarchy == 1 else [self.vq_top, self.vq_bottom]

    def encode(self, x: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """``x (B, 1, 28, 28)`` in [0, 1] -> (quantized maps, code maps, commitment loss),
        top first."""
        features = self.enc_bottom(x * 2 - 1)
        q_top, codes_top, loss = self.vq_top(self.enc_top(features))
        if self.config.hierarchy == 1:
            return [q_top], [codes_top], loss
        joined = torch.cat([features, self.dec_top(q_top)], 1)
        q_bottom, codes_bottom, loss_bottom = self.vq_bottom(self.pre_bottom(joined))
        return [q_top, q_bottom], [codes_top, codes_bottom], loss + loss_bottom

    def decoder_logits(self, quantized: list[Tensor]) -> Tensor:
        """Quantized maps (top first) -> logits of the gray values ``(B, 1, 28, 28)``."""
        if self.config.hierarchy == 1:
            return self.decoder(quantized[0])  # type: ignore[no-any-return]
        q_top, q_bottom = quantized
        return self.decoder(torch.cat([q_bottom, self.up_top(q_top)], 1))  # type: ignore[no-any-return]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """``x (B, 1, 28, 28)`` in [0, 1] -> (logits of x, commitment loss, code maps)."""
        quantized, codes, loss = self.encode(x)
        return self.decoder_logits(quantized), loss, codes

    def code_vectors(self, level: int, codes: Tensor) -> Tensor:
        """The codebook vectors of a map of codes: ``(B, h, w) -> (B, code_dim, h, w)``."""
        quantizer = self.quantizers()[level]
        return quantizer.get_output_from_indices(codes)  # type: ignore[operator,no-any-return]

    def decode(self, codes: list[Tensor]) -> Tensor:
        """Code maps (top first) -> images ``(B, 1, 28, 28)`` in [0, 1]."""
        quantized = [self.code_vectors(level, c) for level, c in enumerate(codes)]
        return torch.sigmoid(self.decoder_logits(quantized))


def make_prior(vq: VQVAEConfig, level: int, args: argparse.Namespace) -> Prior:
    """The prior of code map ``level`` (0: top; 1: bottom, conditioned on the top map):
    a gated PixelCNN (raster order), or a checkerboard PixelCNN (``--order``)."""
    model_class: type[Prior] = GatedPixelCNN
    options: dict[str, Any] = {"kernel_size": args.prior_kernel}
    if args.order == "checkerboard":
        model_class = PixelCNN
        options = {"kernel_size": args.context_kernel, "order": "checkerboard"}
    return model_class(
        1,
        vq.codebook_size,
        hidden_channels=args.prior_channels,
        num_layers=args.prior_layers,
        input="embedding",
        num_classes=10,
        cond_channels=vq.code_dim if level == 1 else None,
        **options,
    )


def load_models(path: str | Path, device: str = "cpu") -> tuple[VQVAE, list[Prior]]:
    """The VQ-VAE and its priors (top first) from a ``models.pt`` this example wrote.

    The file holds only tensors, numbers and strings: it is read with
    ``weights_only=True``, so loading it runs no code from the file.
    """
    saved = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise DataError(f"{path} is not a models file of this example (format {FORMAT})")
    vqvae = VQVAE(VQVAEConfig(**saved["vqvae"]["config"])).to(device)
    vqvae.load_state_dict(saved["vqvae"]["state_dict"])
    priors = []
    for entry in saved["priors"]:
        model_class = PixelCNN if entry.get("model_type") == "PixelCNN" else GatedPixelCNN
        prior = model_class.from_config(entry["config"]).to(device)
        prior.load_state_dict(entry["state_dict"])
        priors.append(prior.eval())
    return vqvae.eval(), priors


# ------------------------------------------------------------------------ stages


def make_parser(exp: VQExperiment, description: str) -> argparse.ArgumentParser:
    """The flags: the run, then each stage's (defaults from ``exp``)."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--data-dir", default="data/mnist", help="MNIST IDX files (gzip or raw)")
    p.add_argument(
        "--no-download", action="store_true", help="fail instead of downloading missing files"
    )
    p.add_argument("--out-dir", default="runs/vqvae_prior", help="checkpoints, PNGs, metrics")
    p.add_argument("--device", default="auto", help="auto (CUDA, MPS, CPU), cpu, cuda:N, mps")
    add_threads_flag(p)
    p.add_argument("--seed", type=int, default=exp.seed)
    p.add_argument("--resume", action="store_true", help="continue a stopped run in OUT_DIR")
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="cap every stage's steps, and the images encoded to a batch a step (smoke runs)",
    )
    p.add_argument("--batch-size", type=int, default=exp.batch_size)
    p.add_argument("--eval-batch-size", type=int, default=250)
    p.add_argument("--save-every", type=int, default=250, help="steps between checkpoints")
    _stage_flags(p, exp)
    p.add_argument("--samples-per-class", type=int, default=10, help="sample grid columns")
    p.add_argument("--temperature", type=float, default=1.0, help="of the prior's sampler")
    p.add_argument(
        "--compress",
        action="store_true",
        help="also code the test maps with the priors (maskedconv.codec; the codec extra)",
    )
    return p


def _stage_flags(p: argparse.ArgumentParser, exp: VQExperiment) -> None:
    p.add_argument(
        "--hierarchy", type=int, choices=(1, 2), default=exp.hierarchy, help="levels of codes"
    )
    p.add_argument("--vq-steps", type=int, default=exp.vq_steps, help="VQ-VAE training steps")
    p.add_argument("--vq-lr", type=float, default=exp.vq_lr)
    p.add_argument("--vq-channels", type=int, default=exp.vq_channels, help="VQ-VAE width")
    p.add_argument(
        "--codebook-size", type=int, default=exp.codebook_size, help="K, codes in a codebook"
    )
    p.add_argument("--code-dim", type=int, default=exp.code_dim, help="length of a codebook vector")
    p.add_argument(
        "--prior-steps", type=int, default=exp.prior_steps, help="prior training steps (each)"
    )
    p.add_argument("--prior-lr", type=float, default=exp.prior_lr)
    p.add_argument("--prior-channels", type=int, default=exp.prior_channels, help="prior width")
    p.add_argument(
        "--prior-layers", type=int, default=exp.prior_layers, help="gated layers of a prior"
    )
    p.add_argument(
        "--prior-kernel", type=int, default=exp.prior_kernel, help="kernel size of a prior"
    )
    p.add_argument(
        "--order",
        choices=("raster", "checkerboard"),
        default=exp.order,
        help="raster: a gated PixelCNN prior, a step per code; checkerboard: a PixelCNN with "
        "a checkerboard context, 2 steps a map (He et al. 2021)",
    )
    p.add_argument(
        "--context-kernel",
        type=int,
        default=exp.context_kernel,
        help="kernel size of the checkerboard context (--order checkerboard)",
    )


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    positive = (
        "batch_size",
        "eval_batch_size",
        "vq_steps",
        "vq_channels",
        "code_dim",
        "prior_steps",
        "prior_channels",
        "prior_layers",
        "samples_per_class",
        "save_every",
    )
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, but got {getattr(args, name)}")
    for name in ("max_steps", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, but got {getattr(args, name)}")
    if args.codebook_size < 2:
        parser.error(f"--codebook-size must be >= 2, but got {args.codebook_size}")
    for name in ("vq_lr", "prior_lr", "temperature"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, but got {getattr(args, name)}")
    for name in ("prior_kernel", "context_kernel"):
        kernel = getattr(args, name)
        if kernel < 3 or kernel % 2 == 0:
            parser.error(f"--{name.replace('_', '-')} must be odd and >= 3, but got {kernel}")


@dataclass
class Stage:
    """One training stage: its checkpoint, what must match to resume it, its length."""

    name: str
    path: Path
    identity: dict[str, Any]
    steps: int


def _batch(step: int, n: int, batch_size: int, seed: int) -> Tensor:
    """The indices of training batch ``step``: a fresh permutation per epoch, a pure
    function of (step, seed), so a resumed stage draws the batches it would have."""
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[i * batch_size : (i + 1) * batch_size]


def train_stage(
    stage: Stage,
    model: nn.Module,
    loss_of: Callable[[Tensor], tuple[Tensor, dict[str, float]]],
    n_train: int,
    lr: float,
    args: argparse.Namespace,
    stop: StopFlag,
) -> tuple[list[dict[str, float]], str | None]:
    """Train ``model`` for the stage's steps, resuming its checkpoint if there is one.

    ``loss_of(indices)`` gives the loss of a batch of training indices and the numbers
    to log. Returns the training curve, and the signal that stopped the stage early
    (its checkpoint written) or None when it finished.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    step, curve = 0, []
    if stage.path.exists():  # only with --resume: run() refuses the rest
        saved = load_checkpoint(
            stage.path, ("identity", "model", "optimizer", "rng_cpu", "step", "curve")
        )
        check_identity(saved["identity"], stage.identity, stage.path)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng_cpu"])
        step, curve = saved["step"], saved["curve"]

    def save() -> None:
        state = {
            "identity": stage.identity,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "step": step,
            "curve": curve,
        }
        save_checkpoint(stage.path, state)

    if step >= stage.steps:
        return curve, None
    model.train()
    bar = tqdm(total=stage.steps, initial=step, desc=stage.name, dynamic_ncols=True)
    started, seen = time.perf_counter(), 0
    try:
        while step < stage.steps:
            indices = _batch(step, n_train, args.batch_size, args.seed)
            loss, logged = loss_of(indices)
            if not torch.isfinite(loss):
                raise DataError(
                    f"{stage.name}: the loss is {loss.item()} at step {step + 1}: stopping (the "
                    f"checkpoint in {args.out_dir} is from before it); lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            seen += len(indices)
            curve.append({"step": step, **logged})
            bar.update(1)
            bar.set_postfix(
                {k: f"{v:.4f}" for k, v in logged.items()}
                | {"img_s": f"{seen / (time.perf_counter() - started):.0f}"}
            )
            signal = stop.requested
            if signal is not None:
                save()
                return curve, signal
            if step % args.save_every == 0 or step == stage.steps:
                save()
    finally:
        bar.close()
    return curve, None


def _steps(args: argparse.Namespace, steps: int) -> int:
    return steps if args.max_steps is None else min(steps, args.max_steps)


def _capped(args: argparse.Namespace, images: int, batch_size: int) -> int:
    """How many of ``images`` a run uses: all, or under ``--max-steps`` a batch a step."""
    return images if args.max_steps is None else min(images, args.max_steps * batch_size)


@torch.no_grad()
def encode_all(
    vqvae: VQVAE, images: Tensor, batch_size: int, device: torch.device, decode: bool
) -> tuple[list[Tensor], float | None]:
    """Code maps (top first, int16 on the CPU) of ``images``, and with ``decode`` the
    mean squared error of their reconstructions (gray values in [0, 1])."""
    vqvae.eval()
    maps: list[list[Tensor]] = [[] for _ in vqvae.map_sizes]
    squared = 0.0
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=f"encoding {len(images)} images", dynamic_ncols=True):
        x = images[start : start + batch_size].to(device)
        quantized, codes, _ = vqvae.encode(x)
        if decode:
            squared += float((torch.sigmoid(vqvae.decoder_logits(quantized)) - x).square().sum())
        for level, c in enumerate(codes):
            maps[level].append(c.to("cpu", torch.int16))
    return [torch.cat(m) for m in maps], squared / images.numel() if decode else None


def codebook_usage(codes: Tensor, k: int) -> dict[str, float]:
    """Perplexity of the code histogram (K when every code is equally used) and the
    number of codes used."""
    counts = torch.bincount(codes.flatten().long(), minlength=k).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"perplexity": float(entropy.exp()), "codes_used": int((counts > 0).sum())}


@torch.no_grad()
def prior_nll(
    prior: Prior,
    codes: Tensor,
    labels: Tensor,
    tops: Tensor,
    cond: Callable[[Tensor], Tensor | None],
    batch_size: int,
    device: torch.device,
) -> float:
    """Mean negative log-likelihood of the code maps ``(N, h, w)``, in bits per map.

    ``cond(tops[i])`` conditions map i: the prior of the bottom level reads the top map
    of the same image (``tops``, the top-level codes of the same set).
    """
    nats = evaluate(LogProb(prior, cond), Split(codes[:, None], labels, tops), batch_size, device)
    return nats * codes[0].numel() / math.log(2)


def compress_codes(
    priors: list[Prior],
    codes: list[Tensor],
    labels: Tensor,
    cond_of: Callable[[int], Callable[[Tensor], Tensor | None]],
    device: torch.device,
) -> list[dict[str, Any]]:
    """The test code maps of each level coded with its prior (``maskedconv.codec``),
    decoded and checked: bits per map on disk beside the prior's NLL."""
    from maskedconv import codec

    results = []
    for level, prior in enumerate(priors):
        maps = codes[level][:, None].to(device).long()
        y, cond = labels.to(device), cond_of(level)(codes[0])
        started = time.perf_counter()
        data = codec.encode(prior, maps, labels=y, cond=cond, progress=True)
        encode_s = time.perf_counter() - started
        started = time.perf_counter()
        decoded = codec.decode(prior, data, labels=y, cond=cond, progress=True)
        decode_s = time.perf_counter() - started
        exact = int((decoded == maps).flatten(1).all(1).sum())
        nll = prior_nll(prior, codes[level], labels, codes[0], cond_of(level), 500, device)
        results.append(
            {
                "map": list(maps.shape[2:]),
                "maps": len(maps),
                "decoded_exactly": exact,
                "bytes": len(data),
                "bits_per_map_on_disk": 8 * len(data) / len(maps),
                "nll_bits_per_map": nll,
                "encode_s": encode_s,
                "decode_s": decode_s,
            }
        )
        print(
            f"compressed {len(maps)} {maps.shape[2]}x{maps.shape[3]} test maps: "
            f"{8 * len(data) / len(maps):.2f} bits per map on disk, NLL {nll:.2f} "
            f"({len(data) / (nll * len(maps) / 8):.4f}x); {exact}/{len(maps)} decoded exactly; "
            f"encode {encode_s:.1f} s, decode {decode_s:.1f} s"
        )
        if exact != len(maps):
            raise RuntimeError(f"{len(maps) - exact} code maps did not decode to themselves")
    return results


def run(exp: VQExperiment, description: str, argv: list[str] | None = None) -> int:
    parser = make_parser(exp, description)
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        with torch_threads(args.threads):
            return _run(args)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out_dir)
    _check_out_dir(out, args.resume)
    device = pick_device(args.device)
    keep_freed_memory()  # as the MNIST examples and the benchmarks
    torch.manual_seed(args.seed)
    data = _Data.load(args)
    metrics: dict[str, Any] = {"device": str(device), "hierarchy": args.hierarchy}
    stop = StopFlag()
    try:
        vqvae, vq_curve = _train_vqvae(args, data, device, out, stop)
        vq_step = vq_curve[-1]["step"] if vq_curve else 0
        codes = _code_maps(args, vqvae, vq_step, data, device, out)
        metrics["vqvae"] = _vq_metrics(args, vq_step, codes)
        # Stage 2: the priors, top first.
        vqvae.eval()
        for p in vqvae.parameters():
            p.requires_grad_(False)
        metrics["priors"] = []
        priors = [
            _train_prior(args, level, vqvae, vq_step, codes, data, device, out, stop, metrics)
            for level in range(len(vqvae.map_sizes))
        ]
        total = sum(p["test_nll_bits_per_map"] for p in metrics["priors"])
        metrics["test_nll_bits_per_image"] = total
        metrics["vqvae"]["train_curve"] = vq_curve
        test_maps = len(codes["test"][0])
        if args.compress:
            metrics["compression"] = compress_codes(
                priors, codes["test"], data.test_labels[:test_maps], _conditioner(vqvae), device
            )
        # Stage 3: samples, reconstructions, the final models.
        write_outputs(vqvae, priors, data.test, data.test_labels, args, device, out, metrics)
        print(f"test NLL {total:.2f} bits per image (all code maps); outputs in {out}")
        return 0
    except _Stopped as stopped:
        print(
            f"stopped by {stopped.signal} in {stopped.stage.name}; checkpoint "
            f"{stopped.stage.path}; continue with --resume"
        )
        return 0
    finally:
        stop.close()


class _Stopped(Exception):  # noqa: N818 (a signal, not an error)
    """A signal ended a stage, after its checkpoint."""

    def __init__(self, signal: str, stage: Stage) -> None:
        super().__init__(signal)
        self.signal, self.stage = signal, stage


def _check_out_dir(out: Path, resume: bool) -> None:
    prepare_out_dir(out)
    found = [name for name in STAGE_FILES if (out / name).exists()]
    if found and not resume:
        raise DataError(
            f"--out-dir {out} holds an earlier run ({', '.join(found)}): continue it with "
            f"--resume, or choose another --out-dir"
        )
    if resume and not found:
        raise DataError(f"--resume: no checkpoint in {out}; run without --resume first")


@dataclass
class _Data:
    """MNIST as the VQ-VAE sees it: gray values in [0, 1], ``(N, 1, 28, 28)``; labels."""

    train: Tensor
    test: Tensor
    train_labels: Tensor
    test_labels: Tensor

    @classmethod
    def load(cls, args: argparse.Namespace) -> _Data:
        mnist = load_mnist(Path(args.data_dir), download=not args.no_download)

        def tensor(key: str) -> Tensor:
            return torch.from_numpy(mnist[key].copy())

        return cls(
            tensor("train").float().div_(255).unsqueeze(1),
            tensor("test").float().div_(255).unsqueeze(1),
            tensor("train_labels").long(),
            tensor("test_labels").long(),
        )


def _vq_identity(args: argparse.Namespace, config: VQVAEConfig) -> dict[str, Any]:
    return {"vqvae": asdict(config), "seed": args.seed, "batch_size": args.batch_size}


def _train_vqvae(
    args: argparse.Namespace, data: _Data, device: torch.device, out: Path, stop: StopFlag
) -> tuple[VQVAE, list[dict[str, Any]]]:
    """Stage 1: the VQ-VAE, trained (or resumed) to its step count; and its curve."""
    vq_config = VQVAEConfig(
        hierarchy=args.hierarchy,
        hidden_channels=args.vq_channels,
        code_dim=args.code_dim,
        codebook_size=args.codebook_size,
    )
    vqvae = VQVAE(vq_config).to(device)
    stage = Stage(
        "stage 1: VQ-VAE",
        out / "vqvae.ckpt.pt",
        _vq_identity(args, vq_config),
        _steps(args, args.vq_steps),
    )
    print(
        f"stage 1: a {args.hierarchy}-level VQ-VAE, K = {args.codebook_size} codes of "
        f"{args.code_dim} numbers, {sum(p.numel() for p in vqvae.parameters())} "
        f"parameters, on {device}",
        flush=True,
    )

    def vq_loss(indices: Tensor) -> tuple[Tensor, dict[str, float]]:
        x = data.train[indices].to(device)
        logits, commitment, _ = vqvae(x)
        reconstruction = F.binary_cross_entropy_with_logits(logits, x)
        logged = {"recon": reconstruction.item(), "commit": commitment.item()}
        return reconstruction + commitment, logged

    curve, signal = train_stage(stage, vqvae, vq_loss, len(data.train), args.vq_lr, args, stop)
    if signal is not None:
        raise _Stopped(signal, stage)
    return vqvae, curve


def _code_maps(
    args: argparse.Namespace,
    vqvae: VQVAE,
    vq_step: int,
    data: _Data,
    device: torch.device,
    out: Path,
) -> dict[str, Any]:
    """The code maps of both sets, made once per VQ-VAE (kept in ``codes.pt``).

    A smoke run (--max-steps) encodes only the maps its priors can use: 70,000 images
    take minutes on a CPU.
    """
    identity = _vq_identity(args, vqvae.config)
    train_maps = _capped(args, len(data.train), args.batch_size)
    test_maps = _capped(args, len(data.test), args.eval_batch_size)
    path = out / "codes.pt"
    if path.exists():
        codes = load_checkpoint(path, ("identity", "step", "train", "test", "test_mse"))
        sizes = (len(codes["train"][0]), len(codes["test"][0]))
        if (codes["identity"], codes["step"], sizes) == (
            identity,
            vq_step,
            (train_maps, test_maps),
        ):
            return codes
    started = time.perf_counter()
    batch = args.eval_batch_size
    train_codes, _ = encode_all(vqvae, data.train[:train_maps], batch, device, False)
    test_codes, test_mse = encode_all(vqvae, data.test[:test_maps], batch, device, True)
    codes = {
        "identity": identity,
        "step": vq_step,
        "train": train_codes,
        "test": test_codes,
        "test_mse": test_mse,
    }
    save_checkpoint(path, codes)
    print(f"encoded {train_maps + test_maps} images in {time.perf_counter() - started:.1f} s")
    return codes


def _vq_metrics(args: argparse.Namespace, vq_step: int, codes: dict[str, Any]) -> dict[str, Any]:
    """The VQ-VAE's reconstruction and codebook use, printed and returned."""
    metrics = {
        "steps": vq_step,
        "test_reconstruction_mse": codes["test_mse"],
        "encoded": {"train": len(codes["train"][0]), "test": len(codes["test"][0])},
        "levels": [
            {"map": list(m.shape[1:]), **codebook_usage(m, args.codebook_size)}
            for m in codes["test"]
        ],
    }
    for level in metrics["levels"]:
        print(
            f"VQ-VAE {level['map'][0]}x{level['map'][1]} codes: perplexity "
            f"{level['perplexity']:.1f}, {level['codes_used']}/{args.codebook_size} used; "
            f"test reconstruction MSE {codes['test_mse']:.4f}"
        )
    return metrics


def _conditioner(vqvae: VQVAE) -> Callable[[int], Callable[[Tensor], Tensor | None]]:
    """``cond_of(level)(top codes)``: a level's conditioning map (the top map's code
    vectors for the bottom prior; nothing for the top one)."""
    device = next(vqvae.parameters()).device

    def cond_of(level: int) -> Callable[[Tensor], Tensor | None]:
        def cond(top: Tensor) -> Tensor | None:
            return None if level == 0 else vqvae.code_vectors(0, top.to(device).long())

        return cond

    return cond_of


def _train_prior(
    args: argparse.Namespace,
    level: int,
    vqvae: VQVAE,
    vq_step: int,
    codes: dict[str, Any],
    data: _Data,
    device: torch.device,
    out: Path,
    stop: StopFlag,
    metrics: dict[str, Any],
) -> Prior:
    """Stage 2 for one level: its prior trained (or resumed) by the examples' training
    loop (``train.py``), then its test NLL."""
    size = vqvae.map_sizes[level]
    name = ("top", "bottom")[level]
    prior = make_prior(vqvae.config, level, args).to(device)
    steps = _steps(args, args.prior_steps)
    stage = Stage(
        f"stage 2: prior of the {size[0]}x{size[1]} {name} codes",
        out / f"prior_{name}.ckpt.pt",
        {
            "prior": prior.config.to_dict(),
            "vqvae": asdict(vqvae.config),
            "vqvae_step": vq_step,
            "seed": args.seed,
            "batch_size": args.batch_size,
        },
        steps,
    )
    if stage.path.exists():
        saved = load_checkpoint(stage.path, ("identity",))["identity"]
        if saved != stage.identity and {**saved, "vqvae_step": vq_step} == stage.identity:
            print(
                f"{stage.path} was trained on the codes of the VQ-VAE at step "
                f"{saved['vqvae_step']}, now at step {vq_step}: the prior starts afresh"
            )
            stage.path.unlink()
    print(f"{stage.name}: {sum(p.numel() for p in prior.parameters())} parameters", flush=True)
    # A level's maps, with their labels and the top maps that condition them.
    train, test = codes["train"], codes["test"]
    n_train, n_test = len(train[0]), len(test[0])
    trainer = Trainer(
        prior,
        Split(train[level][:, None], data.train_labels[:n_train], train[0]),
        Split(test[level][:, None], data.test_labels[:n_test], test[0]),
        Recipe(
            epochs=None,  # as many as the steps take
            batch_size=args.batch_size,
            lr=args.prior_lr,
            max_steps=steps,
            seed=args.seed,
            eval_batch_size=args.eval_batch_size,
            save_every=args.save_every,
        ),
        checkpoint=stage.path,
        identity=stage.identity,
        device=device,
        cond_of=_conditioner(vqvae)(level),
        name=f"{name} prior: ",
    )
    if stage.path.exists():  # only with --resume: run() refuses the rest
        trainer.resume(
            upgrade=lambda saved: _upgrade_prior_checkpoint(saved, trainer.steps_per_epoch)
        )
    if trainer.fit(stop):
        raise _Stopped(trainer.stopped_by or "a signal", stage)
    entry = _prior_metrics(trainer, size)
    metrics["priors"].append(entry)
    print(
        f"{name} prior: test NLL {entry['test_nll_bits_per_code']:.4f} bits per code, "
        f"{entry['test_nll_bits_per_map']:.2f} bits per map"
    )
    return prior.eval()


def _prior_metrics(trainer: Trainer, size: tuple[int, int]) -> dict[str, Any]:
    """A trained prior's entry in ``metrics.json``: its test NLL and curves, in bits."""
    bits = trainer.test_nll() / math.log(2)  # per code
    state = trainer.state
    return {
        "map": list(size),
        "steps": state["step"],
        "test_nll_bits_per_code": bits,
        "test_nll_bits_per_map": bits * size[0] * size[1],
        "train_curve": [
            {"step": step, "bits_per_code": nats / math.log(2)}
            for step, nats in state["train_curve"]
        ],
        "test_curve": state["test_curve"],
    }


def _upgrade_prior_checkpoint(saved: dict[str, Any], steps_per_epoch: int) -> dict[str, Any]:
    """A prior checkpoint of 0.2 (its own loop: ``step`` and a curve in bits per code),
    as the training loop's. It resumes at its step; the batches after it are drawn in the
    loop's order, not the one the old loop would have drawn."""
    if "epoch" in saved or "step" not in saved or "curve" not in saved:
        return saved
    step = saved["step"]
    print(f"a prior checkpoint of an earlier version of this example: resuming at step {step}")
    return {
        **saved,
        "epoch": step // steps_per_epoch,
        "batch_in_epoch": step % steps_per_epoch,
        "train_curve": [[c["step"], c["bits_per_code"] * math.log(2)] for c in saved["curve"]],
        "test_curve": [],
    }


@torch.no_grad()
def write_outputs(
    vqvae: VQVAE,
    priors: list[Prior],
    test: Tensor,
    test_labels: Tensor,
    args: argparse.Namespace,
    device: torch.device,
    out: Path,
    metrics: dict[str, Any],
) -> None:
    """Stage 3: the sample grid (a row per class), reconstructions, plots, metrics, and
    the final models."""
    per_class = args.samples_per_class
    labels = torch.arange(10, device=device).repeat_interleave(per_class)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    started = time.perf_counter()
    maps: list[Tensor] = []
    for level, (prior, size) in enumerate(zip(priors, vqvae.map_sizes, strict=True)):
        cond = None if level == 0 else vqvae.code_vectors(0, maps[0])
        drawn = prior.sample(
            len(labels),
            size,
            labels=labels,
            cond=cond,
            generator=generator,
            temperature=args.temperature,
        )
        maps.append(drawn[:, 0])
    seconds = time.perf_counter() - started
    images = vqvae.decode(maps)
    metrics["sampling"] = {
        "maps": len(labels),
        "seconds": seconds,
        "method": "cached",
        "order": args.order,
        "temperature": args.temperature,
    }
    print(f"sampled {len(labels)} code maps in {seconds:.2f} s (cached sampler)")
    save_image_grid(
        out / "samples.png",
        images,
        10,
        f"decoded samples of the code prior, a row per class 0-9 ({args.hierarchy} level(s))",
    )
    originals = test[:20].to(device)
    reconstructions = vqvae.decode(vqvae(originals)[2])
    pairs = torch.stack([originals.view(2, 10, 1, 28, 28), reconstructions.view(2, 10, 1, 28, 28)])
    save_image_grid(
        out / "reconstructions.png",
        pairs.transpose(0, 1).flatten(0, 2),
        4,
        "test digits (rows 1, 3) and their VQ-VAE reconstructions (rows 2, 4)",
    )
    save_curves(out / "curves.png", metrics)
    atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=1).encode())
    final = {
        "format": FORMAT,
        "vqvae": {"config": asdict(vqvae.config), "state_dict": vqvae.state_dict()},
        "priors": [
            {
                "model_type": type(p).__name__,
                "config": p.config.to_dict(),
                "state_dict": p.state_dict(),
                "map": list(size),
            }
            for p, size in zip(priors, vqvae.map_sizes, strict=True)
        ],
    }
    save_checkpoint(out / "models.pt", final)
    for prior, name in zip(priors, ("prior_top", "prior_bottom"), strict=False):
        prior.save_pretrained(out / name)  # config.json + model.safetensors, no pickle


def save_image_grid(path: Path, images: Tensor, rows: int, title: str) -> None:
    """``save_grid`` of gray values in [0, 1], as 256 levels."""
    save_grid(path, (images.clamp(0, 1) * 255).round().long(), 256, rows, title)


def save_curves(path: Path, metrics: dict[str, Any]) -> None:
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    vq = metrics["vqvae"]["train_curve"]
    if vq:
        left.plot([p["step"] for p in vq], [p["recon"] for p in vq], lw=0.8)
    left.set(xlabel="step", ylabel="reconstruction BCE (nats/pixel)", title="stage 1: VQ-VAE")
    for prior in metrics["priors"]:
        curve = prior["train_curve"]
        label = f"{prior['map'][0]}x{prior['map'][1]} codes"
        if curve:
            line = right.plot(
                [p["step"] for p in curve], [p["bits_per_code"] for p in curve], lw=0.8, label=label
            )
            color = line[0].get_color()
            right.axhline(prior["test_nll_bits_per_code"], ls="--", color=color, lw=0.8)
            test = prior.get("test_curve", [])
            right.plot(
                [t["step"] for t in test], [t["bits_per_dim"] for t in test], "o", color=color
            )
    right.set(
        xlabel="step", ylabel="bits per code", title="stage 2: prior NLL (dots, dashed: test)"
    )
    right.legend()
    fig.tight_layout()
    save_png(fig, path)
