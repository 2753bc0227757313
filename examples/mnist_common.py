"""Shared code of the MNIST examples: data, training loop, checkpoints, plots, torchrun.

Used by ``mnist_binary.py`` and ``mnist_color.py``; it uses only maskedconv's public
API. Run either script with ``--help`` for its flags.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm

from maskedconv import GatedPixelCNN, PixelCNN, set_conv_autotune

# --------------------------------------------------------------------------- data

MNIST_FILES = {
    # file name: SHA-256 of the decompressed IDX bytes
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)


class DataError(Exception):
    """Data that is missing, corrupt or refused; the message says what to do."""


def parse_idx(raw: bytes) -> np.ndarray:
    """Parse IDX bytes: big-endian magic ``0x000008NN`` (NN = rank), dims, uint8 data."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError("not an IDX file of unsigned bytes (bad magic number)")
    rank = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
    offset = 4 + 4 * rank
    size = math.prod(dims)
    if len(raw) - offset != size:
        raise DataError(f"IDX header says {dims} ({size} bytes) but {len(raw) - offset} follow")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


_LARGEST_IDX = 47_040_016  # train-images-idx3-ubyte, the largest MNIST file


def _inflate(path: Path) -> bytes:
    """The gzip file's contents, refusing more than the largest MNIST file: a small file
    that inflates to gigabytes (a gzip bomb) is stopped there, before the checksum."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read(_LARGEST_IDX + 1)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path} is not a valid gzip file ({err}); delete it") from None
    if len(raw) > _LARGEST_IDX:
        raise DataError(
            f"{path} inflates to more than the largest MNIST file ({_LARGEST_IDX:,} bytes): "
            f"not MNIST; delete it"
        )
    return raw


def _read_verified(data_dir: Path, name: str, expected_sha: str | None) -> np.ndarray | None:
    """The IDX array of ``name`` (``.gz`` or raw) in ``data_dir``, or None if absent."""
    for path in (data_dir / f"{name}.gz", data_dir / name):
        if not path.exists():
            continue
        if path.suffix == ".gz":
            raw = _inflate(path)
        else:
            if path.stat().st_size > _LARGEST_IDX:
                raise DataError(f"{path} is larger than any MNIST file; delete it")
            raw = path.read_bytes()
        if expected_sha is not None:
            digest = hashlib.sha256(raw).hexdigest()
            if digest != expected_sha:
                raise DataError(
                    f"{path}: SHA-256 of the decompressed bytes is {digest}, expected "
                    f"{expected_sha}; the file is corrupt or not MNIST: delete it"
                )
        return parse_idx(raw)
    return None


def _download(name: str, data_dir: Path) -> None:
    errors = []
    for mirror in MNIST_MIRRORS:
        url = f"{mirror}{name}.gz"
        try:
            with urllib.request.urlopen(url, timeout=20) as response:
                total = int(response.headers.get("Content-Length") or 0)
                buffer = io.BytesIO()
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"{name}.gz") as bar:
                    while chunk := response.read(1 << 16):
                        buffer.write(chunk)
                        bar.update(len(chunk))
            atomic_write_bytes(data_dir / f"{name}.gz", buffer.getvalue())
            return
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            errors.append(f"{url}: {err}")
    raise DataError("; ".join(errors))


def load_mnist(data_dir: Path, download: bool = True, verify: bool = True) -> dict[str, np.ndarray]:
    """MNIST as uint8 arrays ``train``/``test`` ``(N, 28, 28)`` and labels.

    Files are read from ``data_dir`` (gzip or raw IDX under the original names) and
    checked against the SHA-256 of their decompressed bytes; missing ones are
    downloaded there when ``download`` is True.

    Raises:
        DataError: one line saying what is wrong and where to put the files.
    """
    out = {}
    keys = {
        "train-images-idx3-ubyte": "train",
        "train-labels-idx1-ubyte": "train_labels",
        "t10k-images-idx3-ubyte": "test",
        "t10k-labels-idx1-ubyte": "test_labels",
    }
    for name, sha in MNIST_FILES.items():
        array = _read_verified(data_dir, name, sha if verify else None)
        if array is None:
            fail = (
                f"MNIST file {name}.gz is not in {data_dir}. Put the four MNIST files "
                f"({', '.join(f + '.gz' for f in MNIST_FILES)}) there"
            )
            if not download:
                raise DataError(fail)
            try:
                data_dir.mkdir(parents=True, exist_ok=True)
                _download(name, data_dir)
            except DataError as err:
                raise DataError(
                    f"{fail}, or connect to the internet (download failed: {err})"
                ) from None
            array = _read_verified(data_dir, name, sha if verify else None)
            assert array is not None
        out[keys[name]] = array
    return out


def binarize(images: np.ndarray) -> np.ndarray:
    """Pixels > 127.5 become 1, the rest 0, as in the design blog and the course."""
    return (images > 127.5).astype(np.uint8)


def colorize(images: np.ndarray, seed: int, texture: int = 7) -> np.ndarray:
    """Coloured MNIST: single-colour digits on textured multi-colour backgrounds.

    A deterministic function of ``(images, seed)``, with 2-bit colour (levels 0..3 per
    RGB channel). Each image gets a background of ``texture``-pixel square patches, each
    a random colour from one half of the palette, dark (every channel 0 or 1) or light
    (every channel 2 or 3), and a digit (pixels > 127.5) of one random colour with at
    least one channel at the far end (3 on dark, 0 on light), so that the digit always
    differs from every background patch by 2 or more levels in some channel. In the
    spirit of the Berkeley course's ``mnist_colored.pkl``, but not that file.

    Args:
        images: ``(N, H, W)`` uint8 grayscale digits.
        seed: the colour draw's seed.
        texture: side of the background's colour patches, in pixels.

    Returns:
        ``(N, H, W, 3)`` uint8 with values in ``[0, 4)``.
    """
    rng = np.random.default_rng(seed)
    n, h, w = images.shape
    light = rng.random(n) < 0.5  # (N,)
    ph, pw = -(-h // texture), -(-w // texture)
    patches = rng.integers(0, 2, size=(n, ph, pw, 3)) + 2 * light[:, None, None, None]
    background = patches.repeat(texture, axis=1).repeat(texture, axis=2)[:, :h, :w]
    digit = rng.integers(0, 4, size=(n, 3))
    far_channel = rng.integers(0, 3, size=n)
    digit[np.arange(n), far_channel] = np.where(light, 0, 3)
    mask = (images > 127.5)[..., None]
    return np.where(mask, digit[:, None, None, :], background).astype(np.uint8)


class _ArraysOnly(pickle.Unpickler):
    """Admits numpy arrays and plain containers; refuses every other class."""

    ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: this reader admits only numpy arrays and "
            f"plain containers (a pickle can run code)"
        )


def load_pickle(path: Path) -> dict[str, np.ndarray]:
    """Read the course's ``mnist.pkl`` / ``mnist_colored.pkl``.

    Returns ``train`` and ``test``, each an ``(N, H, W, C)`` uint8 array.
    """
    try:
        with open(path, "rb") as f:
            data = _ArraysOnly(f).load()
    except FileNotFoundError:
        raise DataError(f"--pickle {path} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"--pickle {path} is a directory, not a pickle file") from None
    except pickle.UnpicklingError as err:
        raise DataError(f"{path}: {err}") from None
    except EOFError:
        raise DataError(f"{path} is empty or truncated: not a whole pickle") from None
    except MemoryError:
        raise DataError(f"{path} declares an array larger than this machine's memory") from None
    except Exception as err:  # a damaged pickle: ValueError, TypeError, ... from numpy
        raise DataError(f"{path} is not a readable pickle ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict) or not {"train", "test"} <= set(data):
        raise DataError(f"{path}: expected a dict with 'train' and 'test' arrays")
    for key in ("train", "test"):
        array = data[key]
        if not isinstance(array, np.ndarray) or array.ndim != 4 or array.dtype != np.uint8:
            raise DataError(
                f"{path}: '{key}' must be a uint8 array (N, H, W, C), got {type(array)}"
            )
    return {"train": data["train"], "test": data["test"]}


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
MODELS = {"pixelcnn": PixelCNN, "gated": GatedPixelCNN}
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
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
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
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--num-samples", type=int, default=100, help="images in the sample grid")
    return p


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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a plain file is not
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def prepare_out_dir(out: Path) -> None:
    """Check that ``out`` can be written before any work, and clear stale temporaries.

    A save killed between writing and renaming leaves a ``.NAME.*.tmp`` file (a whole
    checkpoint's size); the run that finds them is the only writer, so they go.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise DataError(f"--out-dir {out} cannot be written: {err.strerror or err}") from None
    for stale in out.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def payload_digest(value: Any) -> str:
    """SHA-256 of a checkpoint's contents: every tensor's dtype, shape and bytes and every
    plain value, keys in sorted order. ``torch.load`` does not check the zip's CRCs, so a
    flipped byte in a tensor would otherwise load without a word."""
    sha = hashlib.sha256()

    def feed(v: Any) -> None:
        if isinstance(v, Tensor):
            t = v.detach().cpu().contiguous().reshape(-1)
            sha.update(f"T{t.dtype}{tuple(v.shape)}".encode())
            sha.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(v, dict):
            sha.update(f"D{len(v)}".encode())
            for key in sorted(v, key=repr):
                feed(key)
                feed(v[key])
        elif isinstance(v, list | tuple):
            sha.update(f"L{len(v)}".encode())
            for item in v:
                feed(item)
        else:
            sha.update(f"V{type(v).__name__}:{v!r}".encode())

    feed(value)
    return sha.hexdigest()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically, with the digest of its contents under ``"digest"``."""
    buffer = io.BytesIO()
    torch.save({**state, "digest": payload_digest(state)}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A checkpoint of :func:`save_checkpoint`, verified; one-line ``DataError`` otherwise.

    Plain tensors, numbers and strings only (``weights_only``): loading never runs code
    from the file. The contents must match the digest saved with them (checkpoints of
    0.1 have none and load as they are), and hold the ``required`` keys.
    """
    if not path.exists():
        raise DataError(f"--resume: no checkpoint at {path}; run without --resume first")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # EOFError, UnpicklingError, RuntimeError (zip), ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {reason[:200]}); it is "
            f"truncated or corrupt: delete it (and run without --resume), or choose another "
            f"--out-dir"
        ) from None
    if not isinstance(state, dict):
        raise DataError(
            f"{path} is not a checkpoint of this example (it holds a {type(state).__name__})"
        )
    digest = state.pop("digest", None)
    if digest is not None and digest != payload_digest(state):
        raise DataError(
            f"{path} is corrupt: its contents do not match the SHA-256 saved with them; delete "
            f"it (and run without --resume), or choose another --out-dir"
        )
    missing = [key for key in required if key not in state]
    if missing:
        raise DataError(
            f"{path} is not a checkpoint of this example (it lacks {', '.join(map(repr, missing))})"
        )
    return state


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


# ------------------------------------------------------------------ signals


class StopFlag:
    """First Ctrl-C / SIGTERM: finish the step, checkpoint, exit. Second Ctrl-C: exit now."""

    def __init__(self) -> None:
        self.requested: str | None = None
        signals = (signal.SIGINT, signal.SIGTERM)
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def close(self) -> None:
        """Give the signals back to whoever had them."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = signal.Signals(signum).name
        # A second Ctrl-C raises KeyboardInterrupt at once; checkpoints are atomic, so
        # that can never leave a half-written file.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(
            f"\n{self.requested}: stopping after this step (Ctrl-C again to quit now)",
            file=sys.stderr,
        )


# ------------------------------------------------------------------- plots


def save_nll_plot(
    path: Path, train: list[tuple[int, float]], test: list[dict[str, float]], steps_per_epoch: int
) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        steps, values = zip(*train, strict=True)
        ax.plot(np.array(steps) / steps_per_epoch, values, lw=0.6, alpha=0.7, label="train")
    if test:
        ax.plot(
            [t["step"] / steps_per_epoch for t in test],
            [t["nats_per_dim"] for t in test],
            "o-",
            label="test",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("NLL (nats/dim)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save_png(fig, path)


def image_grid(images: Tensor, levels: int, rows: int) -> np.ndarray:
    """``(N, C, H, W)`` levels -> one ``(rows*H', cols*W', 3)`` float RGB array."""
    n, c, h, w = images.shape
    cols = -(-n // rows)
    pad = 1
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 0.5)
    pics = images.float().cpu().numpy() / (levels - 1)  # (N, C, H, W) in [0, 1]
    for i in range(n):
        r, col = divmod(i, cols)
        pic = pics[i].transpose(1, 2, 0)
        if c == 1:
            pic = pic.repeat(3, axis=2)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = pic
    return grid


def save_grid(path: Path, images: Tensor, levels: int, rows: int, title: str) -> None:
    import matplotlib.pyplot as plt

    grid = image_grid(images, levels, rows)
    fig, ax = plt.subplots(figsize=(8, 8 * grid.shape[0] / grid.shape[1] + 0.4))
    ax.imshow(grid, interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")
    fig.tight_layout()
    _save_png(fig, path)


def _save_png(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


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


def batches(sampler: DistributedSampler, batch_size: int, skip: int) -> list[list[int]]:
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
    out = Path(args.out_dir)
    ckpt_path = out / "checkpoint.pt"
    torch.manual_seed(args.seed)

    if d.main:
        prepare_out_dir(out)
    if ckpt_path.exists() and not args.resume:  # nothing is overwritten without a word
        raise DataError(
            f"--out-dir {out} holds a checkpoint of an earlier run: continue it with --resume, "
            f"or choose another --out-dir (or delete {ckpt_path})"
        )
    images = load_images(exp, args)
    train, test = images.train, images.test
    # Labels ride along with the images always; the model sees them with --conditional.
    train_labels = images.train_labels
    if train_labels is None:
        train_labels = torch.zeros(len(train), dtype=torch.long)
    test_labels = images.test_labels if args.conditional else None
    model: Model = MODELS[args.model](exp.channels, exp.levels, **model_options(args)).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    identity = run_identity(exp, args, model.config.to_dict(), d.world)
    state: dict[str, Any] = {
        "epoch": 0,
        "step": 0,
        "batch_in_epoch": 0,
        "train_curve": [],
        "test_curve": [],
    }
    if args.resume:
        saved = load_checkpoint(ckpt_path, ("identity", "model", "optimizer", "rng_cpu", *state))
        check_identity(saved["identity"], identity, ckpt_path)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])  # moves its tensors to the model's device
        old_lr = optimizer.param_groups[0]["lr"]
        if old_lr != args.lr:  # --lr on resume: applied, and said
            for group in optimizer.param_groups:
                group["lr"] = args.lr
            if d.main:
                print(f"--resume: learning rate changed from {old_lr:g} to {args.lr:g}")
        torch.set_rng_state(saved["rng_cpu"])
        state = {key: saved[key] for key in state}
    net: nn.Module = model
    if d.enabled:
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if args.compile:
        model.forward_features = torch.compile(model.forward_features)  # type: ignore[method-assign]

    sampler = DistributedSampler(
        TensorDataset(train),
        num_replicas=d.world,
        rank=d.rank,
        shuffle=True,
        seed=args.seed,
        drop_last=True,
    )
    steps_per_epoch = len(sampler) // args.batch_size
    if steps_per_epoch == 0:
        raise DataError(
            f"--batch-size {args.batch_size} is larger than the {len(sampler)} "
            f"training images per process"
        )
    stop = StopFlag()
    try:
        dims = math.prod(train.shape[1:])
        if d.main:
            n_params = sum(p.numel() for p in model.parameters())
            resuming = f"; resuming at step {state['step']}" if args.resume else ""
            print(
                f"{exp.name} MNIST: {train.shape[0]} train / {test.shape[0]} test images "
                f"{tuple(train.shape[1:])}, {n_params} parameters, "
                f"{d.world} process(es) on {device}{resuming}",
                flush=True,
            )

        def log_prob_of(x: Tensor, y: Tensor) -> Tensor:
            # Through net's forward, so that DDP syncs the gradients.
            labels = y if args.conditional else None
            return model.log_prob_from_params(net(x, labels=labels), x)

        def reached_max() -> bool:
            return args.max_steps is not None and state["step"] >= args.max_steps

        stopping = False  # a signal reached some process; all of them stop together
        while state["epoch"] < args.epochs and not reached_max() and not stopping:
            epoch = state["epoch"]
            sampler.set_epoch(epoch)
            order = batches(sampler, args.batch_size, state["batch_in_epoch"])
            order = order[: steps_per_epoch - state["batch_in_epoch"]]
            loader = DataLoader(
                TensorDataset(train, train_labels),
                batch_sampler=order,
                num_workers=args.num_workers,
                pin_memory=device.type == "cuda",
            )
            model.train()
            # The bar ends where this epoch's part of the run ends: at the epoch's end,
            # or at --max-steps.
            last = steps_per_epoch
            if args.max_steps is not None:
                last = min(last, state["batch_in_epoch"] + args.max_steps - state["step"])
            bar = tqdm(
                total=last,
                initial=state["batch_in_epoch"],
                desc=f"epoch {epoch + 1}/{args.epochs}",
                disable=not d.main,
                dynamic_ncols=True,
            )
            started, seen = time.perf_counter(), 0
            for x, y in loader:
                x = x.to(device, non_blocking=True).long()
                y = y.to(device, non_blocking=True)
                try:
                    with autocast(device, args.amp):
                        loss = -log_prob_of(x, y).mean() / dims  # nats/dim
                except ValueError as err:  # e.g. NaN weights: log_prob refuses them
                    raise DataError(
                        f"at step {state['step'] + 1}: {err}; stopping (the checkpoint in "
                        f"{out} is from before it)"
                    ) from None
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                optimizer.step()
                state["step"] += 1
                state["batch_in_epoch"] += 1
                seen += x.shape[0] * d.world
                value = loss.item()
                if not math.isfinite(value):
                    # Stop before this step's weights reach a checkpoint: the last
                    # saved one stays the last good one.
                    raise DataError(
                        f"the training loss is {value} at step {state['step']}: stopping "
                        f"(the checkpoint in {out} is from before it); lower --lr or "
                        f"--clip, or check the data and the checkpoint"
                    )
                state["train_curve"].append([state["step"], value])
                bar.set_postfix(  # this step's loss, shown with this step's count
                    nats_per_dim=f"{value:.4f}",
                    img_s=f"{seen / (time.perf_counter() - started):.0f}",
                    refresh=False,
                )
                bar.update(1)
                stopping = stop.requested is not None
                if d.enabled:  # ranks that stop at different steps would hang DDP
                    flag = torch.tensor([float(stopping)], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    stopping = bool(flag.item())
                if stopping or reached_max():
                    break
            bar.close()
            if state["batch_in_epoch"] >= steps_per_epoch:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
            if not stopping:  # after each epoch, and where --max-steps ends a run
                if d.main:
                    print(f"evaluating on the {len(test)} test images ...", flush=True)
                nats, bits = evaluate(
                    model, test, test_labels, d, device, args.eval_batch_size, args.amp
                )
                state["test_curve"].append(
                    {
                        "epoch": state["epoch"] + state["batch_in_epoch"] / steps_per_epoch,
                        "step": state["step"],
                        "nats_per_dim": nats,
                        "bits_per_dim": bits,
                    }
                )
                if d.main:
                    print(
                        f"step {state['step']}: test NLL {nats:.4f} nats/dim, {bits:.4f} bits/dim"
                    )
            if d.main:
                checkpoint = {
                    "identity": identity,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng_cpu": torch.get_rng_state(),
                    **state,
                }
                save_checkpoint(ckpt_path, checkpoint)
                write_metrics(out, state, steps_per_epoch)
            if d.enabled:
                dist.barrier()

        if d.enabled:
            sums = param_checksum(model)
            gathered = [torch.zeros_like(sums) for _ in range(d.world)]
            dist.all_gather(gathered, sums)
            if d.main:
                same = all(torch.equal(g, gathered[0]) for g in gathered)
                print(f"parameters {'identical' if same else 'DIFFERENT'} across {d.world} ranks")
        if d.main:
            if stopping:
                print(
                    f"stopped by {stop.requested or 'a signal to another process'} at step "
                    f"{state['step']}; checkpoint "
                    f"{ckpt_path}; continue with --resume"
                )
            else:
                write_images(model, test, test_labels, exp, args, device, out)
                model.save_pretrained(out / "model")  # no pickle: config.json + safetensors
                print(f"outputs in {out}; the model in {out / 'model'}")
        if d.enabled:
            dist.barrier()
        return 0
    finally:
        stop.close()
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()


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
