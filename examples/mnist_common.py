"""The MNIST examples' experiments, flags, torchrun set-up and training loop.

Used by ``mnist_binary.py``, ``mnist_color.py`` and ``mnist_gray.py``; the data is in
``mnist_data.py``, checkpoints and safe writes in ``files.py``, figures in ``plots.py``.
It uses only maskedconv's public API. Run any of the scripts with ``--help`` for its flags.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from files import (
    DataError,
    StopFlag,
    atomic_write_bytes,
    load_checkpoint,
    prepare_out_dir,
    save_checkpoint,
)
from mnist_data import binarize, colorize, load_mnist, load_pickle
from plots import save_grid, save_nll_plot
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm

from maskedconv import GatedPixelCNN, PixelCNN, set_conv_autotune

# ------------------------------------------------------------------- experiments


@dataclass(frozen=True)
class Experiment:
    """What differs between the binary and the colour example."""

    name: str  # "binary", "color" or "gray"
    channels: int
    levels: int
    hidden_channels: int
    num_layers: int
    model: str = "pixelcnn"  # the default --model


BINARY = Experiment("binary", channels=1, levels=2, hidden_channels=64, num_layers=5)
COLOR = Experiment("color", channels=3, levels=4, hidden_channels=120, num_layers=8)
GRAY = Experiment("gray", channels=1, levels=256, hidden_channels=64, num_layers=8, model="gated")
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
        if exp.name == "binary":
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
    if exp.name == "binary":
        train, test = binarize(mnist["train"])[:, None], binarize(mnist["test"])[:, None]
    elif exp.name == "gray":
        train, test = mnist["train"][:, None], mnist["test"][:, None]
    else:
        train = colorize(mnist["train"], seed=0).transpose(0, 3, 1, 2)
        test = colorize(mnist["test"], seed=1).transpose(0, 3, 1, 2)

    def tensor(array: np.ndarray) -> Tensor:
        array = np.ascontiguousarray(array)
        return torch.from_numpy(array if array.flags.writeable else array.copy())

    return Images(
        tensor(train),
        tensor(test),
        tensor(mnist["train_labels"]).long(),
        tensor(mnist["test_labels"]).long(),
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help``: the script's docstring as written, and every flag's default."""


def make_parser(exp: Experiment, description: str) -> argparse.ArgumentParser:
    """The flags: the data and the run's outputs, the training recipe, the model."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    _data_flags(p, exp)
    _recipe_flags(p)
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


def _recipe_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128, help="per process")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    p.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many steps (smoke runs)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt")
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
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's, one per core); on a busy or shared CPU, 1 "
        "is often several times faster",
    )


def _model_flags(p: argparse.ArgumentParser, exp: Experiment) -> None:
    p.add_argument("--hidden-channels", type=int, default=exp.hidden_channels)
    p.add_argument("--num-layers", type=int, default=exp.num_layers)
    p.add_argument("--kernel-size", type=int, default=7)
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
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be >= 1, but got {args.max_steps}")
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


# ---------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device(device_flag: str, local_rank: int | None = None) -> torch.device:
    """``--device``: ``auto`` takes CUDA, then MPS, then the CPU.

    ``local_rank`` (under torchrun) chooses the GPU of this process.
    """
    if device_flag == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank or 0)
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
    else:
        try:
            device = torch.device(device_flag)
        except RuntimeError:
            raise DataError(
                f"--device {device_flag!r} is not a device: use auto, cpu, cuda, cuda:N or mps"
            ) from None
        if device.type == "cuda" and local_rank is not None and device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DataError(f"--device {device_flag}: CUDA is not available on this machine")
        torch.cuda.set_device(device)
    return device


def setup_distributed(device_flag: str) -> tuple[Dist, torch.device]:
    """Join the torchrun process group if launched by torchrun; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(device_flag, d.local_rank if d.enabled else None)
    if d.enabled:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d, device


# ----------------------------------------------------------------- checkpoints


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed memory for reuse, as ``benchmarks/report.py`` does with
    its ``MALLOC_*`` variables: by default glibc hands large freed blocks back to the OS,
    and a training step then page-faults its activations back in (up to 1.6x slower).
    Returns whether the settings took (glibc on Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # glibc's malloc.h
    settings = ((m_mmap_threshold, 32 << 20), (m_trim_threshold, 2**31 - 1), (m_top_pad, 256 << 20))
    return all(mallopt(param, value) == 1 for param, value in settings)


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
    saved = {"architecture": "pixelcnn", **saved}  # 0.1 had only the PixelCNN
    if isinstance(saved.get("model"), dict):
        # A checkpoint from 0.1 lacks the config fields added since: fill their defaults.
        # (Not a config of this version: reported as a mismatch below.)
        with contextlib.suppress(TypeError, ValueError):
            config_class = MODELS.get(saved["architecture"], PixelCNN).config_class
            saved = {**saved, "model": config_class(**saved["model"]).to_dict()}
    if saved == current:
        return
    diffs = []
    for key in ("architecture", "experiment", "data", "seed", "batch_size", "processes"):
        if saved.get(key) != current.get(key):
            diffs.append(f"{key}={saved.get(key)!r} (this run: {current.get(key)!r})")
    for key, value in saved.get("model", {}).items():
        if current["model"].get(key) != value:
            diffs.append(f"{key}={value!r} (this run: {current['model'].get(key)!r})")
    raise DataError(
        f"checkpoint {path} is from another configuration: {', '.join(diffs) or saved}; "
        f"pass the same flags, or choose another --out-dir"
    )


# ------------------------------------------------------------------- training


def evaluate(
    model: Model,
    test: Tensor,
    labels: Tensor | None,
    d: Dist,
    device: torch.device,
    batch_size: int,
    amp: bool,
) -> tuple[float, float]:
    """Test NLL over the whole set in (nats/dim, bits/dim), shared across ranks.

    Each rank takes every ``world``-th image, so no image is padded or counted twice.
    ``labels`` are given to a conditional model.
    """
    model.eval()
    shard = test[d.rank :: d.world]
    shard_labels = None if labels is None else labels[d.rank :: d.world]
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of nll in nats, images)
    with torch.no_grad():
        for start in range(0, shard.shape[0], batch_size):
            x = shard[start : start + batch_size].to(device, non_blocking=True).long()
            y = None
            if shard_labels is not None:
                y = shard_labels[start : start + batch_size].to(device)
            with autocast(device, amp):
                log_prob = model.log_prob(x, labels=y)
            total[0] -= log_prob.double().sum()
            total[1] += x.shape[0]
    if d.enabled:
        dist.all_reduce(total)
    nats_per_dim = float(total[0] / total[1]) / math.prod(test.shape[1:])
    return nats_per_dim, nats_per_dim / math.log(2)


def autocast(device: torch.device, enabled: bool) -> Any:
    return torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda"
    )


def batches(sampler: DistributedSampler[Any], batch_size: int, skip: int) -> list[list[int]]:
    indices = list(sampler)
    out = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    return out[skip:]


def param_checksum(model: nn.Module) -> Tensor:
    """Float64 sums of every parameter: equal on every rank when DDP keeps them in sync."""
    return torch.stack([p.detach().double().sum() for p in model.parameters()])


def run(exp: Experiment, description: str, argv: list[str] | None = None) -> int:
    parser = make_parser(exp, description)
    args = parser.parse_args(argv)
    check_args(exp, parser, args)
    autotune = set_conv_autotune(args.autotune)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _train(exp, args)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:  # as they were, for a caller in the same process
        set_conv_autotune(autotune)
        torch.set_num_threads(threads)


def _train(exp: Experiment, args: argparse.Namespace) -> int:
    d, device = setup_distributed(args.device)
    keep_freed_memory()  # the benchmark's allocator settings: the same speed here
    trainer = Trainer(exp, args, d, device)
    stop = StopFlag()
    try:
        trainer.announce()
        stopped = trainer.fit(stop)
        trainer.finish(stopped, stop)
        return 0
    finally:
        stop.close()
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()


class Trainer:
    """One training run: the model, its optimizer and the run's state, fitted epoch by
    epoch, evaluated and checkpointed after each (and where --max-steps or a signal
    ends the run), resumed exactly from its checkpoint."""

    def __init__(
        self, exp: Experiment, args: argparse.Namespace, d: Dist, device: torch.device
    ) -> None:
        self.exp, self.args, self.d, self.device = exp, args, d, device
        self.out = Path(args.out_dir)
        self.ckpt_path = self.out / "checkpoint.pt"
        torch.manual_seed(args.seed)
        if d.main:
            prepare_out_dir(self.out)
        if self.ckpt_path.exists() and not args.resume:  # nothing is overwritten without a word
            raise DataError(
                f"--out-dir {self.out} holds a checkpoint of an earlier run: continue it with "
                f"--resume, or choose another --out-dir (or delete {self.ckpt_path})"
            )
        images = load_images(exp, args)
        self.train, self.test = images.train, images.test
        # Labels ride along with the images always; the model sees them with --conditional.
        labels = images.train_labels
        no_labels = torch.zeros(len(self.train), dtype=torch.long)
        self.train_labels = no_labels if labels is None else labels
        self.test_labels = images.test_labels if args.conditional else None
        model = MODELS[args.model](exp.channels, exp.levels, **model_options(args)).to(device)
        if args.channels_last:
            # Module.to takes memory_format; torch's overloads do not say so.
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.model: Model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        self.identity = run_identity(exp, args, model.config.to_dict(), d.world)
        self.state: dict[str, Any] = {
            "epoch": 0,
            "step": 0,
            "batch_in_epoch": 0,
            "train_curve": [],
            "test_curve": [],
        }
        if args.resume:
            self._resume()
        self.net: nn.Module = model
        if d.enabled:
            ids = [device.index] if device.type == "cuda" else None
            self.net = DistributedDataParallel(model, device_ids=ids)
        if args.compile:  # the trunk only: forward's input checks read values
            model.forward_features = torch.compile(model.forward_features)  # type: ignore[method-assign]
        self.sampler: DistributedSampler[Any] = DistributedSampler(
            TensorDataset(self.train),
            num_replicas=d.world,
            rank=d.rank,
            shuffle=True,
            seed=args.seed,
            drop_last=True,
        )
        self.steps_per_epoch = len(self.sampler) // args.batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"--batch-size {args.batch_size} is larger than the {len(self.sampler)} "
                f"training images per process"
            )
        self.dims = math.prod(self.train.shape[1:])

    def _resume(self) -> None:
        required = ("identity", "model", "optimizer", "rng_cpu", *self.state)
        saved = load_checkpoint(self.ckpt_path, required)
        check_identity(saved["identity"], self.identity, self.ckpt_path)
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])  # moved to the model's device
        old_lr, lr = self.optimizer.param_groups[0]["lr"], self.args.lr
        if old_lr != lr:  # --lr on resume: applied, and said
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if self.d.main:
                print(f"--resume: learning rate changed from {old_lr:g} to {lr:g}")
        torch.set_rng_state(saved["rng_cpu"])
        self.state = {key: saved[key] for key in self.state}

    def announce(self) -> None:
        if not self.d.main:
            return
        n_params = sum(p.numel() for p in self.model.parameters())
        resuming = f"; resuming at step {self.state['step']}" if self.args.resume else ""
        print(
            f"{self.exp.name} MNIST: {self.train.shape[0]} train / {self.test.shape[0]} test "
            f"images {tuple(self.train.shape[1:])}, {n_params} parameters, "
            f"{self.d.world} process(es) on {self.device}{resuming}",
            flush=True,
        )

    def reached_max(self) -> bool:
        return self.args.max_steps is not None and self.state["step"] >= self.args.max_steps

    def fit(self, stop: StopFlag) -> bool:
        """Train to the end of the run; True if a signal stopped it (in any process)."""
        stopped = False
        while self.state["epoch"] < self.args.epochs and not self.reached_max() and not stopped:
            stopped = self._epoch(stop)
            if self.state["batch_in_epoch"] >= self.steps_per_epoch:
                self.state["epoch"] += 1
                self.state["batch_in_epoch"] = 0
            if not stopped:  # after each epoch, and where --max-steps ends a run
                self._evaluate()
            if self.d.main:
                self._save()
            if self.d.enabled:
                dist.barrier()
        return stopped

    def _epoch(self, stop: StopFlag) -> bool:
        """The rest of the current epoch (to --max-steps); True if a signal stopped it."""
        state, args, d = self.state, self.args, self.d
        self.sampler.set_epoch(state["epoch"])
        order = batches(self.sampler, args.batch_size, state["batch_in_epoch"])
        loader = DataLoader(
            TensorDataset(self.train, self.train_labels),
            batch_sampler=order[: self.steps_per_epoch - state["batch_in_epoch"]],
            num_workers=args.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        self.model.train()
        # The bar ends where this epoch's part of the run ends: at the epoch's end, or at
        # --max-steps.
        last = self.steps_per_epoch
        if args.max_steps is not None:
            last = min(last, state["batch_in_epoch"] + args.max_steps - state["step"])
        bar = tqdm(
            total=last,
            initial=state["batch_in_epoch"],
            desc=f"epoch {state['epoch'] + 1}/{args.epochs}",
            disable=not d.main,
            dynamic_ncols=True,
        )
        started, seen, stopped = time.perf_counter(), 0, False
        for x, y in loader:
            value = self._step(x.to(self.device, non_blocking=True).long(), y)
            seen += x.shape[0] * d.world
            state["train_curve"].append([state["step"], value])
            bar.set_postfix(  # this step's loss, shown with this step's count
                nats_per_dim=f"{value:.4f}",
                img_s=f"{seen / (time.perf_counter() - started):.0f}",
                refresh=False,
            )
            bar.update(1)
            stopped = stop.requested is not None
            if d.enabled:  # ranks that stop at different steps would hang DDP
                flag = torch.tensor([float(stopped)], device=self.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stopped = bool(flag.item())
            if stopped or self.reached_max():
                break
        bar.close()
        return stopped

    def _step(self, x: Tensor, y: Tensor) -> float:
        """One optimizer step on the batch; its loss in nats/dim."""
        labels = y.to(self.device, non_blocking=True) if self.args.conditional else None
        try:
            with autocast(self.device, self.args.amp):
                # Through net's forward, so that DDP syncs the gradients.
                params = self.net(x, labels=labels)
                loss = -self.model.log_prob_from_params(params, x).mean() / self.dims
        except ValueError as err:  # e.g. NaN weights: log_prob refuses them
            raise DataError(
                f"at step {self.state['step'] + 1}: {err}; stopping (the checkpoint in "
                f"{self.out} is from before it)"
            ) from None
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip)
        self.optimizer.step()
        self.state["step"] += 1
        self.state["batch_in_epoch"] += 1
        value = loss.item()
        if not math.isfinite(value):
            # Stop before this step's weights reach a checkpoint: the last saved one stays
            # the last good one.
            raise DataError(
                f"the training loss is {value} at step {self.state['step']}: stopping (the "
                f"checkpoint in {self.out} is from before it); lower --lr or --clip, or "
                f"check the data and the checkpoint"
            )
        return value

    def _evaluate(self) -> None:
        if self.d.main:
            print(f"evaluating on the {len(self.test)} test images ...", flush=True)
        args, state = self.args, self.state
        nats, bits = evaluate(
            self.model, self.test, self.test_labels, self.d, self.device,
            args.eval_batch_size, args.amp,
        )  # fmt: skip
        state["test_curve"].append(
            {
                "epoch": state["epoch"] + state["batch_in_epoch"] / self.steps_per_epoch,
                "step": state["step"],
                "nats_per_dim": nats,
                "bits_per_dim": bits,
            }
        )
        if self.d.main:
            print(f"step {state['step']}: test NLL {nats:.4f} nats/dim, {bits:.4f} bits/dim")

    def _save(self) -> None:
        checkpoint = {
            "identity": self.identity,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            **self.state,
        }
        save_checkpoint(self.ckpt_path, checkpoint)
        write_metrics(self.out, self.state, self.steps_per_epoch)

    def finish(self, stopped: bool, stop: StopFlag) -> None:
        """Check the ranks agree; then the samples and the model, or how to resume."""
        d = self.d
        if d.enabled:
            sums = param_checksum(self.model)
            gathered = [torch.zeros_like(sums) for _ in range(d.world)]
            dist.all_gather(gathered, sums)
            if d.main:
                same = all(torch.equal(g, gathered[0]) for g in gathered)
                print(f"parameters {'identical' if same else 'DIFFERENT'} across {d.world} ranks")
        if d.main and stopped:
            print(
                f"stopped by {stop.requested or 'a signal to another process'} at step "
                f"{self.state['step']}; checkpoint {self.ckpt_path}; continue with --resume"
            )
        elif d.main:
            write_images(
                self.model, self.test, self.test_labels, self.exp, self.args, self.device,
                self.out,
            )  # fmt: skip
            self.model.save_pretrained(self.out / "model")  # no pickle: safetensors + config
            print(f"outputs in {self.out}; the model in {self.out / 'model'}")
        if d.enabled:
            dist.barrier()


def write_metrics(out: Path, state: dict[str, Any], steps_per_epoch: int) -> None:
    metrics = {
        "train": state["train_curve"],
        "test": state["test_curve"],
        "steps_per_epoch": steps_per_epoch,
    }
    atomic_write_bytes(out / "metrics.json", json.dumps(metrics).encode())
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["epoch", "step", "test_nats_per_dim", "test_bits_per_dim"])
    for t in state["test_curve"]:
        writer.writerow(
            [f"{t['epoch']:.3f}", t["step"], f"{t['nats_per_dim']:.6f}", f"{t['bits_per_dim']:.6f}"]
        )
    atomic_write_bytes(out / "metrics.csv", buffer.getvalue().encode())
    save_nll_plot(
        out / "nll.png",
        [tuple(p) for p in state["train_curve"]],
        state["test_curve"],
        steps_per_epoch,
    )


def write_images(
    model: Model,
    test: Tensor,
    test_labels: Tensor | None,
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
    given = test[:10].to(device).long()
    known = torch.zeros_like(given, dtype=torch.bool)
    known[:, :, :14] = True
    given_labels = None if test_labels is None else test_labels[:10].to(device)
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
