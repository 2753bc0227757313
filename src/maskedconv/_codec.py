"""The codec behind ``maskedconv.codec``: see that module."""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
import zlib
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import positive_int
from ._evaluation import _evaluator, _model_device, _progress, evaluating
from ._heads import OutputHead
from ._models import AutoregressiveModel
from ._schedules import BOARD_ORDERS, Schedule, model_order, raster, resolve_schedule, wavefront

__all__ = ["PRECISION", "CodecError", "decode", "encode", "frequencies"]

PRECISION = 24
"""Bits of the integer frequencies: each symbol's probability is a multiple of 2^-24."""

_MAGIC = b"MCZ"
_VERSION = 1
# magic, version, model digest, labels digest, cond digest, B, C, H, W, K, schedule kind
# (0 raster, 1 wavefront, 2 checkerboard, 3 group checkerboard), slope, images a block,
# device kind. The model's digest covers its colour order, dtype and everything else that
# shapes its probabilities.
_HEADER = struct.Struct("<3sB8s4s4sIHHHHBHHB")
_CRC = struct.Struct("<I")
_DEVICES = ("cpu", "cuda", "mps")


class CodecError(ValueError):
    """A stream that cannot be decoded into the images it was made from, and why."""


CodecError.__module__ = "maskedconv.codec"  # where users import it from


def frequencies(log_probs: Tensor) -> Tensor:
    """Integer frequencies of ``(N, K)`` log-probabilities: the coder's model.

    Each row sums to exactly ``2**PRECISION``, and every level gets at least 1 (so any
    value can be coded). The encoder and the decoder both call this on the same values;
    nothing else turns probabilities into the coder's integers.

    Args:
        log_probs: ``(N, K)`` floats, normalised or not; ``-inf`` for impossible levels.

    Returns:
        ``(N, K)`` int64.

    Raises:
        ValueError: if a row holds NaN or +inf, or is -inf everywhere.
    """
    total = 1 << PRECISION
    levels = log_probs.shape[-1]
    logp = log_probs.double()
    p = torch.softmax(logp, dim=-1)
    if not bool(torch.isfinite(p).all()):
        raise ValueError(
            "the model's probabilities are NaN (its output holds NaN or +inf, or a row of "
            "-inf): nothing can be coded with them"
        )
    freq = torch.floor(p * (total - levels)).long() + 1
    # What flooring left over (fewer than K) goes to each row's most likely level.
    rest = total - freq.sum(-1, keepdim=True)
    return freq.scatter_add_(-1, p.argmax(-1, keepdim=True), rest)


def _level_log_probs(head: OutputHead, params: Tensor, given: Tensor, channel: int) -> Tensor:
    """``(N, K)`` float64 log p of every level of ``channel`` (``OutputHead.level_log_probs``)."""
    return head.level_log_probs(params, given, channel).double()


class _Coder:
    """The range coder, with the frequencies of every call made the same way."""

    def __init__(self, words: Any = None) -> None:
        try:
            import constriction  # type: ignore[import-untyped]
            import numpy as np
        except ImportError:
            raise ImportError(
                "maskedconv.codec needs constriction, the range coder: "
                "pip install 'maskedconv[codec]'"
            ) from None
        self._np = np
        self._family = constriction.stream.model.Categorical(perfect=False)
        queue = constriction.stream.queue
        self._encoder = queue.RangeEncoder() if words is None else None
        self._decoder = None if words is None else queue.RangeDecoder(words)

    def _probabilities(self, log_probs: Tensor) -> Any:
        exact = frequencies(log_probs).cpu().double() / (1 << PRECISION)  # dyadic: exact
        return self._np.ascontiguousarray(exact.numpy())

    def code(self, log_probs: Tensor, truth: Tensor) -> Tensor:
        """Encode ``truth`` (``(N,)``) with these probabilities, or decode N values."""
        probabilities = self._probabilities(log_probs)
        if self._encoder is not None:
            symbols = truth.cpu().numpy().astype(self._np.int32)
            self._encoder.encode(symbols, self._family, probabilities)
            return truth
        assert self._decoder is not None
        try:
            decoded = self._decoder.decode(self._family, probabilities)
        except Exception as error:  # constriction's own, on a stream that runs out
            raise CodecError(f"the range decoder failed: {error}") from None
        return torch.from_numpy(decoded.astype(self._np.int64)).to(truth.device)

    def words(self) -> bytes:
        assert self._encoder is not None
        return bytes(self._encoder.get_compressed().astype("<u4").tobytes())

    def exhausted(self) -> bool:
        assert self._decoder is not None
        return bool(self._decoder.maybe_exhausted())


def _code_block(
    model: AutoregressiveModel,
    schedule: Schedule,
    images: Tensor,
    coder: _Coder,
    kwargs: dict[str, Any],
) -> Tensor:
    """Code one block of images, ``(b, C, H, W)``: the one loop encoder and decoder share.

    The encoder passes the true images, the decoder zeros; both feed the evaluator the
    same values in the same calls (what is coded so far, later groups at 0 until coded),
    so both compute the same probabilities. Returns the images coded.
    """
    head = model.head
    out = torch.zeros_like(images)
    evaluator = _evaluator(model, "auto", tuple(images.shape), schedule=schedule, **kwargs)
    while not evaluator.done:
        at = evaluator.schedule[evaluator.step]
        truth = images[:, :, at.rows, at.cols].transpose(1, 2).flatten(0, 1)  # (b*n, C)
        values = out[:, :, at.rows, at.cols]  # a group-major schedule's earlier groups
        flat = values.transpose(1, 2).flatten(0, 1)  # (b*n, C), a copy
        for chans in evaluator.groups:
            params = evaluator.params(values).movedim(-1, 1).flatten(0, 1)  # (b*n, ...)
            for c in range(images.shape[1])[chans]:
                log_probs = _level_log_probs(head, params, flat, c)
                flat[:, c] = coder.code(log_probs, truth[:, c])
            values = flat.view(images.shape[0], len(at), -1).transpose(1, 2).contiguous()
        evaluator.advance(values)
        out[:, :, at.rows, at.cols] = values
    return out


def _digest(*parts: bytes, size: int) -> bytes:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(len(part).to_bytes(8, "little") + part)
    return hasher.digest()[:size]


def _tensor_bytes(tensor: Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return f"{flat.dtype}{tuple(tensor.shape)}".encode() + flat.view(torch.uint8).numpy().tobytes()


def _model_digest(model: nn.Module) -> bytes:
    """8 bytes of SHA-256 over the model's class, config and every state_dict entry."""
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    described = to_dict() if callable(to_dict) else None
    parts = [
        type(model).__qualname__.encode(),
        json.dumps(described, sort_keys=True, default=_by_class).encode(),
    ]
    for name, value in sorted(model.state_dict().items()):
        parts.append(name.encode())
        if isinstance(value, Tensor):
            parts.append(_tensor_bytes(value))
        else:  # a layer's extra state (its mask's description)
            parts.append(json.dumps(value, sort_keys=True, default=str).encode())
    return _digest(*parts, size=8)


def _by_class(value: object) -> str:
    # A config value JSON cannot hold (a head of your own): its class, never its repr,
    # which may hold an address that differs between processes.
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _optional_digest(value: Tensor | None, integer: bool = False) -> bytes:
    if isinstance(value, Tensor) and integer:
        value = value.long()  # labels as int32 or int64 are the same labels
    return _digest(b"" if value is None else _tensor_bytes(value), size=4)


def _schedule_of(model: nn.Module, size: tuple[int, int], name: str) -> tuple[int, int, Schedule]:
    """``(kind, slope, schedule)`` of a named schedule: kind 0 raster, 1 wavefront,
    2 checkerboard, 3 group checkerboard (slope 1, unused)."""
    if name not in _SCHEDULE_NAMES:
        raise ValueError(
            f"schedule must be one of {_SCHEDULE_NAMES} (a stream stores its name), "
            f"but got {name!r}"
        )
    plan = resolve_schedule(name, model, size)
    order = model_order(model)
    board = order if name == "auto" and order in BOARD_ORDERS else name
    for kind, known in _BOARD_KINDS.items():
        if board == known:
            return kind, 1, plan
    # Every wavefront numbers its lines densely, so the first position of row 1 is at
    # step `slope` (raster: slope W).
    slope = int(plan.rank[1, 0]) if size[0] > 1 else size[1]
    return (0 if slope >= size[1] else 1), slope, plan


_SCHEDULE_NAMES = ("auto", "raster", "wavefront", "checkerboard", "group-checkerboard")
_BOARD_KINDS = {2: "checkerboard", 3: "group-checkerboard"}


def _rebuild_schedule(model: nn.Module, size: tuple[int, int], kind: int, slope: int) -> Schedule:
    if kind in _BOARD_KINDS:  # refused for a model of another order
        return resolve_schedule(_BOARD_KINDS[kind], model, size)
    return raster(size) if kind == 0 else wavefront(model, size, slope=slope)


def _check_model(model: object) -> AutoregressiveModel:
    if not isinstance(model, AutoregressiveModel):
        raise TypeError(
            f"model must be a model of this library (like PixelCNN or GatedPixelCNN), but "
            f"got {type(model).__name__}"
        )
    return model


def _block_kwargs(
    labels: Tensor | None, cond: Tensor | None, start: int, stop: int
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if labels is not None:
        kwargs["labels"] = labels[start:stop]
    if cond is not None:
        kwargs["cond"] = cond[start:stop]
    return kwargs


def _block_crc(images: Tensor) -> int:
    return zlib.crc32(images.to("cpu", torch.int32).numpy().tobytes())


def _device_kind(device: torch.device) -> int:
    return _DEVICES.index(device.type) if device.type in _DEVICES else 255


def encode(
    model: nn.Module,
    x: Tensor,
    *,
    labels: Tensor | None = None,
    cond: Tensor | None = None,
    schedule: str = "auto",
    block_size: int = 128,
    progress: bool = False,
) -> bytes:
    """Compress integer images with ``model``'s probabilities: about its NLL in bytes.

    Args:
        model: a model of this library (``PixelCNN``, ``GatedPixelCNN``), any head.
        x: ``(B, C, H, W)`` integer images (or VQ code maps, C = 1) in ``[0, K)``.
        labels: ``(B,)`` class labels, for a model built with ``num_classes``.
        cond: ``(B, M, h, w)`` map, for a model built with ``cond_channels``.
        schedule: ``"auto"`` (the model's order: the (group) checkerboard for a model
            built with ``order="checkerboard"`` or ``"group-checkerboard"``, else the
            wavefront), ``"raster"``, ``"wavefront"``, ``"checkerboard"`` or
            ``"group-checkerboard"``: the decode order (stored).
        block_size: images coded together (stored; ``decode`` uses it, whatever the
            caller's batch). Each block adds a 4-byte CRC.
        progress: show the blocks done (tqdm's bar if installed, else lines on stderr).

    Returns:
        The stream: a header, a CRC per block, the range coder's words, a CRC of it all.

    Raises:
        TypeError: for a model not of this library or a non-integer ``x``.
        ValueError: for a bad shape, values outside ``[0, K)``, conditioning that does
            not match the model, or a model whose output is NaN.
        ImportError: without constriction (``pip install 'maskedconv[codec]'``).
    """
    model = _check_model(model)
    levels, channels = model.levels, model.in_channels
    coder = _Coder()
    model._check_images(x)  # the checks and messages of the model's forward
    if not x.numel():
        raise ValueError(f"x must hold at least one image of one pixel, but got {tuple(x.shape)}")
    block = positive_int("block_size", block_size)
    batch, _, height, width = x.shape
    if batch >= 1 << 32 or max(height, width, channels, levels) >= 1 << 16:
        raise ValueError(f"x of shape {tuple(x.shape)} is too large for the stream's header")
    block = min(block, batch, (1 << 16) - 1)
    kind, slope, plan = _schedule_of(model, (height, width), schedule)
    device = _model_device(model)
    images = x.to(device=device, dtype=torch.long)
    header = _HEADER.pack(
        _MAGIC,
        _VERSION,
        _model_digest(model),
        _optional_digest(labels, integer=True),
        _optional_digest(cond),
        batch,
        channels,
        height,
        width,
        levels,
        kind,
        slope,
        block,
        _device_kind(device),
    )

    blocks = -(-batch // block)
    bar = _progress(blocks, f"encoding {batch} images") if progress else None

    crcs: list[int] = []
    with evaluating(model):
        for start in range(0, batch, block):
            stop = min(start + block, batch)
            kwargs = _block_kwargs(labels, cond, start, stop)
            coded = _code_block(model, plan, images[start:stop], coder, kwargs)
            crcs.append(_block_crc(coded))
            if bar is not None:
                bar(len(crcs))
    body = header + b"".join(_CRC.pack(c) for c in crcs) + coder.words()
    return body + _CRC.pack(zlib.crc32(body))


def decode(
    model: nn.Module,
    data: bytes,
    *,
    labels: Tensor | None = None,
    cond: Tensor | None = None,
    progress: bool = False,
) -> Tensor:
    """The images ``encode`` compressed, exactly, or ``CodecError``.

    Args:
        model: the model the stream was encoded with (the same config and weights).
        data: the stream.
        labels: the same labels as for ``encode``.
        cond: the same conditioning map as for ``encode``.
        progress: show the blocks done (tqdm's bar if installed, else lines on stderr).

    Returns:
        ``(B, C, H, W)`` int64 images, on the model's device.

    Raises:
        CodecError: a stream that is not one, of another format version, truncated or
            corrupted, made with another model or other labels or map, or whose decode
            computes other probabilities than the encoder did (another device kind or
            torch version); the message says which.
        ImportError: without constriction (``pip install 'maskedconv[codec]'``).
    """
    model = _check_model(model)
    levels, channels = model.levels, model.in_channels
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, but got {type(data).__name__}")
    data = bytes(data)
    fields = _read_header(data)
    model_digest, labels_digest, cond_digest, batch, c, height, width, k = fields[2:10]
    kind, slope, block, device_kind = fields[10:]
    if model_digest != _model_digest(model):
        raise CodecError(
            "the stream was encoded with another model (its config or weights differ from "
            "this one's): decode with the model that encoded it"
        )
    for name, value, digest in (("labels", labels, labels_digest), ("cond", cond, cond_digest)):
        if _optional_digest(value, integer=name == "labels") != digest:
            raise CodecError(
                f"{name} differ from those the stream was encoded with (or were "
                f"{'not ' if value is None else ''}given when the encoder had "
                f"{'some' if value is None else 'none'}): pass the same {name} as to encode"
            )
    if (c, k) != (channels, levels):
        raise CodecError(
            f"the stream is of {c} channels and {k} levels; this model has {channels} "
            f"channels and {levels} levels"
        )
    device = _model_device(model)
    if device_kind != _device_kind(device):
        encoded_on = _DEVICES[device_kind] if device_kind < len(_DEVICES) else "another device"
        warnings.warn(
            f"the stream was encoded on {encoded_on} and is decoded on {device.type}: "
            f"their float results may differ, and the decode then fails with CodecError",
            stacklevel=2,
        )
    if kind not in (0, 1, *_BOARD_KINDS) or not 1 <= slope <= width:
        raise CodecError(f"the stream's header is invalid (schedule {kind}, slope {slope})")
    plan = _rebuild_schedule(model, (height, width), kind, slope)
    blocks = -(-batch // block)
    words_start = _HEADER.size + _CRC.size * blocks
    words = data[words_start : -_CRC.size]
    if len(data) < words_start + _CRC.size or len(words) % 4:
        raise CodecError("the stream is truncated: its length does not fit its header")
    crcs = [_CRC.unpack_from(data, _HEADER.size + _CRC.size * i)[0] for i in range(blocks)]
    import numpy as np

    coder = _Coder(np.frombuffer(words, dtype="<u4").astype(np.uint32))

    bar = _progress(blocks, f"decoding {batch} images") if progress else None
    out = torch.empty(batch, channels, height, width, dtype=torch.long, device=device)
    with evaluating(model):
        for index, start in enumerate(range(0, batch, block)):
            stop = min(start + block, batch)
            shape = (stop - start, channels, height, width)
            zeros = torch.zeros(shape, dtype=torch.long, device=device)
            kwargs = _block_kwargs(labels, cond, start, stop)
            decoded = _code_block(model, plan, zeros, coder, kwargs)
            if _block_crc(decoded) != crcs[index]:
                raise CodecError(
                    f"block {index} (images {start} to {stop - 1}) decoded to other images "
                    f"than were encoded: this decode computed other probabilities than the "
                    f"encoder (another device kind or torch version?)"
                )
            out[start:stop] = decoded
            if bar is not None:
                bar(index + 1)
    if not coder.exhausted():
        raise CodecError("the stream holds more data than its images: it was altered")
    return out


def _read_header(data: bytes) -> tuple[Any, ...]:
    if len(data) < 3 or data[:3] != _MAGIC:
        raise CodecError("not a maskedconv stream (it does not start with b'MCZ')")
    if len(data) < 4 or data[3] != _VERSION:
        version = data[3] if len(data) > 3 else "unknown"
        raise CodecError(
            f"the stream is of format version {version}; this maskedconv reads version {_VERSION}"
        )
    if len(data) < _HEADER.size + _CRC.size:
        raise CodecError(f"the stream is truncated: {len(data)} bytes, shorter than a header")
    if zlib.crc32(data[: -_CRC.size]) != _CRC.unpack_from(data, len(data) - _CRC.size)[0]:
        raise CodecError("the stream is truncated or corrupted (its CRC does not match)")
    fields = _HEADER.unpack_from(data)
    if fields[5] < 1 or fields[12] < 1:
        raise CodecError("the stream's header is invalid (no images, or blocks of 0)")
    return fields
