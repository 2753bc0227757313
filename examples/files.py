"""What the examples write and read safely: atomic writes (a crash or Ctrl-C leaves the
old file or the new one, never half of one), checkpoints with a digest of their contents,
a stop flag that ends a run on a whole checkpoint, and the one error type they raise for
bad files."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DataError",
    "StopFlag",
    "atomic_write_bytes",
    "load_checkpoint",
    "payload_digest",
    "prepare_out_dir",
    "save_checkpoint",
]


class DataError(Exception):
    """Data that is missing, corrupt or refused; the message says what to do."""


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
