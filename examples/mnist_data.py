"""MNIST for the examples: the IDX files checked against their SHA-256, downloaded when
missing, and the binarized, 8-bit and coloured versions the experiments train on.

Usable alone::

    from mnist_data import binarize, load_mnist

    mnist = load_mnist(Path("data/mnist"))
    train = binarize(mnist["train"])  # (60000, 28, 28) uint8 in {0, 1}
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import pickle
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from files import DataError, atomic_write_bytes
from tqdm import tqdm

__all__ = [
    "MNIST_FILES",
    "DataError",
    "binarize",
    "colorize",
    "load_mnist",
    "load_pickle",
    "parse_idx",
]

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
    light = np.less(rng.random(n), 0.5)  # (N,) bool
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
