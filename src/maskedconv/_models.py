"""The base of every model: stem -> trunk -> head, its config, and what models share.

* stem: how integer images enter (``input="scaled"`` or ``"embedding"``);
* trunk: a list of causal units (``maskedconv._steps``), declared once by each model;
  the whole-image forward and the step-by-step evaluators are both folds over it;
* head: the output distribution (``head="categorical"``, ``"dmol"`` or an instance).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn

from ._checks import image_size as check_image_size
from ._checks import positive_int
from ._conditioning import ConditionBias, Conditioning, make_condition_bias, prepare_conditioning
from ._conv import refuse_torchscript
from ._evaluation import sample as _sample
from ._heads import HEADS, OutputHead
from ._masks import (
    check_color_groups,
    check_group_layout,
    group_split_error,
    group_unit,
    normal_color_groups,
)
from ._pretrained import read_config, read_weights
from ._pretrained import save_pretrained as _save_pretrained
from ._stems import STEMS, EmbeddingInput, ScaledInput
from ._steps import CausalUnit, NoIncrementalPathError

__all__ = ["nll_per_dim"]

_Model = TypeVar("_Model", bound="AutoregressiveModel")


def _memory_bytes() -> int:
    """Physical memory, or 1 TiB where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**40


@dataclass(frozen=True)
class ModelConfig:
    """The fields every model shares: image, width, depth, colour order, stem, head,
    conditioning. Plain values, safe to save."""

    in_channels: int  # image channels C: 1 for MNIST, 3 for RGB
    levels: int  # values a sub-pixel takes, K: 2 for binarized, 256 for 8-bit, 512 codes
    hidden_channels: int = 64  # width of every hidden layer; divisible by color_groups
    num_layers: int = 5  # the first layer plus (num_layers - 1) blocks
    kernel_size: int = 7  # size of the first layer's and of each block's spatial conv
    # G equal groups, or a list of uneven group sizes; None: the head's choice (categorical:
    # C, dmol: 1)
    color_groups: int | list[int] | None = None
    group_layout: str = "blocked"  # how channels map to groups; see DESIGN.md
    head: str | OutputHead = "categorical"  # "categorical", "dmol", or an instance
    num_mixtures: int = 5  # mixture components of the "dmol" head
    input: str = "scaled"  # "scaled" (ordinal levels) or "embedding" (unordered codes)
    embedding_dim: int | None = None  # D per channel; None: hidden_channels // in_channels
    num_classes: int | None = None  # N: condition on class labels (B,)
    cond_channels: int | None = None  # M: condition on a map (B, M, h, w)

    def __post_init__(self) -> None:
        positive_int("in_channels", self.in_channels)
        positive_int("levels", self.levels, 2)
        positive_int("hidden_channels", self.hidden_channels)
        positive_int("num_layers", self.num_layers)
        positive_int("kernel_size", self.kernel_size)
        if self.kernel_size % 2 == 0:
            raise ValueError(
                "kernel_size must be odd so that the kernel has a centre tap, "
                f"but got {self.kernel_size}"
            )
        head = self.make_head()
        if isinstance(self.color_groups, (list, tuple)):
            object.__setattr__(self, "color_groups", normal_color_groups(self.color_groups))
        groups = self.groups
        if isinstance(groups, list):
            check_color_groups(groups, self.group_layout, in_channels=self.in_channels)
        else:
            positive_int("color_groups", groups)
        if isinstance(groups, int) and self.in_channels % groups:
            raise ValueError(
                f"color_groups must divide in_channels={self.in_channels}, but got {groups}; "
                f"use 1 (channels independent given the past) or {self.in_channels} (one group "
                f"per channel)"
            )
        head.check_color_groups(self.in_channels, groups)
        if not isinstance(self.head, str) and type(head) in HEADS.values():
            # A library head given as an instance is stored by name: plain values.
            for name, value in head.config().items():
                object.__setattr__(self, name, value)
        check_group_layout(self.group_layout)
        self._check_trunk(groups)
        if self.input not in STEMS:
            raise ValueError(f"input must be one of {STEMS}, but got {self.input!r}")
        if self.embedding_dim is not None:
            if self.input != "embedding":
                raise ValueError(
                    f"embedding_dim applies to input='embedding' only, but got "
                    f"embedding_dim={self.embedding_dim} with input={self.input!r}"
                )
            positive_int("embedding_dim", self.embedding_dim)
        for name in ("num_classes", "cond_channels"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        self._check_size()

    def _check_size(self) -> None:
        """Refuse a model whose parameters could not fit in this machine's memory, before
        allocating any (a hand-edited config of 10,000,000 layers would hang)."""
        h, k = self.hidden_channels, self.kernel_size
        # An upper bound per layer: a gated layer's 2h x h x (k^2 + k) convs and 1x1s.
        per_layer = 2 * h * h * (k * k + k + 3)
        table = self.in_channels * self.levels * max(self.hidden_channels, self.stem_dim)
        count = self.num_layers * per_layer + table + 4 * h * self.in_channels * self.levels
        memory = _memory_bytes()
        if 4 * count > memory:
            raise ValueError(
                f"the model would hold about {4 * count / 2**30:,.0f} GiB of parameters "
                f"(num_layers={self.num_layers}, hidden_channels={h}, kernel_size={k}, "
                f"levels={self.levels}), more than this machine's {memory / 2**30:,.0f} GiB "
                f"of memory"
            )

    def _check_trunk(self, groups: int | list[int]) -> None:
        if self.hidden_channels % group_unit(groups):
            raise group_split_error("hidden_channels", self.hidden_channels, group_unit(groups))

    def make_head(self) -> OutputHead:
        """The output distribution this config names."""
        if isinstance(self.head, str):
            if self.head not in HEADS:
                raise ValueError(
                    f"head must be one of {tuple(HEADS)} or an OutputHead instance, "
                    f"but got {self.head!r}"
                )
            positive_int("num_mixtures", self.num_mixtures)
            if self.head == "dmol":
                return HEADS["dmol"](self.levels, self.num_mixtures)  # type: ignore[call-arg]
            return HEADS[self.head](self.levels)  # type: ignore[call-arg]
        head = self.head
        if not isinstance(head, OutputHead):
            raise TypeError(
                f"head must be one of {tuple(HEADS)} or an OutputHead instance (subclass "
                f"maskedconv.OutputHead for a head of your own), but got {type(head).__name__}"
            )
        if head.levels != self.levels:
            raise ValueError(
                f"head has levels={head.levels}, but the model has levels={self.levels}"
            )
        return head

    @property
    def groups(self) -> int | list[int]:
        """The resolved colour groups: G, or the sizes of uneven groups."""
        if self.color_groups is not None:
            return self.color_groups
        return self.make_head().default_color_groups(self.in_channels)

    @property
    def stem_dim(self) -> int:
        """D, the embedding size per channel of the embedding stem."""
        if self.embedding_dim is not None:
            return self.embedding_dim
        return max(1, self.hidden_channels // self.in_channels)

    def to_dict(self) -> dict[str, Any]:
        """The config as a dict of plain values (for checkpoints); ``from_config`` takes it."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class AutoregressiveModel(nn.Module):
    """What every model shares: the stem, the head, conditioning, the image checks,
    ``forward``, ``log_prob``, ``sample`` and the config round trip.

    A subclass builds ``self.trunk``, an ``nn.ModuleList`` of causal units, in
    ``__init__`` (after ``_build_common``), and lists its older parameter names in
    ``_legacy_names``: nothing else. ``forward`` and the evaluators fold the trunk.
    """

    config_class: type[ModelConfig] = ModelConfig
    trunk: nn.ModuleList
    causal_rows = True
    """Output rows <= r depend only on input rows <= r, so a sampler may crop below r."""

    config: ModelConfig
    head: OutputHead
    stem: ScaledInput | EmbeddingInput

    def _build_common(self, arguments: dict[str, Any]) -> ModelConfig:
        config = self.config_class(**{f.name: arguments[f.name] for f in fields(self.config_class)})
        self.config = config
        self.in_channels = config.in_channels
        self.levels = config.levels
        self.color_groups = config.groups
        self.group_layout = config.group_layout
        self.num_classes = config.num_classes
        self.cond_channels = config.cond_channels
        self.head = config.make_head()
        self.stem = (
            ScaledInput(config.levels)
            if config.input == "scaled"
            else EmbeddingInput(
                config.in_channels, config.levels, config.stem_dim, config.group_layout
            )
        )
        self.register_load_state_dict_pre_hook(_rename_on_load)  # type: ignore[no-untyped-call]
        return config

    def _condition_bias(self, channels: int) -> ConditionBias | None:
        return make_condition_bias(channels, self.num_classes, self.cond_channels)

    @classmethod
    def from_config(cls, config: ModelConfig | dict[str, Any]) -> Any:
        """Build a model from its config or the config's ``to_dict()``."""
        if isinstance(config, dict):
            config = cls.config_class(**config)
        return cls(**config.to_dict())

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` and ``model.safetensors`` to ``directory``.

        The Hugging Face Hub's layout: the directory can be uploaded as it is.
        ``config.json`` holds the config, the class name (``model_type``) and the
        maskedconv version; no file is a pickle. Each file is written under a temporary
        name and renamed (the weights first), so a crash never leaves a half-written
        file. Returns the directory.

        Raises:
            TypeError: for a model with a custom head instance, which has no name to save.
        """
        return _save_pretrained(self, self.config.to_dict(), directory)

    @classmethod
    def from_pretrained(
        cls: type[_Model], directory: str | os.PathLike[str], *, device: str | torch.device = "cpu"
    ) -> _Model:
        """The model a ``save_pretrained`` directory holds, in eval mode.

        Reads JSON and safetensors only, so loading runs no code from the directory.
        Floating-point weights keep their saved dtype.

        Raises:
            FileNotFoundError: for a missing ``config.json`` or ``model.safetensors``.
            ValueError: for another model class, a config from a newer release series
                (0.x: a newer minor version) or with unknown keys, and weights that are
                missing, unexpected or of another shape (each one named).
        """
        fields_ = {f.name for f in fields(cls.config_class)}
        config = read_config(directory, cls.__name__, fields_)
        try:
            model: _Model = cls.from_config(config)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{Path(directory) / 'config.json'}: {err}") from None
        tensors = read_weights(directory, model.state_dict(), device, model._rename_legacy)
        floats = {
            t.dtype for t in tensors.values() if isinstance(t, Tensor) and t.is_floating_point()
        }
        model.to(device=device, dtype=floats.pop() if len(floats) == 1 else None)
        try:
            model.load_state_dict(tensors)
        except ValueError as err:  # a mask the config rebuilds otherwise than it was saved
            raise ValueError(f"{Path(directory) / 'config.json'}: {err}") from None
        model.eval()
        return model

    __prepare_scriptable__ = refuse_torchscript

    def _check_images(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, but got {type(x).__name__}")
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(
                f"x must be an integer image tensor with values in [0, {self.levels}), but got "
                f"dtype {x.dtype}; quantize first (e.g. x.round().long()), or call "
                f"forward_features() with the stem's output"
            )
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape (B, {self.in_channels}, H, W), but got {tuple(x.shape)}"
            )
        if torch.compiler.is_compiling() or x.numel() == 0:
            return  # a data-dependent check would break the graph
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= self.levels:
            raise ValueError(
                f"x must have values in [0, {self.levels}) (levels={self.levels}), but got "
                f"values in [{lo}, {hi}]"
            )

    def conditioning(
        self, labels: Tensor | None, cond: Tensor | None, batch: int, size: tuple[int, int]
    ) -> Conditioning | None:
        """Check ``labels`` and ``cond`` against this model; ``cond`` resized to ``size``."""
        anchor = next(self.parameters())
        return prepare_conditioning(
            labels,
            cond,
            num_classes=self.num_classes,
            cond_channels=self.cond_channels,
            batch=batch,
            size=size,
            dtype=anchor.dtype,
        )

    def forward_features(self, h: Tensor, cond: Conditioning | None = None) -> Tensor:
        """The head's parameters from the stem's output: the fold of the trunk.

        Args:
            h: ``(B, F, H, W)`` float, as ``model.stem(x)`` makes it (``F = C`` for the
                scaled stem, ``C * D`` for the embedding).
            cond: the checked conditioning (``conditioning``), or ``None``.

        Returns:
            The head's parameters: ``(B, C, K, H, W)`` logits for the categorical head,
            ``(B, P, H, W)`` for the mixture.
        """
        x: Any = h
        rows: Tensor | None = None
        for unit in self.trunk:
            x, rows = unit(x, rows, cond)
        return self.head.arrange(x, self.in_channels, self.group_layout)

    def units(self) -> list[CausalUnit]:
        """The trunk's units, for the evaluators.

        Raises:
            NoIncrementalPathError: for a subclass that changes ``forward`` (the units
                would no longer compute it).
        """
        cls = type(self)
        base = AutoregressiveModel
        if cls.forward is not base.forward or cls.forward_features is not base.forward_features:
            raise NoIncrementalPathError(f"{cls.__name__} overrides forward")
        units = list(self.trunk)
        for unit in units:
            if not isinstance(unit, CausalUnit):
                raise NoIncrementalPathError(
                    f"its trunk holds a {type(unit).__name__}, which is not a CausalUnit"
                )
        return units  # type: ignore[return-value]

    def _legacy_names(self) -> list[tuple[str, str]]:
        """``(old prefix, new prefix)`` pairs that rename an older release's state_dict."""
        return []

    def _rename_legacy(self, state_dict: dict[str, Tensor], prefix: str = "") -> None:
        rename_keys(state_dict, prefix, self._legacy_names())

    def forward(
        self, x: Tensor, labels: Tensor | None = None, cond: Tensor | None = None
    ) -> Tensor:
        """The head's parameters at every pixel.

        Args:
            x: ``(B, C, H, W)`` integer image with values in ``[0, K)``.
            labels: ``(B,)`` int64 class labels; required if and only if the model was
                built with ``num_classes``.
            cond: ``(B, M, h, w)`` float map, resized to ``H x W`` (nearest); required if
                and only if the model was built with ``cond_channels``.

        Returns:
            ``(B, C, K, H, W)`` logits (categorical head) or ``(B, P, H, W)`` mixture
            parameters; those of sub-pixel (c, i, j) depend only on pixels before
            (i, j) and on earlier colour groups at (i, j) (and on the conditioning).

        Raises:
            TypeError: for a float, bool or complex ``x``, float labels or an integer map.
            ValueError: for a wrong shape, values outside ``[0, K)``, or conditioning
                that does not match how the model was built.
        """
        self._check_images(x)
        conditioning = self.conditioning(labels, cond, x.shape[0], (x.shape[2], x.shape[3]))
        return self.forward_features(self.stem(x), conditioning)

    def log_prob(
        self, x: Tensor, labels: Tensor | None = None, cond: Tensor | None = None
    ) -> Tensor:
        """``log p(x)`` in nats, one value per image.

        Computed in at least float32, also under autocast.

        Args:
            x: ``(B, C, H, W)`` integer image with values in ``[0, K)``.
            labels: class labels, as for ``forward``.
            cond: conditioning map, as for ``forward``.

        Returns:
            ``(B,)`` log-likelihoods in nats. ``nll_per_dim`` turns them into
            nats/dim or bits/dim.
        """
        # forward has checked x already: score without checking it a second time.
        return self._score(self(x, labels, cond), x)

    def log_prob_from_params(self, params: Tensor, x: Tensor) -> Tensor:
        """``log p(x)`` in nats from parameters already computed, e.g. by a DDP wrapper.

        Args:
            params: what ``model(x)`` returns.
            x: ``(B, C, H, W)`` integer image with values in ``[0, K)``.

        Returns:
            ``(B,)`` log-likelihoods in nats, computed in at least float32.

        Raises:
            ValueError: for values of ``x`` outside ``[0, K)`` (no value is ignored, as
                cross-entropy's ``-100`` would be), parameters of another shape than
                ``model(x)`` gives (another K, say), or a non-finite result (infinite or
                NaN parameters: a diverged model).
        """
        self._check_images(x)
        batch, channels, height, width = x.shape
        expected = self.head.arrange(
            torch.empty(batch, self.head.num_params(channels), height, width, device="meta"),
            channels,
            self.group_layout,
        ).shape
        if not isinstance(params, Tensor) or params.shape != expected:
            raise ValueError(
                f"params must have the shape model(x) gives for x of shape {tuple(x.shape)}, "
                f"{tuple(expected)}, but got {tuple(getattr(params, 'shape', ()))}"
            )
        return self._score(params, x)

    def _score(self, params: Tensor, x: Tensor) -> Tensor:
        out = self.head.log_prob(params, x).flatten(1).sum(1)
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(out).all()):
            raise ValueError(
                "log_prob is not finite: the model's parameters (its output) hold inf or NaN, "
                "e.g. after a diverged training step or from a corrupt checkpoint"
            )
        return out

    def sample(
        self,
        num_samples: int | None = None,
        image_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Draw images; see ``maskedconv.sample`` for the keyword arguments.

        Args:
            num_samples: B; omit when completing an image given as ``x=``.
            image_size: ``(H, W)``; omit when completing an image given as ``x=``.
            **kwargs: ``generator``, ``temperature``, ``x``, ``known``, ``method``,
                ``schedule``, ``labels``, ``cond``, ``progress``.

        Returns:
            ``(B, C, H, W)`` int64 images on the model's device.
        """
        shape = None
        if num_samples is not None or image_size is not None:
            if num_samples is None or image_size is None:
                raise ValueError(
                    f"num_samples and image_size go together, but got num_samples={num_samples} "
                    f"and image_size={image_size}"
                )
            height, width = check_image_size(image_size)
            shape = (positive_int("num_samples", num_samples), self.in_channels, height, width)
        return _sample(self, shape, **kwargs)


def _rename_on_load(
    module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: Any
) -> None:
    assert isinstance(module, AutoregressiveModel)
    module._rename_legacy(state_dict, prefix)


def rename_keys(state_dict: dict[str, Tensor], prefix: str, names: list[tuple[str, str]]) -> None:
    """Rename, in place, every key that starts with ``prefix + old`` to ``prefix + new``
    (the first pair that matches)."""
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        for old, new in names:
            if rest.startswith(old):
                state_dict[prefix + new + rest[len(old) :]] = state_dict.pop(key)
                break


def nll_per_dim(
    log_prob: Tensor, image_shape: Sequence[int], unit: Literal["nats", "bits"] = "nats"
) -> Tensor:
    """Negative log-likelihood per sub-pixel: ``-log p(x) / (C*H*W)``.

    Args:
        log_prob: log-likelihoods in nats, e.g. ``model.log_prob(x)``; any shape.
        image_shape: ``(C, H, W)`` or ``(B, C, H, W)`` of the images.
        unit: ``"nats"`` (what the Berkeley course reports) or ``"bits"``.

    Returns:
        Tensor of ``log_prob``'s shape.
    """
    if unit not in ("nats", "bits"):
        raise ValueError(f"unit must be 'nats' or 'bits', but got {unit!r}")
    if not isinstance(image_shape, (Sequence, torch.Size)) or isinstance(image_shape, str):
        raise ValueError(
            f"image_shape must be (C, H, W) or (B, C, H, W), e.g. x.shape, but got {image_shape!r}"
        )
    dims = list(image_shape)[-3:]
    if len(dims) != 3 or not all(isinstance(d, int) and d >= 1 for d in dims):
        raise ValueError(
            f"image_shape must be (C, H, W) or (B, C, H, W) of positive ints, but got "
            f"{tuple(image_shape)}"
        )
    per_dim = -log_prob / math.prod(dims)
    return per_dim / math.log(2) if unit == "bits" else per_dim
