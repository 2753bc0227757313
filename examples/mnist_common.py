"""The MNIST examples: their experiments, data, flags, and what a run writes.

Used by ``mnist_binary.py``, ``mnist_color.py`` and ``mnist_gray.py``. The training loop is
``train.py``, the data ``mnist_data.py``, checkpoints and safe writes ``files.py``, figures
``plots.py``. It uses only maskedconv's public API. Run any of the scripts with
``--help`` for its flags.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import train as loop  # (not "train": the name of a split here)
from files import DataError, StopFlag, prepare_out_dir
from mnist_data import binarize, load_mnist, load_pickle
from plots import save_grid
from torch import Tensor
from train import (
    Dist,
    Recipe,
    Split,
    Trainer,
    add_threads_flag,
    keep_freed_memory,
    setup_distributed,
    torch_threads,
)

from maskedconv import GatedPixelCNN, PixelCNN, set_conv_autotune

# ------------------------------------------------------------------- experiments


@dataclass(frozen=True)
class Experiment:
    """An MNIST experiment: its data, its model and its recipe (the flags' defaults).

    ``images(gray, split)`` makes the experiment's images ``(N, C, 28, 28)`` in
    ``[0, levels)`` from MNIST's ``(N, 28, 28)`` uint8 digits of ``split`` ("train" or
    "test").
    """

    name: str  # names the run: runs/mnist_{name}, the checkpoint's identity
    # the data
    images: Callable[[np.ndarray, str], np.ndarray]
    channels: int
    levels: int
    # the model
    model: str = "pixelcnn"  # or "gated"
    hidden_channels: int = 64
    num_layers: int = 5
    kernel_size: int = 7
    # the recipe
    epochs: int = 10
    batch_size: int = 128  # per process
    lr: float = 1e-3
    clip: float = 1.0


MODELS: dict[str, type[PixelCNN] | type[GatedPixelCNN]] = {
    "pixelcnn": PixelCNN,
    "gated": GatedPixelCNN,
}
Model = PixelCNN | GatedPixelCNN


def _nchw(array: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


@dataclass
class Images:
    """Train and test images ``(N, C, 28, 28)`` uint8 in ``[0, K)``, with labels if known."""

    train: Tensor
    test: Tensor
    train_labels: Tensor | None
    test_labels: Tensor | None


def load_images(exp: Experiment, args: argparse.Namespace) -> Images:
    """The experiment's images; the course's pickles carry no labels."""
    if args.pickle is not None:
        data = load_pickle(Path(args.pickle))
        train, test = data["train"], data["test"]
        if exp.levels == 2:  # the course's binary experiment thresholds its gray pickle
            train, test = binarize(train), binarize(test)
        for key, array in (("train", train), ("test", test)):
            if array.shape[-1] != exp.channels or array.max() >= exp.levels:
                raise DataError(
                    f"{args.pickle}: '{key}' has {array.shape[-1]} channels and values up to "
                    f"{array.max()}, but the {exp.name} model needs {exp.channels} channels in "
                    f"[0, {exp.levels})"
                )
        if args.conditional:
            raise DataError(
                f"{args.pickle}: the course's pickles carry no class labels; --conditional "
                f"needs MNIST's label files (use --data-dir)"
            )
        return Images(_nchw(train), _nchw(test), None, None)
    download, verify = not args.no_download, not args.no_verify
    mnist = load_mnist(Path(args.data_dir), download=download, verify=verify)

    def tensor(array: np.ndarray) -> Tensor:
        array = np.ascontiguousarray(array)
        return torch.from_numpy(array if array.flags.writeable else array.copy())

    return Images(
        tensor(exp.images(mnist["train"], "train")),
        tensor(exp.images(mnist["test"], "test")),
        tensor(mnist["train_labels"]).long(),
        tensor(mnist["test_labels"]).long(),
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help``: the script's docstring as written, and every flag's default."""


def make_parser(exp: Experiment, description: str) -> argparse.ArgumentParser:
    """The flags: the data and the run's outputs, the training recipe, the model."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    _data_flags(p, exp)
    _recipe_flags(p, exp)
    _model_flags(p, exp)
    return p


def _data_flags(p: argparse.ArgumentParser, exp: Experiment) -> None:
    p.add_argument(
        "--data-dir",
        default="data/mnist",
        help="MNIST IDX files (gzip or raw); downloaded here if missing",
    )
    p.add_argument(
        "--no-download", action="store_true", help="fail instead of downloading missing files"
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the SHA-256 check (for MNIST-format IDX files of your own)",
    )
    p.add_argument(
        "--pickle", default=None, help="read the course's mnist.pkl / mnist_colored.pkl instead"
    )
    p.add_argument(
        "--out-dir", default=f"runs/mnist_{exp.name}", help="plots, samples, metrics, checkpoint"
    )
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--num-samples", type=int, default=100, help="images in the sample grid")


def _recipe_flags(p: argparse.ArgumentParser, exp: Experiment) -> None:
    p.add_argument("--epochs", type=int, default=exp.epochs)
    p.add_argument("--batch-size", type=int, default=exp.batch_size, help="per process")
    p.add_argument("--lr", type=float, default=exp.lr)
    p.add_argument("--clip", type=float, default=exp.clip, help="gradient norm clipping")
    p.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many steps (smoke runs)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt")
    p.add_argument(
        "--save-every",
        type=int,
        default=None,
        help="also checkpoint every N steps (default: after each epoch only); a crash then "
        "loses at most N steps",
    )
    p.add_argument(
        "--amp", action="store_true", help="bf16 autocast on GPU (the loss stays float32)"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="keep the model's weights and activations channels-last (NHWC); on some CPUs "
        "and GPUs a faster training step (docs/performance.md)",
    )
    p.add_argument(
        "--autotune",
        action="store_true",
        help="time each masked conv's formulations once and keep the fastest "
        "(maskedconv.set_conv_autotune); results then differ in the last float digits "
        "from run to run, so a resumed run is no longer bit-identical",
    )
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    add_threads_flag(p)


def _model_flags(p: argparse.ArgumentParser, exp: Experiment) -> None:
    p.add_argument("--hidden-channels", type=int, default=exp.hidden_channels)
    p.add_argument("--num-layers", type=int, default=exp.num_layers)
    p.add_argument("--kernel-size", type=int, default=exp.kernel_size)
    p.add_argument(
        "--head",
        choices=("categorical", "dmol"),
        default="categorical",
        help="output distribution: a softmax over the levels, or PixelCNN++'s discretized "
        "logistic mixture (channels coupled by the head, so no R -> G -> B masks)",
    )
    p.add_argument("--num-mixtures", type=int, default=5, help="mixture components of --head dmol")
    p.add_argument(
        "--model",
        choices=tuple(MODELS),
        default=exp.model,
        help="pixelcnn: stacked masked convs (a blind spot); gated: the gated PixelCNN with "
        "vertical and horizontal stacks (none)",
    )
    p.add_argument(
        "--order",
        choices=("raster", "checkerboard", "group-checkerboard"),
        default="raster",
        help="pixelcnn: raster order (H*W sampling steps), a checkerboard context "
        "(2 steps: the anchors, then the rest; He et al. 2021), at some cost in NLL, or a "
        "group checkerboard (2G steps: each colour group in turn as a checkerboard, seeing "
        "the earlier groups everywhere; ELIC, He et al. 2022)",
    )
    p.add_argument(
        "--color-groups",
        type=int,
        default=None,
        help="ordered channel groups: 1 models the channels independently given the past "
        "(the course's 'independent channels'); default: the head's choice (categorical: "
        "one per channel, R -> G -> B; dmol: 1)",
    )
    p.add_argument(
        "--conditional",
        action="store_true",
        help="condition on the digit class; the sample grid has one row per class",
    )


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The model's keyword arguments from the flags (the same for checking and building)."""
    return {
        "hidden_channels": args.hidden_channels,
        "num_layers": args.num_layers,
        "kernel_size": args.kernel_size,
        "head": args.head,
        "num_mixtures": args.num_mixtures,
        "num_classes": 10 if args.conditional else None,
        "color_groups": args.color_groups,
        # Only where it differs from the default: GatedPixelCNN has raster order only.
        **({"order": args.order} if args.order != "raster" else {}),
    }


def check_args(exp: Experiment, parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "eval_batch_size", "num_samples", "num_mixtures"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, but got {getattr(args, name)}")
    for name in ("max_steps", "save_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, but got {value}")
    for name in ("lr", "clip"):
        value = getattr(args, name)
        if not (value > 0 and math.isfinite(value)):
            parser.error(f"--{name} must be a finite number > 0, but got {value}")
    if Path(args.data_dir).exists() and not Path(args.data_dir).is_dir():
        parser.error(f"--data-dir must be a directory, but {args.data_dir} is a file")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, but got {args.threads}")
    if args.color_groups is not None and (
        args.color_groups < 1 or exp.channels % args.color_groups
    ):
        parser.error(
            f"--color-groups must divide the {exp.channels} channels, but got {args.color_groups}"
        )
    if args.order != "raster" and args.model != "pixelcnn":
        parser.error(f"--order {args.order} needs --model pixelcnn, but got --model {args.model}")
    if args.num_workers < 0:
        parser.error(f"--num-workers must be >= 0, but got {args.num_workers}")
    try:  # every model flag, checked by the model's own config before anything runs
        MODELS[args.model].config_class(exp.channels, exp.levels, **model_options(args))
    except (TypeError, ValueError) as err:
        parser.error(f"the model flags do not make a model: {err}")


def run_identity(
    exp: Experiment, args: argparse.Namespace, model_config: dict[str, Any], world: int
) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed by this run (and continue exactly)."""
    return {
        "architecture": args.model,
        "experiment": exp.name,
        "data": "pickle" if args.pickle else "mnist",
        "seed": args.seed,
        "batch_size": args.batch_size,
        "processes": world,
        "model": model_config,
    }


def check_identity(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """:func:`train.check_identity`, reading checkpoints of 0.1 as well."""
    saved = {"architecture": "pixelcnn", **saved}  # 0.1 had only the PixelCNN
    if isinstance(saved.get("model"), dict):
        # A checkpoint from 0.1 lacks the config fields added since: fill their defaults.
        # (Not a config of this version: reported as a mismatch.)
        with contextlib.suppress(TypeError, ValueError):
            config_class = MODELS.get(saved["architecture"], PixelCNN).config_class
            saved = {**saved, "model": config_class(**saved["model"]).to_dict()}
    loop.check_identity(saved, current, path)


def run(exp: Experiment, description: str, argv: list[str] | None = None) -> int:
    parser = make_parser(exp, description)
    args = parser.parse_args(argv)
    check_args(exp, parser, args)
    autotune = set_conv_autotune(args.autotune)
    try:
        with torch_threads(args.threads):
            return _train(exp, args)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:  # as it was, for a caller in the same process
        set_conv_autotune(autotune)


def recipe(args: argparse.Namespace) -> Recipe:
    return Recipe(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        clip=args.clip,
        max_steps=args.max_steps,
        seed=args.seed,
        amp=args.amp,
        compile=args.compile,
        num_workers=args.num_workers,
        eval_batch_size=args.eval_batch_size,
        save_every=args.save_every,
    )


def _train(exp: Experiment, args: argparse.Namespace) -> int:
    d, device = setup_distributed(args.device)
    keep_freed_memory()  # the benchmark's allocator settings: the same speed here
    stop = StopFlag()
    try:
        trainer = _trainer(exp, args, d, device)
        stopped = trainer.fit(stop)
        same = trainer.ranks_agree()
        if d.main and d.enabled:
            print(f"parameters {'identical' if same else 'DIFFERENT'} across {d.world} ranks")
        if d.main and stopped:
            print(
                f"stopped by {trainer.stopped_by or 'a signal to another process'} at step "
                f"{trainer.state['step']}; checkpoint {trainer.checkpoint}; continue with --resume"
            )
        elif d.main:
            out, model = Path(args.out_dir), trainer.model
            assert isinstance(model, PixelCNN | GatedPixelCNN)
            write_images(model, trainer.test, exp, args, device, out)
            model.save_pretrained(out / "model")  # no pickle: safetensors + config
            print(f"outputs in {out}; the model in {out / 'model'}")
        if d.enabled:
            dist.barrier()
        return 0
    finally:
        stop.close()
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _trainer(exp: Experiment, args: argparse.Namespace, d: Dist, device: torch.device) -> Trainer:
    """The run's model, data and recipe in a :class:`train.Trainer`, resumed if asked."""
    out = Path(args.out_dir)
    checkpoint = out / "checkpoint.pt"
    torch.manual_seed(args.seed)
    if d.main:
        prepare_out_dir(out)
    if checkpoint.exists() and not args.resume:  # nothing is overwritten without a word
        raise DataError(
            f"--out-dir {out} holds a checkpoint of an earlier run: continue it with "
            f"--resume, or choose another --out-dir (or delete {checkpoint})"
        )
    images = load_images(exp, args)
    labels = (images.train_labels, images.test_labels) if args.conditional else (None, None)
    model = MODELS[args.model](exp.channels, exp.levels, **model_options(args)).to(device)
    if args.channels_last:
        # Module.to takes memory_format; torch's overloads do not say so.
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    trainer = Trainer(
        model,
        Split(images.train, labels[0]),
        Split(images.test, labels[1]),
        recipe(args),
        checkpoint=checkpoint,
        identity=run_identity(exp, args, model.config.to_dict(), d.world),
        device=device,
        d=d,
        metrics_dir=out,
    )
    if args.resume:
        trainer.resume(check_identity)
    if d.main:
        n_params = sum(p.numel() for p in model.parameters())
        resuming = f"; resuming at step {trainer.state['step']}" if args.resume else ""
        print(
            f"{exp.name} MNIST: {len(images.train)} train / {len(images.test)} test "
            f"images {tuple(images.train.shape[1:])}, {n_params} parameters, "
            f"{d.world} process(es) on {device}{resuming}",
            flush=True,
        )
    return trainer


def write_images(
    model: Model,
    test: Split,
    exp: Experiment,
    args: argparse.Namespace,
    device: torch.device,
    out: Path,
) -> None:
    generator = torch.Generator(device=device).manual_seed(args.seed)
    name = f"{type(model).__name__} samples ({exp.name} MNIST)"
    if args.conditional:  # one row per class, 0 to 9
        per_class = max(1, args.num_samples // 10)
        labels = torch.arange(10, device=device).repeat_interleave(per_class)
        samples = model.sample(len(labels), (28, 28), labels=labels, generator=generator)
        save_grid(out / "samples.png", samples, exp.levels, 10, f"{name}, a row per class 0-9")
    else:
        samples = model.sample(args.num_samples, (28, 28), generator=generator)
        rows = max(1, int(math.sqrt(args.num_samples)))
        save_grid(out / "samples.png", samples, exp.levels, rows, name)
    # Completion: the top half of test digits given, the bottom half drawn.
    given = test.x[:10].to(device).long()
    known = torch.zeros_like(given, dtype=torch.bool)
    known[:, :, :14] = True
    given_labels = None if test.labels is None else test.labels[:10].to(device)
    completions = [
        model.sample(x=given, known=known, labels=given_labels, generator=generator)
        for _ in range(4)
    ]
    masked = torch.where(known, given, torch.zeros_like(given))
    grid = torch.stack([given, masked, *completions], dim=1).flatten(0, 1)  # (10*6, C, H, W)
    save_grid(
        out / "completion.png",
        grid,
        exp.levels,
        10,
        "completion: original | top half given | 4 completions",
    )
