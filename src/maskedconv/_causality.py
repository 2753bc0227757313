"""Check that a module's outputs depend only on the inputs they may see, and see them.

Depends on nothing but torch, so it can check any stack of layers, ours or not.
Float modules are checked by their exact Jacobian; models of integer images (those
with an int ``levels`` attribute, like ``PixelCNN``) through their
public ``forward``, by changing integer values: a gradient cannot pass through an
embedding lookup, so a Jacobian would be zero there whatever the model does.
"""

from __future__ import annotations

import copy
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["allowed_dependencies", "assert_causal", "receptive_field"]

_JACOBIAN_LIMIT = 2 << 30  # bytes a Jacobian may take before the check refuses


def _sizes(color_groups: Any) -> list[int]:
    """Group sizes: G equal groups, or a list of uneven sizes (equal ones as 1s)."""
    if isinstance(color_groups, int) and not isinstance(color_groups, bool) and color_groups >= 1:
        return [1] * color_groups
    if (
        isinstance(color_groups, (list, tuple))
        and color_groups
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in color_groups)
    ):
        return [1] * len(color_groups) if len(set(color_groups)) == 1 else list(color_groups)
    raise ValueError(
        f"color_groups must be a positive int or a non-empty list of positive group sizes, "
        f"but got {color_groups!r}"
    )


def _groups(channels: int, color_groups: Any, group_layout: str) -> Tensor:
    # Derived here again rather than imported from .masks: the checker must not
    # trust the code it checks.
    sizes = _sizes(color_groups)
    unit = sum(sizes)
    if channels % unit:
        raise ValueError(
            f"color_groups={color_groups} must split the channel count "
            f"(a multiple of {unit}), but got {channels} channels"
        )
    if group_layout == "blocked":
        bounds = torch.tensor(sizes).cumsum(0) * (channels // unit)
        return torch.bucketize(torch.arange(channels), bounds, right=True)
    if group_layout == "interleaved" and unit == len(sizes):
        return torch.arange(channels) % unit
    if group_layout == "interleaved":
        raise ValueError(f"uneven color_groups={color_groups} need group_layout='blocked'")
    raise ValueError(
        f"group_layout must be one of ('blocked', 'interleaved'), but got {group_layout!r}"
    )


def _check_color_groups(color_groups: object) -> None:
    _sizes(color_groups)


def allowed_dependencies(
    out_channels: int,
    in_channels: int,
    height: int,
    width: int,
    *,
    mask_type: str = "A",
    color_groups: int | Sequence[int] = 1,
    group_layout: str = "blocked",
    order: Tensor | None = None,
) -> Tensor:
    """Which inputs each output may depend on.

    Output channel o (group ``go``) at pixel p may see input channel i (group ``gi``)
    at pixel q iff q is before p (in raster order, or in an earlier step of ``order``),
    or q = p and ``gi < go`` (``mask_type="A"``) or ``gi <= go`` (``"B"``).

    Args:
        order: ``(H, W)`` ints, the step at which each pixel is computed (a schedule's
            ``rank``), or ``(G, H, W)``, the step of each colour group of each pixel (a
            group-major schedule's ``group_rank``: (gi, q) is then before (go, p) when its
            step is earlier); ``None``: raster order.

    Returns:
        ``(out_channels, H, W, in_channels, H, W)`` bool tensor.
    """
    if mask_type not in ("A", "B"):
        raise ValueError(f"mask_type must be 'A' or 'B', but got {mask_type!r}")
    _check_color_groups(color_groups)
    go = _groups(out_channels, color_groups, group_layout)
    gi = _groups(in_channels, color_groups, group_layout)
    same = torch.eye(height * width, dtype=torch.bool).view(height, width, height, width)
    at_pixel = go[:, None] >= gi[None, :] if mask_type == "B" else go[:, None] > gi[None, :]
    by_pixel = same[None, :, :, None] & at_pixel[:, None, None, :, None, None]
    if order is not None and order.dim() == 3 and order.shape[0] > 1:
        if order.shape[0] != len(_sizes(color_groups)):
            raise ValueError(
                f"order has steps for {order.shape[0]} colour groups, but "
                f"color_groups={color_groups}"
            )
        steps = order.reshape(order.shape[0], -1).long()  # (G, H*W)
        later = steps[go].view(out_channels, height, width, 1, 1, 1)
        earlier = steps[gi].view(1, 1, 1, in_channels, height, width)
        return (earlier < later) | by_pixel
    if order is not None and order.dim() == 3:
        order = order[0]
    pos = torch.arange(height * width) if order is None else order.reshape(-1).long()
    before = (pos[None, :] < pos[:, None]).view(height, width, height, width)  # (p, q)
    allowed = before[None, :, :, None] | by_pixel
    return allowed.expand(out_channels, height, width, in_channels, height, width)


class _Rule:
    """The order to check against, resolved from the arguments and the module."""

    def __init__(self, mask_type: str, color_groups: Any, group_layout: str) -> None:
        self.mask_type = mask_type
        self.color_groups = color_groups
        self.group_layout = group_layout
        # (H, W) steps of a schedule, (G, H, W) of a group-major one; None: raster.
        self.order: Tensor | None = None
        self.schedule = ""

    @classmethod
    def resolve(
        cls,
        module: Any,
        mask_type: str | None,
        color_groups: Any,
        group_layout: str | None,
    ) -> _Rule:
        if mask_type is None:
            mask_type = _found(module, "mask_type", ("A", "B"))
            if _integer_model(module):
                mask_type = "A"  # a model's output never sees its own sub-pixel
            elif mask_type is None:
                # A stack of layers: strict (A) if any layer is A, else B; else A.
                kinds = {getattr(m, "mask_type", None) for m in _submodules(module)}
                mask_type = "B" if kinds & {"A", "B"} == {"B"} else "A"
                if mask_type == "B":
                    warnings.warn(
                        "assert_causal checks this stack against mask type B, inferred from "
                        "its layers (all type B): each output may then see its own pixel. "
                        "If the stack is a whole model, its first layer must be type A: "
                        "pass mask_type='A' to check that, or mask_type='B' to say B is meant",
                        stacklevel=3,
                    )
        elif mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', but got {mask_type!r}")
        if color_groups is None:
            color_groups = _found(module, "color_groups", None)
            if color_groups is None:  # e.g. an nn.Sequential of G = 3 layers
                found = [getattr(m, "color_groups", None) for m in _submodules(module)]
                lists = [g for g in found if isinstance(g, (list, tuple))]
                color_groups = (
                    lists[0] if lists else max([g for g in found if isinstance(g, int)], default=1)
                )
        _check_color_groups(color_groups)
        if group_layout is None:
            group_layout = _found(module, "group_layout", None)
            if group_layout is None:
                layouts = {getattr(m, "group_layout", None) for m in _submodules(module)} - {None}
                group_layout = layouts.pop() if len(layouts) == 1 else "blocked"
        if group_layout not in ("blocked", "interleaved"):
            raise ValueError(
                f"group_layout must be one of ('blocked', 'interleaved'), but got {group_layout!r}"
            )
        return cls(mask_type, color_groups, group_layout)

    def allowed(self, out_channels: int, in_channels: int, height: int, width: int) -> Tensor:
        """``(C_out, H, W, C_in, H, W)``: what each output may see in its own image."""
        return allowed_dependencies(
            out_channels,
            in_channels,
            height,
            width,
            mask_type=self.mask_type,
            color_groups=self.color_groups,
            group_layout=self.group_layout,
            order=self.order,
        )

    def describe(self) -> str:
        return (
            f"mask type {self.mask_type} with color_groups={self.color_groups}, "
            f"group_layout={self.group_layout!r}{self.schedule}"
        )

    def name(self, kind: str, b: int, channel: int, channels: int, r: int, c: int) -> str:
        group = int(_groups(channels, self.color_groups, self.group_layout)[channel])
        order = self.order
        if order is not None and order.dim() == 3:
            order = order[group if order.shape[0] > 1 else 0]
        step = "" if order is None else f", step {int(order[r, c])}"
        return f"{kind} (image {b}, channel {channel} [group {group}], row {r}, col {c}{step})"

    def set_schedule(self, schedule: Any, height: int, width: int) -> int:
        """Check against ``schedule``'s order; returns its number of steps."""
        if getattr(schedule, "group_passes", 1) > 1:  # group-major: a step per group
            rank = schedule.group_rank  # (G, H, W), every position in every pass
            if tuple(rank.shape[1:]) != (height, width):
                raise ValueError(
                    f"schedule is for a {rank.shape[1]}x{rank.shape[2]} image, but the "
                    f"input is {height}x{width}"
                )
            return self._set_order(rank, schedule)
        rank = getattr(schedule, "rank", None)
        if not isinstance(rank, Tensor):
            rank = torch.full((height, width), -1, dtype=torch.long)
            for t, step in enumerate(schedule):
                for r, c in step:
                    if not (0 <= r < height and 0 <= c < width) or rank[r, c] >= 0:
                        raise ValueError(
                            f"schedule step {t} has position {(r, c)} outside the "
                            f"{height}x{width} image or already visited"
                        )
                    rank[r, c] = t
        if tuple(rank.shape) != (height, width) or bool((rank < 0).any()):
            raise ValueError(
                f"schedule must visit every position of the {height}x{width} image once, but "
                f"got one for {tuple(rank.shape)} or with positions never visited"
            )
        return self._set_order(rank, schedule)

    def _set_order(self, rank: Tensor, schedule: Any) -> int:
        self.order = rank.long()
        steps = int(rank.max()) + 1
        self.schedule = f", in the order of {schedule!r} ({steps} sequential steps)"
        return steps


def _found(module: Any, name: str, valid: tuple[str, ...] | None) -> Any:
    value = getattr(module, name, None)
    if value is None or (valid is not None and value not in valid):
        return None
    return value


def _submodules(module: Any) -> list[Any]:
    return list(module.modules()) if isinstance(module, nn.Module) else []


def _integer_model(module: Any) -> bool:
    return isinstance(module, nn.Module) and isinstance(getattr(module, "levels", None), int)


class _Subject:
    """The thing checked: a function of one input, its input kind, its forward kwargs."""

    def __init__(
        self,
        module: nn.Module | Callable[..., Tensor],
        shape: tuple[int, int, int, int],
        kwargs: dict[str, Tensor],
        dtype: torch.dtype,
    ) -> None:
        self.shape = shape
        self.kwargs = kwargs
        self.dtype = dtype
        self.levels: int | None = (
            getattr(module, "levels", None) if _integer_model(module) else None
        )
        # A model's head scores each sub-pixel from the parameters and the image: its
        # log_prob, checked too (a custom head may leak there and nowhere else).
        self.head_scores: Callable[[Tensor, Tensor], Tensor] | None = None
        if isinstance(module, nn.Module):
            twin = _with_zero_parameters_drawn(module).to(dtype)
            self.fn: Callable[..., Tensor] = twin
            score = getattr(getattr(twin, "head", None), "log_prob", None)
            if self.levels and callable(score):
                self.head_scores = score
        else:
            self.fn = module

    def __call__(self, x: Tensor) -> Tensor:
        batch = x.shape[0]
        kwargs = {k: _tile(v, batch // self.shape[0]) for k, v in self.kwargs.items()}
        if not self.levels:
            x = x.to(self.dtype)
        return self.fn(x, **kwargs)

    def random_input(self, generator: torch.Generator) -> Tensor:
        if self.levels:
            return torch.randint(0, self.levels, self.shape, generator=generator)
        return torch.randn(self.shape, generator=generator, dtype=self.dtype)


def _with_zero_parameters_drawn(module: nn.Module) -> nn.Module:
    """A copy in which every parameter that is zero everywhere gets random values.

    A parameter that starts at zero (a conditioning bias, so that a conditioned model
    starts as its unconditioned twin) hides every path through it from a check of the
    current values: a map computed from the image itself would pass. Random values there
    cannot create a dependence the architecture does not have, so no false alarm comes of
    it. Parameters with some non-zero entry (a masked weight) are kept as they are.
    """
    twin = copy.deepcopy(module)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in twin.parameters():
            if p.is_floating_point() and p.numel() and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return twin


def _tile(value: Tensor, times: int) -> Tensor:
    if times == 1:
        return value
    return value.repeat(times, *(1,) * (value.dim() - 1))


@contextmanager
def _mode(module: Any, training: bool) -> Iterator[None]:
    if not isinstance(module, nn.Module):
        yield
        return
    was = module.training
    module.train(training)
    try:
        yield
    finally:
        module.train(was)


def assert_causal(
    module: nn.Module | Callable[[Tensor], Tensor],
    input_shape: Sequence[int],
    *,
    mask_type: str | None = None,
    color_groups: int | Sequence[int] | None = None,
    group_layout: str | None = None,
    seed: int = 0,
    complete: bool = False,
    labels: Tensor | None = None,
    cond: Tensor | None = None,
    schedule: Any = None,
) -> int:
    """Raise ``AssertionError`` if any output depends on an input it must not see.

    Output channel o at pixel p may depend only on the same image's inputs at pixels
    before p, and at p on input groups ``< group(o)`` (mask type A) or ``<= group(o)``
    (mask type B). Different images of a batch must not depend on each other. With
    ``schedule``, "before p" means "in an earlier step of the schedule": passing proves
    that an evaluator may compute each step from the steps before it (and, within a
    pixel, colour groups in order).

    How it checks:

    * a float module: its exact Jacobian at two random inputs; every entry the order
      forbids must be exactly zero; then the value check below, with random float
      changes (it sees through a ``.detach()``ed statistic, which a Jacobian cannot);
    * a model of integer images (an int ``levels`` attribute, like
      ``PixelCNN``), through its public ``forward``: at a random image,
      for every output position and group, all the inputs it must not see are changed
      to other levels (twice, at random) and its outputs must stay exactly the same;
      then each image's outputs must stay the same when every other image changes;
    * in the module's own dtype and in float64, in training and in eval mode (the
      module's mode is restored), with at least 3 images unless labels or a map
      for fewer are given (a batch of 1 cannot show a leak between images, nor 2 one
      that skips an image);
    * a module on which no output depends on any input fails: the check would pass
      vacuously (a dead network, a Jacobian blocked by ``.detach()`` or a lookup);
    * ``complete=True`` also fails where an input that the order allows, and that the
      module's kernels reach (the same module with every mask removed depends on it),
      has no influence: a blind spot or a dead path. The plain ``PixelCNN`` fails
      it (its blind spot); ``GatedPixelCNN`` passes.

    Outputs may be ``(B, C_out, H, W)`` or ``(B, C_out, *extra, H, W)`` (e.g. a
    PixelCNN's ``(B, C, K, H, W)`` logits); the group of an output is that of its
    channel along dim 1.

    Args:
        module: an ``nn.Module`` or a function of one float tensor.
        input_shape: ``(B, C, H, W)`` or ``(C, H, W)`` of the input to check at.
        mask_type: ``"A"`` (strict: a sub-pixel's output never sees its own group) or
            ``"B"``; defaults to A for a model of integer images, else
            ``module.mask_type``, else A if any layer inside is type A, B if all are B,
            else A.
        color_groups: G, or a list of uneven group sizes (``[1, 1, 2]``: group g has
            ``sizes[g] * C / sum(sizes)`` of C channels, blocked); defaults to
            ``module.color_groups``, else the largest of the
            layers' inside, else 1.
        group_layout: defaults to ``module.group_layout``, else the layers', else
            ``"blocked"``.
        seed: seed of the random inputs.
        complete: also require every allowed, reachable input to have influence.
        labels: class labels for a conditioned model, passed to ``forward``.
        cond: a conditioning map for a conditioned model, passed to ``forward``.
        schedule: ``None`` (raster order) or a schedule for the input's ``(H, W)``: a
            ``Schedule`` (``maskedconv.wavefront(model, (H, W))``) or any sequence of
            steps, each a sequence of ``(row, col)``.

    Returns:
        The number of sequential steps of the order checked (H*W for raster).

    Raises:
        AssertionError: naming the first offending output (in raster order) and input,
            with their steps when a schedule is given.
        ValueError: for a bad shape or argument, an input shape whose channels differ
            from the module's, or a Jacobian that would need more than 2 GiB.

    Cost: for each of its (up to) 4 passes (2 dtypes x 2 modes), about
    ``2B + 4 + G * H * W * T / B`` forward passes of a batch of B, with T = 3 trials for
    binary images and 4 otherwise; the default ``GatedPixelCNN`` (64 channels, 8 layers)
    takes about 14 s at 8x8 and 43 s at 12x12 on 2 CPU cores, and would take many
    minutes at 28x28. A stack of convolutions is checked as well at the smallest image
    that covers its kernels' reach (``H, W >= k // 2 + 1``, dilation included).

    Warns:
        UserWarning: if the image is smaller than the reach of the module's kernels,
            so that a leak at a far tap could go unseen; or if the check will take more
            than 2,000 forward passes (it says how many, and the smallest size to check
            at).

    Example:
        >>> assert_causal(PixelCNN(3, 4, hidden_channels=12, num_layers=2), (2, 3, 5, 5))
        25
    """
    rule = _Rule.resolve(module, mask_type, color_groups, group_layout)
    shape = _check_shape(module, input_shape)
    steps = shape[2] * shape[3]
    if schedule is not None and schedule != "raster":
        steps = rule.set_schedule(schedule, shape[2], shape[3])
    given = [len(v) for v in (labels, cond) if v is not None and len(v) > 1]
    if shape[0] < 3 and not given:
        # A leak between images needs two of them, and one that skips an image (image 0
        # seeing image 2) three.
        shape = (3, *shape[1:])
    kwargs = _forward_kwargs(labels, cond, shape[0])
    _warn_if_smaller_than_reach(module, shape)
    own = _own_dtype(module)
    modes = (_is_training(module), not _is_training(module))
    passes = [
        (dtype, training)
        for dtype in dict.fromkeys((own, torch.float64))
        for training in (modes if isinstance(module, nn.Module) else modes[:1])
    ]
    _warn_if_costly(module, shape, rule, len(passes))
    for index, (dtype, training) in enumerate(passes):
        with _mode(module, training):
            subject = _Subject(module, shape, kwargs, dtype)
        if not subject.levels:
            _check_jacobian(subject, rule, seed)
        # Each pass draws other inputs and changes: more chances to move a leak that a
        # ReLU hides at one input.
        _check_by_changing_values(subject, rule, seed + 1000 * index)
        if subject.head_scores is not None:
            _check_head_scores(subject, rule, seed + 1000 * index)
    if complete:
        _check_complete(module, shape, kwargs, rule, seed)
    return steps


def _is_training(module: Any) -> bool:
    return bool(getattr(module, "training", False))


def _own_dtype(module: Any) -> torch.dtype:
    if isinstance(module, nn.Module):
        for p in module.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def _check_shape(module: Any, input_shape: Sequence[int]) -> tuple[int, int, int, int]:
    shape = tuple(input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or any(
        isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape
    ):
        raise ValueError(
            f"input_shape must be (B, C, H, W) or (C, H, W) of positive ints, but got "
            f"{tuple(input_shape)}"
        )
    expected = getattr(module, "in_channels", None)
    if isinstance(expected, int) and shape[1] != expected:
        raise ValueError(
            f"input_shape must have {expected} channels, the module's in_channels, but got "
            f"{shape[1]} in {tuple(input_shape)}"
        )
    return shape


def _forward_kwargs(labels: Tensor | None, cond: Tensor | None, batch: int) -> dict[str, Tensor]:
    kwargs: dict[str, Tensor] = {}
    for name, value in (("labels", labels), ("cond", cond)):
        if value is None:
            continue
        if len(value) == 1 and batch > 1:
            value = _tile(value, batch)
        if len(value) != batch:
            raise ValueError(
                f"{name} must hold one entry per image ({batch}, or 1 to share), but got "
                f"{len(value)}"
            )
        kwargs[name] = value
    return kwargs


def _warn_if_costly(
    module: Any, shape: tuple[int, int, int, int], rule: _Rule, passes: int
) -> None:
    batch, _, height, width = shape
    trials = len(_trials(getattr(module, "levels", None) if _integer_model(module) else None))
    groups = len(_sizes(rule.color_groups))
    forwards = passes * (2 * batch + 4 + -(-groups * height * width * trials // batch))
    if forwards > _COSTLY:
        rows, cols = _reach(module)
        warnings.warn(
            f"assert_causal will run about {forwards:,} forward passes of a batch of {batch} "
            f"at {height}x{width}; every tap of the module's kernels shows at "
            f"{max(rows + 1, 3)}x{max(cols + 1, 3)} already, so a check there is much cheaper",
            stacklevel=3,
        )


_COSTLY = 2000  # forward passes past which assert_causal warns of its cost


def _reach(module: Any) -> tuple[int, int]:
    """Rows and columns from its centre that the module's largest kernel reaches."""
    rows = cols = 0
    for m in _submodules(module):
        kernel, dilation = getattr(m, "kernel_size", None), getattr(m, "dilation", None)
        if isinstance(kernel, tuple) and isinstance(dilation, tuple) and len(kernel) == 2:
            rows = max(rows, dilation[0] * (kernel[0] - 1) // 2)
            cols = max(cols, dilation[1] * (kernel[1] - 1) // 2)
    return rows, cols


def _warn_if_smaller_than_reach(module: Any, shape: tuple[int, int, int, int]) -> None:
    # A leaking tap at offset (dr, dc) of one kernel shows only in an image taller than
    # dr and wider than dc: check that the image covers the largest kernel's reach.
    rows, cols = _reach(module)
    height, width = shape[2:]
    if height <= rows or width <= cols:
        warnings.warn(
            f"input_shape {shape} is smaller than the reach of the module's largest kernel "
            f"({rows} rows, {cols} columns from its centre): a leak at a far tap may go "
            f"unseen; check at H >= {rows + 1} and W >= {cols + 1}",
            stacklevel=3,
        )


def _check_jacobian(subject: _Subject, rule: _Rule, seed: int) -> None:
    batch, in_channels, height, width = subject.shape
    generator = torch.Generator().manual_seed(seed)
    seen_any = False
    for _ in range(2):
        x = subject.random_input(generator)
        out = subject(x)
        _check_output_shape(out, batch, height, width)
        needed = out.numel() * x.numel() * out.element_size()
        if needed > _JACOBIAN_LIMIT:
            raise ValueError(
                f"the Jacobian at input_shape {subject.shape} would take "
                f"{needed / 2**30:.1f} GiB (output {tuple(out.shape)} x input "
                f"{tuple(x.shape)}); check at a smaller shape (the reach of the kernels is "
                f"enough) or with fewer output channels"
            )
        out_channels = out.shape[1]
        extra = out.shape[2:-2]
        jac: Tensor = torch.autograd.functional.jacobian(  # type: ignore[no-untyped-call]
            subject, x, vectorize=True
        )  # out.shape + x.shape
        # (B, C_out, *extra, H, W, B, C_in, H, W) -> (C_out, extra, H, W, B, B, C_in, H, W)
        jac = jac.reshape(batch, out_channels, -1, height, width, batch, in_channels, height, width)
        jac = jac.permute(1, 2, 3, 4, 0, 5, 6, 7, 8)
        seen_any = seen_any or bool((jac != 0).any())
        allowed = rule.allowed(out_channels, in_channels, height, width)
        same_image = torch.eye(batch, dtype=torch.bool)
        allowed_full = (
            allowed[:, None, :, :, None, None, :, :, :]
            & same_image[None, None, None, None, :, :, None, None, None]
        )
        bad = (jac != 0) & ~allowed_full
        if bool(bad.any()):
            # First offence in raster order of the output pixel, then group order.
            out_groups = _groups(out_channels, rule.color_groups, rule.group_layout)
            hits = torch.nonzero(bad)
            keys = [
                (int(r), int(c), int(out_groups[o]), int(o), int(e))
                for o, e, r, c in hits[:, :4].tolist()
            ]
            first = hits[min(range(len(keys)), key=keys.__getitem__)].tolist()
            o, e, r, c, b_out, b_in, i, qr, qc = first
            output = rule.name("output", b_out, o, out_channels, r, c)
            if extra:
                output = output[:-1] + f", index {e} of dims {tuple(extra)})"
            raise AssertionError(
                f"{output} depends on {rule.name('input', b_in, i, in_channels, qr, qc)}, "
                f"which it must not see under {rule.describe()} "
                f"(d out / d in = {float(jac[tuple(first)]):.3g}, in {subject.dtype})"
            )
    if not seen_any:
        raise AssertionError(_VACUOUS)


_VACUOUS = (
    "no output depends on any input at two random inputs: the check would pass vacuously "
    "(a dead network, a .detach() or a lookup that blocks the gradient?); a model of "
    "integer images needs an int `levels` attribute to be checked through its forward"
)


# How a test moves the inputs an output must not see. Integer images: each to another
# level at random; each to the top level (a leak only where a value is K-1) and to level
# 0; a random half (a leak through the parity of two inputs, which moving both hides).
# Float inputs: up and down by 1 to 2 (a branch on a sign), to values of random sign and
# size up to 1e3 (a ReLU dead near 0), a random half moved up.
_INTEGER_TRIALS = ("other", "top", "bottom", "half")
_BINARY_TRIALS = ("other", "half", "half")  # with 2 levels, top and bottom are "other"
_FLOAT_TRIALS = ("up", "down", "wide", "half")


def _trials(levels: int | None) -> tuple[str, ...]:
    if not levels:
        return _FLOAT_TRIALS
    return _BINARY_TRIALS if levels == 2 else _INTEGER_TRIALS


def _changed(
    x: Tensor, where: Tensor, trial: str, levels: int | None, generator: torch.Generator
) -> Tensor:
    """``x`` with the entries marked in ``where`` moved as ``trial`` says; each one moves
    (with ``"half"``, each of a random half of them)."""
    if trial == "half":
        where = where & (torch.rand(x.shape, generator=generator) < 0.5)
        trial = "other" if levels else "up"
    if levels:
        if trial == "other":
            new = (x + torch.randint(1, levels, x.shape, generator=generator)) % levels
        elif trial == "top":
            new = torch.where(x == levels - 1, 0, levels - 1)
        else:
            new = torch.where(x == 0, levels - 1, 0)
        return torch.where(where, new, x)
    step = 1 + torch.rand(x.shape, generator=generator, dtype=x.dtype)
    if trial == "up":
        new = x + step
    elif trial == "down":
        new = x - step
    else:
        sign = torch.randint(0, 2, x.shape, generator=generator).to(x.dtype) * 2 - 1
        new = sign * 10 ** (3 * torch.rand(x.shape, generator=generator, dtype=x.dtype))
    return torch.where(where, new, x)


def _moved(a: Tensor, b: Tensor) -> Tensor:
    """Where ``a`` and ``b`` differ, a NaN in both counting as the same value."""
    return (a != b) & ~(a.isnan() & b.isnan()) if a.is_floating_point() else a != b


class _Test:
    """One test: the outputs ``outs`` at ``(r, c)`` must not move when ``forbidden``
    (``(C_in, H, W)``) moves as ``trial`` says."""

    def __init__(self, r: int, c: int, outs: Tensor, forbidden: Tensor, trial: str) -> None:
        self.r, self.c, self.outs, self.forbidden, self.trial = r, c, outs, forbidden, trial


def _position_tests(
    rule: _Rule, allowed: Tensor, out_channels: int, trials: tuple[str, ...]
) -> list[_Test]:
    """The tests of every output pixel and group with something to hide, in raster order
    of the output, then group order."""
    _, height, width = allowed.shape[:3]
    out_groups = _groups(out_channels, rule.color_groups, rule.group_layout)
    tests = []
    for r in range(height):
        for c in range(width):
            for group in range(len(_sizes(rule.color_groups))):
                outs = torch.nonzero(out_groups == group).flatten()
                if not len(outs):
                    continue
                forbidden = ~allowed[int(outs[0]), r, c]
                if bool(forbidden.any()):
                    tests += [_Test(r, c, outs, forbidden, trial) for trial in trials]
    return tests


def _check_by_changing_values(subject: _Subject, rule: _Rule, seed: int) -> None:
    """Change what each output must not see; its value must not move at all.

    Integer inputs move to other levels; float inputs by amounts of either sign and many
    sizes (see ``_trials``). For float modules this complements the Jacobian: it sees
    through ``.detach()``, a dead ReLU and a branch in Python.

    Once no image depends on another (checked first), each image of the batch runs a
    different test: a batch of B images does B tests a forward pass.
    """
    batch, in_channels, height, width = subject.shape
    levels = subject.levels
    trials = _trials(levels)
    generator = torch.Generator().manual_seed(seed + 1)
    x = subject.random_input(generator)
    with torch.no_grad():
        base = subject(x)
        _check_output_shape(base, batch, height, width)
        out_channels = base.shape[1]
        everything = torch.ones(x.shape, dtype=torch.bool)
        if not any(
            bool(_moved(subject(_changed(x, everything, trial, levels, generator)), base).any())
            for trial in trials[:2]
        ):
            raise AssertionError(
                _VACUOUS.replace("at two random inputs", "when every input changes")
            )
        for b in range(batch):
            others = torch.ones(x.shape, dtype=torch.bool)
            others[b] = False
            for trial in trials[:2]:
                x2 = _changed(x, others, trial, levels, generator)
                diff = _moved(subject(x2)[b], base[b])  # (C_out, ..., H, W)
                if bool(diff.any()):
                    o, *_, r, c = (int(v) for v in torch.nonzero(diff)[0])
                    _name_culprit(subject, rule, x, x2, base, (b, o, r, c), others)
        allowed = rule.allowed(out_channels, in_channels, height, width)
        tests = _position_tests(rule, allowed, out_channels, trials)
        for start in range(0, len(tests), batch):
            chunk = tests[start : start + batch]
            x2 = x.clone()
            for b, test in enumerate(chunk):
                x2[b] = _changed(x[b], test.forbidden, test.trial, levels, generator)
            out = subject(x2)
            for b, test in enumerate(chunk):
                r, c, outs = test.r, test.c, test.outs
                diff = _moved(out[b, outs, ..., r, c], base[b, outs, ..., r, c])
                if bool(diff.any()):
                    o = int(outs[int(torch.nonzero(diff.reshape(len(outs), -1).any(1))[0])])
                    mine = torch.zeros(x.shape, dtype=torch.bool)
                    mine[b] = test.forbidden
                    _name_culprit(subject, rule, x, x2, base, (b, o, r, c), mine)


def _name_culprit(
    subject: _Subject,
    rule: _Rule,
    x: Tensor,
    x2: Tensor,
    base: Tensor,
    output: tuple[int, int, int, int],
    forbidden: Tensor,
) -> None:
    """Raise for ``output`` ``(image, channel, row, col)``, which moved when the inputs
    marked in ``forbidden`` moved from ``x`` to ``x2``: moved one at a time, name the
    first that moves it alone."""
    b_out, o, r, c = output
    _, in_channels = x.shape[:2]
    out_index = (b_out, o, ..., r, c)
    name = rule.name("output", b_out, o, base.shape[1], r, c)
    for b_in, i, qr, qc in torch.nonzero(forbidden & (x2 != x)).tolist():
        x1 = x.clone()
        x1[b_in, i, qr, qc] = x2[b_in, i, qr, qc]
        if bool(_moved(subject(x1)[out_index], base[out_index]).any()):
            raise AssertionError(
                f"{name} depends on {rule.name('input', b_in, i, in_channels, qr, qc)}, "
                f"which it must not see under {rule.describe()} (its value changed from "
                f"{float(x[b_in, i, qr, qc]):g} to {float(x1[b_in, i, qr, qc]):g}, "
                f"in {subject.dtype})"
            )
    raise AssertionError(
        f"{name} changes when the inputs it must not see change together, though no single "
        f"one of them changes it (in {subject.dtype})"
    )


def _check_head_scores(subject: _Subject, rule: _Rule, seed: int) -> None:
    """The head's ``log_prob`` of each sub-pixel must not move when what it must not see
    moves: the image's values that mask type B forbids it (it scores its own value) and
    the parameters at later pixels (or steps), which are computed from such values."""
    score = subject.head_scores
    assert score is not None
    batch, channels, height, width = subject.shape
    levels = subject.levels
    generator = torch.Generator().manual_seed(seed + 2)
    x = subject.random_input(generator)
    with torch.no_grad():
        params = subject(x)
        base = score(params, x)
    if not isinstance(base, Tensor) or tuple(base.shape) != tuple(x.shape):
        raise ValueError(
            f"the model's head.log_prob must return one value per sub-pixel, "
            f"{tuple(x.shape)}, but got {tuple(getattr(base, 'shape', ()))}"
        )
    scored = _Rule("B", rule.color_groups, rule.group_layout)
    scored.order, scored.schedule = rule.order, rule.schedule
    rank = torch.arange(height * width).view(height, width) if rule.order is None else rule.order
    if rank.dim() == 3:  # group-major: the pass of group 0 (every pass visits in its order)
        rank = rank[0]
    allowed = scored.allowed(channels, channels, height, width)
    with torch.no_grad():
        for b in range(batch):  # first, no image may depend on another
            x2 = (x + 1) % levels if levels else x + 1
            params2 = params + 1
            x2[b], params2[b] = x[b], params[b]
            if bool(_moved(score(params2, x2)[b], base[b]).any()):
                raise AssertionError(
                    f"the head's log_prob of image {b} moves when the other images' values "
                    f"and parameters move: images must not depend on each other "
                    f"(in {subject.dtype})"
                )
    tests = _position_tests(scored, allowed, channels, _trials(levels))
    for start in range(0, len(tests), batch):
        chunk = tests[start : start + batch]
        x2, params2 = x.clone(), params.clone()
        for b, test in enumerate(chunk):
            x2[b] = _changed(x[b], test.forbidden, test.trial, levels, generator)
            later = (rank > rank[test.r, test.c]).expand(params[b].shape)
            trial = _FLOAT_TRIALS[(start + b) % len(_FLOAT_TRIALS)]
            params2[b] = _changed(params[b], later, trial, None, generator)
        with torch.no_grad():
            out = score(params2, x2)
        for b, test in enumerate(chunk):
            r, c = test.r, test.c
            diff = _moved(out[b, test.outs, r, c], base[b, test.outs, r, c])
            if bool(diff.any()):
                o = int(test.outs[int(torch.nonzero(diff)[0])])
                sub_pixel = scored.name("sub-pixel", b, o, channels, r, c)
                raise AssertionError(
                    f"the head's log_prob of {sub_pixel} moves when the values it must not "
                    f"see under {scored.describe()} and the parameters of later pixels move: "
                    f"it may depend only on its own and earlier values and on the parameters "
                    f"up to its own pixel (in {subject.dtype})"
                )


def _check_output_shape(out: Tensor, batch: int, height: int, width: int) -> None:
    if out.dim() < 4 or out.shape[0] != batch or tuple(out.shape[-2:]) != (height, width):
        raise ValueError(
            f"the module's output must be (B={batch}, C_out, ..., H={height}, W={width}), "
            f"but got {tuple(out.shape)}"
        )


# --- influence: receptive fields and completeness ------------------------------------


def _dependence(
    module: nn.Module | Callable[..., Tensor],
    shape: tuple[int, int, int, int],
    kwargs: dict[str, Tensor],
    seed: int,
    trials: int = 2,
) -> Tensor:
    """Which inputs of image 0 move which of its outputs: ``(C_out, H, W, C_in, H, W)``.

    Integer models: each input sub-pixel is changed alone (to every other level, up to
    two), the changed images stacked as one batch; an output "moves" by more than
    1e-9 of its size (another batch size may sum in another order). Float modules: the
    Jacobian's non-zero entries. The union over ``trials`` random inputs, in float64.
    """
    subject = _Subject(module, shape, kwargs, torch.float64)
    batch, channels, height, width = shape
    generator = torch.Generator().manual_seed(seed)
    seen: Tensor | None = None
    for _ in range(trials):
        x = subject.random_input(generator)
        with torch.no_grad():
            base = subject(x)
        if subject.levels:
            levels = subject.levels
            changes = []
            for shift in range(1, min(levels, 3)):
                for index in range(channels * height * width):
                    y = x.clone()
                    y[0].view(-1)[index] = (y[0].view(-1)[index] + shift) % levels
                    changes.append(y)
            moved = []
            with torch.no_grad():
                for chunk in torch.split(torch.cat(changes), batch * 64):
                    out = subject(chunk).view(-1, *base.shape)[:, 0]  # image 0 of each copy
                    delta = (out - base[0]).abs() > 1e-9 * (1 + base[0].abs())
                    moved.append(delta.reshape(len(out), base.shape[1], -1, height, width).any(2))
            per_change = torch.cat(moved).view(
                -1, channels * height * width, base.shape[1], height, width
            )
            dep = per_change.any(0).permute(1, 2, 3, 0)  # (C_out, H, W, C*H*W)
        else:
            jac = torch.autograd.functional.jacobian(  # type: ignore[no-untyped-call]
                lambda t: subject(t)[0], x, vectorize=True
            )  # (C_out, *extra, H, W, B, C, H, W)
            jac = jac.reshape(base.shape[1], -1, height, width, batch, channels * height * width)
            dep = (jac[:, :, :, :, 0] != 0).any(1)  # (C_out, H, W, C*H*W)
        dep = dep.reshape(base.shape[1], height, width, channels, height, width)
        seen = dep if seen is None else seen | dep
    assert seen is not None
    return seen


def receptive_field(
    model: nn.Module | Callable[..., Tensor],
    input_shape: Sequence[int],
    pixel: tuple[int, int],
    *,
    labels: Tensor | None = None,
    cond: Tensor | None = None,
    seed: int = 0,
) -> Tensor:
    """Which input sub-pixels the outputs at ``pixel`` depend on.

    Measured, not derived: for a model of integer images (an int ``levels``
    attribute), by changing one input sub-pixel at a time; for a float module, from its
    Jacobian; the union over two random inputs, in float64. Applied to the plain
    ``PixelCNN`` it shows the blind spot, a wedge above and to the
    right that no depth fills; the ``GatedPixelCNN`` has none.

    Args:
        model: the model or module.
        input_shape: ``(C, H, W)`` or ``(B, C, H, W)``; image 0 is the one measured.
        pixel: ``(row, col)`` of the outputs.
        labels: class labels for a conditioned model.
        cond: a conditioning map for a conditioned model.
        seed: seed of the random inputs.

    Returns:
        ``(C, H, W)`` bool: True where some output at ``pixel`` depends on the input.

    Example:
        >>> seen = receptive_field(PixelCNN(1, 2, num_layers=2, kernel_size=3), (1, 5, 5), (2, 2))
        >>> seen[0].int()
        tensor([[1, 1, 1, 1, 1],
                [1, 1, 1, 1, 0],
                [1, 1, 0, 0, 0],
                [0, 0, 0, 0, 0],
                [0, 0, 0, 0, 0]], dtype=torch.int32)
    """
    shape = _check_shape(model, input_shape)
    row, col = pixel
    if not (0 <= row < shape[2] and 0 <= col < shape[3]):
        raise ValueError(f"pixel must lie in the {shape[2]}x{shape[3]} image, but got {pixel}")
    kwargs = _forward_kwargs(labels, cond, shape[0])
    with _mode(model, False):
        dep = _dependence(model, shape, kwargs, seed)
    return dep[:, row, col].any(0)


def _unmasked(module: nn.Module) -> nn.Module:
    """A copy in which every masked conv (a ``mask`` of its weight's shape) uses its
    whole kernel: what the module's kernels could reach if the order allowed it."""
    twin = copy.deepcopy(module)
    for m in twin.modules():
        mask, weight = getattr(m, "mask", None), getattr(m, "weight", None)
        if isinstance(mask, Tensor) and isinstance(weight, Tensor) and mask.shape == weight.shape:
            with torch.no_grad():
                weight.add_((1 - mask) * torch.randn_like(weight) * weight.std())

            m.forward = types.MethodType(_whole_kernel_forward, m)
    return twin


def _whole_kernel_forward(m: Any, x: Tensor) -> Tensor:
    return F.conv2d(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)


def _check_complete(
    module: nn.Module | Callable[..., Tensor],
    shape: tuple[int, int, int, int],
    kwargs: dict[str, Tensor],
    rule: _Rule,
    seed: int,
) -> None:
    if not isinstance(module, nn.Module):
        raise ValueError("complete=True needs an nn.Module, to compare with its unmasked twin")
    with _mode(module, False):
        seen = _dependence(module, shape, kwargs, seed, trials=4)
        reach = _dependence(_unmasked(module), shape, kwargs, seed)
    out_channels, height, width, in_channels = seen.shape[:4]
    allowed = rule.allowed(out_channels, in_channels, height, width)
    missing = reach & allowed & ~seen
    if not bool(missing.any()):
        return
    o, r, c, i, qr, qc = (int(v) for v in torch.nonzero(missing)[0])
    count = int(missing[:, r, c].any(0).sum())
    raise AssertionError(
        f"{rule.name('output', 0, o, out_channels, r, c)} does not depend on "
        f"{rule.name('input', 0, i, in_channels, qr, qc)}, which {rule.describe()} allows "
        f"and the module's kernels reach (with every mask removed it does): a blind spot or "
        f"a dead path; {count} such input sub-pixels at this output pixel"
    )
