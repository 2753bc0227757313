"""Check that a module's outputs depend only on the inputs they may see.

Depends on nothing but torch, so it can check any stack of layers, ours or not.
Float modules are checked by their exact Jacobian; models of integer images (those
with an int ``levels`` attribute, like :class:`~maskedconv.PixelCNN`) through their
public ``forward``, by changing integer values: a gradient cannot pass through an
embedding lookup, so a Jacobian would be zero there whatever the model does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["allowed_dependencies", "assert_causal"]


def _groups(channels: int, color_groups: int, group_layout: str) -> Tensor:
    # Derived here again rather than imported from .masks: the checker must not
    # trust the code it checks.
    if channels % color_groups:
        raise ValueError(
            f"color_groups={color_groups} must divide the channel count, "
            f"but got {channels} channels"
        )
    index = torch.arange(channels)
    if group_layout == "blocked":
        return index // (channels // color_groups)
    if group_layout == "interleaved":
        return index % color_groups
    raise ValueError(
        f"group_layout must be one of ('blocked', 'interleaved'), but got {group_layout!r}"
    )


def allowed_dependencies(
    out_channels: int,
    in_channels: int,
    height: int,
    width: int,
    *,
    mask_type: str = "A",
    color_groups: int = 1,
    group_layout: str = "blocked",
) -> Tensor:
    """Which inputs each output may depend on.

    Output channel o (group ``go``) at pixel p may see input channel i (group ``gi``)
    at pixel q iff q is before p in raster order, or q = p and ``gi < go``
    (``mask_type="A"``) or ``gi <= go`` (``"B"``).

    Returns:
        ``(out_channels, H, W, in_channels, H, W)`` bool tensor.
    """
    if mask_type not in ("A", "B"):
        raise ValueError(f"mask_type must be 'A' or 'B', but got {mask_type!r}")
    go = _groups(out_channels, color_groups, group_layout)
    gi = _groups(in_channels, color_groups, group_layout)
    pos = torch.arange(height * width)
    before = (pos[None, :] < pos[:, None]).view(height, width, height, width)  # (p, q)
    same = torch.eye(height * width, dtype=torch.bool).view(height, width, height, width)
    order = go[:, None] >= gi[None, :] if mask_type == "B" else go[:, None] > gi[None, :]
    allowed = before[None, :, :, None] | (
        same[None, :, :, None] & order[:, None, None, :, None, None]
    )
    return allowed.expand(out_channels, height, width, in_channels, height, width)


def assert_causal(
    module: nn.Module | Callable[[Tensor], Tensor],
    input_shape: Sequence[int],
    *,
    mask_type: str | None = None,
    color_groups: int | None = None,
    group_layout: str | None = None,
    seed: int = 0,
) -> None:
    """Raise ``AssertionError`` if any output depends on an input it must not see.

    Output channel o at pixel p may depend only on the same image's inputs at pixels
    before p, and at p on input groups ``< group(o)`` (mask type A) or ``<= group(o)``
    (mask type B). Different images of a batch must not depend on each other.

    The module is copied to float64. A float module's Jacobian at a random input is
    computed exactly, and every entry the order forbids must be exactly zero. A model
    of integer images (an int ``levels`` attribute, like :class:`~maskedconv.PixelCNN`)
    is checked through its public ``forward`` instead: at a random image, for every
    output position and group, all the inputs it must not see are changed to other
    levels (twice, at random), and its outputs must stay exactly the same; then each
    image's outputs must stay the same when every other image changes.

    Outputs may be ``(B, C_out, H, W)`` or ``(B, C_out, *extra, H, W)`` (e.g. a
    PixelCNN's ``(B, C, K, H, W)`` logits); the group of an output is that of its
    channel along dim 1.

    Args:
        module: an ``nn.Module`` or a function of one float tensor.
        input_shape: ``(B, C, H, W)`` or ``(C, H, W)`` of the input to check at.
        mask_type: ``"A"`` (strict: a sub-pixel's output never sees its own group) or
            ``"B"``; defaults to ``module.mask_type`` when that is ``"A"``/``"B"``, else ``"A"``.
        color_groups: G; defaults to ``module.color_groups``, else 1.
        group_layout: defaults to ``module.group_layout``, else ``"blocked"``.
        seed: seed of the random input.

    Raises:
        AssertionError: naming the first offending output (in raster order) and input.

    Example:
        >>> assert_causal(PixelCNN(3, 4, hidden_channels=12, num_layers=2), (1, 3, 5, 5))
    """
    mask_type = _attr(module, "mask_type", mask_type, "A")
    if mask_type not in ("A", "B"):
        mask_type = "A"
    color_groups = int(_attr(module, "color_groups", color_groups, 1))
    group_layout = str(_attr(module, "group_layout", group_layout, "blocked"))
    shape = tuple(input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4:
        raise ValueError(
            f"input_shape must be (B, C, H, W) or (C, H, W), but got {tuple(input_shape)}"
        )
    batch, in_channels, height, width = shape

    levels = getattr(module, "levels", None)
    if isinstance(module, nn.Module) and isinstance(levels, int):
        _check_by_changing_values(
            copy.deepcopy(module).to(torch.float64),
            shape,
            levels,
            mask_type=mask_type,
            color_groups=color_groups,
            group_layout=group_layout,
            seed=seed,
        )
        return

    fn: Callable[[Tensor], Tensor] = (
        copy.deepcopy(module).to(torch.float64) if isinstance(module, nn.Module) else module
    )
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    out = fn(x)
    _check_output_shape(out, batch, height, width)
    out_channels = out.shape[1]
    extra = out.shape[2:-2]
    jac: Tensor = torch.autograd.functional.jacobian(  # type: ignore[no-untyped-call]
        fn, x, vectorize=True
    )  # out.shape + x.shape
    # (B, C_out, *extra, H, W, B, C_in, H, W) -> (C_out, extra..., H, W, B, B, C_in, H, W)
    jac = jac.reshape(batch, out_channels, -1, height, width, batch, in_channels, height, width)
    jac = jac.permute(1, 2, 3, 4, 0, 5, 6, 7, 8)

    allowed = allowed_dependencies(
        out_channels,
        in_channels,
        height,
        width,
        mask_type=mask_type,
        color_groups=color_groups,
        group_layout=group_layout,
    )  # (C_out, H, W, C_in, H, W)
    same_image = torch.eye(batch, dtype=torch.bool)
    allowed_full = (
        allowed[:, None, :, :, None, None, :, :, :]
        & same_image[None, None, None, None, :, :, None, None, None]
    )
    bad = (jac != 0) & ~allowed_full
    if not bool(bad.any()):
        return
    # First offence in raster order of the output pixel, then group order.
    out_groups = _groups(out_channels, color_groups, group_layout)
    in_groups = _groups(in_channels, color_groups, group_layout)
    hits = torch.nonzero(bad)
    keys = [
        (int(r), int(c), int(out_groups[o]), int(o), int(e)) for o, e, r, c in hits[:, :4].tolist()
    ]
    first = hits[min(range(len(keys)), key=keys.__getitem__)].tolist()
    o, e, r, c, b_out, b_in, i, qr, qc = first
    extra_text = f", index {e} of dims {tuple(extra)}" if extra else ""
    raise AssertionError(
        f"output (image {b_out}, channel {o} [group {int(out_groups[o])}]{extra_text}, row {r}, "
        f"col {c}) depends on input (image {b_in}, channel {i} [group {int(in_groups[i])}], "
        f"row {qr}, col {qc}), which it must not see under mask type {mask_type} with "
        f"color_groups={color_groups}, group_layout={group_layout!r} "
        f"(d out / d in = {float(jac[tuple(first)]):.3g})"
    )


def _check_by_changing_values(
    model: nn.Module,
    shape: tuple[int, int, int, int],
    levels: int,
    *,
    mask_type: str,
    color_groups: int,
    group_layout: str,
    seed: int,
) -> None:
    batch, in_channels, height, width = shape
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, shape, generator=generator)

    def changed(where: Tensor) -> Tensor:
        # Every marked entry moves to another level, chosen at random.
        shift = torch.randint(1, levels, shape, generator=generator)
        return torch.where(where, (x + shift) % levels, x)

    with torch.no_grad():
        base = model(x)
        _check_output_shape(base, batch, height, width)
        out_channels = base.shape[1]
        out_groups = _groups(out_channels, color_groups, group_layout)
        in_groups = _groups(in_channels, color_groups, group_layout)
        allowed = allowed_dependencies(
            out_channels,
            in_channels,
            height,
            width,
            mask_type=mask_type,
            color_groups=color_groups,
            group_layout=group_layout,
        )  # (C_out, H, W, C_in, H, W)

        def fail(b_out: int, o: int, r: int, c: int, forbidden: Tensor) -> None:
            # Name one culprit: change the forbidden inputs one at a time.
            out_index = (b_out, o, ..., r, c)
            for b_in, i, qr, qc in torch.nonzero(forbidden).tolist():
                for shift in range(1, min(levels, 4)):
                    x2 = x.clone()
                    x2[b_in, i, qr, qc] = (x[b_in, i, qr, qc] + shift) % levels
                    if not torch.equal(model(x2)[out_index], base[out_index]):
                        raise AssertionError(
                            f"output (image {b_out}, channel {o} [group {int(out_groups[o])}], "
                            f"row {r}, col {c}) depends on input (image {b_in}, channel {i} "
                            f"[group {int(in_groups[i])}], row {qr}, col {qc}), which it must "
                            f"not see under mask type {mask_type} with "
                            f"color_groups={color_groups}, group_layout={group_layout!r} (its "
                            f"value changed from {int(x[b_in, i, qr, qc])} to "
                            f"{int(x2[b_in, i, qr, qc])})"
                        )
            raise AssertionError(
                f"output (image {b_out}, channel {o} [group {int(out_groups[o])}], row {r}, "
                f"col {c}) changes when the inputs it must not see change together, though "
                f"no single one of them changes it"
            )

        for r in range(height):
            for c in range(width):
                for group in range(color_groups):
                    outs = torch.nonzero(out_groups == group).flatten()
                    if not len(outs):
                        continue
                    forbidden = ~allowed[int(outs[0]), r, c]  # (C_in, H, W)
                    if not bool(forbidden.any()):
                        continue
                    everywhere = forbidden.expand(batch, -1, -1, -1)
                    for _ in range(2):
                        out = model(changed(everywhere))
                        diff = out[:, outs, ..., r, c] != base[:, outs, ..., r, c]
                        diff = diff.reshape(batch, len(outs), -1)
                        if bool(diff.any()):
                            b_out, k = (int(v) for v in torch.nonzero(diff.any(2))[0])
                            mine = torch.zeros(shape, dtype=torch.bool)
                            mine[b_out] = forbidden
                            fail(b_out, int(outs[k]), r, c, mine)
        for b in range(batch):
            others = torch.ones(shape, dtype=torch.bool)
            others[b] = False
            for _ in range(2):
                diff = model(changed(others))[b] != base[b]  # (C_out, ..., H, W)
                if bool(diff.any()):
                    o, *_, r, c = (int(v) for v in torch.nonzero(diff)[0])
                    fail(b, o, r, c, others)


def _check_output_shape(out: Tensor, batch: int, height: int, width: int) -> None:
    if out.dim() < 4 or out.shape[0] != batch or tuple(out.shape[-2:]) != (height, width):
        raise ValueError(
            f"the module's output must be (B={batch}, C_out, ..., H={height}, W={width}), "
            f"but got {tuple(out.shape)}"
        )


def _attr(module: Any, name: str, given: Any, default: Any) -> Any:
    if given is not None:
        return given
    value = getattr(module, name, default)
    return default if value is None else value
