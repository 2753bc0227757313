"""Save and load models without pickle: ``config.json`` + ``model.safetensors``.

The layout is the Hugging Face Hub's, so a saved directory can be uploaded as it is.
``config.json`` holds the model's config fields, the model class (``model_type``) and
the version of maskedconv that wrote it; ``model.safetensors`` holds the state_dict's
tensors. Loading reads JSON and safetensors only: nothing in the directory can run code.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._version import __version__

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_RESERVED = ("model_type", "maskedconv_version")


def _series(version: str) -> tuple[int, ...]:
    """The release series whose files a version reads: the major version, or for 0.x
    the minor one too (before 1.0 a minor release may change the format)."""
    try:
        parts = [int(p) for p in version.split(".")[:2]]
    except ValueError:
        raise ValueError(
            f"maskedconv_version must look like '0.2.0', but got {version!r}"
        ) from None
    major = parts[0]
    return (major,) if major >= 1 else (0, parts[1] if len(parts) > 1 else 0)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_pretrained(
    model: nn.Module, config: Mapping[str, Any], directory: str | os.PathLike[str]
) -> Path:
    """Write ``model``'s weights and ``config`` to ``directory`` (created if missing).

    Each file is written to a temporary name and renamed, the weights first: a crash
    leaves every file whole, old or new.
    """
    for name, value in config.items():
        plain = isinstance(value, str | int | float | bool | type(None)) or (
            isinstance(value, list) and all(isinstance(v, int) for v in value)
        )  # a list of ints: uneven color_groups
        if not plain:
            raise TypeError(
                f"save_pretrained writes plain config values only, but {name} is a "
                f"{type(value).__name__}; a custom head or block cannot be saved by name: "
                f"save the state_dict and rebuild the model yourself"
            )
    from safetensors.torch import save

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    # The layers' extra state (the masks' descriptions) goes into the metadata, so that a
    # config edited to build other masks is refused on load, as load_state_dict refuses it.
    state = model.state_dict()
    tensors = {k: v.detach().contiguous() for k, v in state.items() if isinstance(v, Tensor)}
    extra = {k: v for k, v in state.items() if not isinstance(v, Tensor)}
    metadata = {
        "format": "pt",
        "maskedconv_version": __version__,
        "extra_state": json.dumps(extra, sort_keys=True),
    }
    _write_atomic(folder / WEIGHTS_NAME, save(tensors, metadata=metadata))
    document = {"model_type": type(model).__name__, "maskedconv_version": __version__, **config}
    _write_atomic(folder / CONFIG_NAME, (json.dumps(document, indent=2) + "\n").encode())
    return folder


def read_config(
    directory: str | os.PathLike[str], model_type: str, fields: set[str]
) -> dict[str, Any]:
    """``config.json`` of ``directory``, checked: the model class, the version, the keys."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: not a directory written by save_pretrained"
        )
    try:
        document = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be a config") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path} must hold a JSON object, but holds a {type(document).__name__}")
    saved_type = document.get("model_type")
    if saved_type != model_type:
        raise ValueError(
            f"{path} describes a {saved_type}, not a {model_type}: load it with "
            f"{saved_type}.from_pretrained"
        )
    version = document.get("maskedconv_version")
    if not isinstance(version, str):
        raise ValueError(f"{path} has no maskedconv_version: not written by save_pretrained")
    if _series(version) > _series(__version__):
        raise ValueError(
            f"{path} was written by maskedconv {version}, a newer release series than this "
            f"maskedconv {__version__}: upgrade maskedconv to load it"
        )
    config = {k: v for k, v in document.items() if k not in _RESERVED}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(
            f"{path} has config keys this maskedconv {__version__} does not know: "
            f"{', '.join(unknown)}; it was written by maskedconv {version}"
        )
    return config


def read_weights(
    directory: str | os.PathLike[str],
    expected: Mapping[str, Tensor],
    device: torch.device | str,
    rename: Callable[[dict[str, Tensor]], None] | None = None,
) -> dict[str, Tensor]:
    """The tensors of ``model.safetensors``, checked against ``expected`` (a state_dict):
    every missing, unexpected or mis-shaped tensor is named. ``rename`` gives an older
    release's names their current ones first."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the weights are missing")
    try:
        tensors = load_file(path, device=str(device))
        with safe_open(path, framework="pt") as opened:
            metadata = opened.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    try:
        extra = json.loads(metadata.get("extra_state", "{}"))
    except json.JSONDecodeError:
        raise ValueError(f"{path} has unreadable extra_state metadata") from None
    if not isinstance(extra, dict):
        raise ValueError(f"{path} has extra_state metadata that is not a JSON object")
    if rename is not None:
        rename(tensors)
        rename(extra)
    problems = []
    expected = {k: v for k, v in expected.items() if isinstance(v, Tensor)}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected)}")
    for name in sorted(set(expected) & set(tensors)):
        want, got = expected[name], tensors[name]
        if want.shape != got.shape:
            problems.append(
                f"{name} has shape {tuple(got.shape)}, the config gives {tuple(want.shape)}"
            )
        elif want.is_floating_point() != got.is_floating_point():
            problems.append(f"{name} has dtype {got.dtype}, expected {want.dtype}")
    if problems:
        raise ValueError(f"{path} does not match {CONFIG_NAME}: {'; '.join(problems)}")
    # The masks' descriptions (0.3 on): load_state_dict checks them against the rebuilt
    # model's masks. Files from 0.2 have none and load as before.
    return {**tensors, **{k: v for k, v in extra.items() if k.endswith("_extra_state")}}
