"""One decoding step as a plain module, for ``torch.export`` and ONNX.

The evaluators keep Python state between steps (caches, the step index), which an
exported graph cannot hold. ``DecodeStep`` is the stateless step a decoder in another
language runs: the image decoded so far and the step's positions in, the head's
parameters there out. It is the ``FullForwardEvaluator``'s step: exact for any model
and schedule, and the cheap one where a schedule has few steps (2 for a model built with
``order="checkerboard"``, times its colour groups).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["DecodeStep"]


class DecodeStep(nn.Module):
    """``model``'s head parameters at a step's positions, from the image decoded so far.

    ``step(x, rows, cols)`` is ``model(x)[..., rows, cols]``: what
    ``Evaluator.params`` gives at a step whose positions are ``(rows, cols)``, when ``x``
    holds every value decoded before it (and, within a pixel, the earlier colour groups;
    later ones may hold anything). It has no state, so it exports with
    ``torch.export.export`` or ``torch.onnx.export(..., dynamo=True)`` with a dynamic
    batch, height, width and number of positions; see docs/contexts.md for a decoder's
    loop around it.

    Args:
        model: a model of integer images (``PixelCNN``, ``GatedPixelCNN``, or any module
            mapping ``(B, C, H, W)`` integers to parameters with the pixels last).

    Example:
        >>> model = PixelCNN(1, 2, hidden_channels=8, num_layers=2, order="checkerboard")
        >>> step = DecodeStep(model)
        >>> anchors = checkerboard((4, 4))[0]
        >>> step(torch.zeros(1, 1, 4, 4, dtype=torch.long), anchors.rows, anchors.cols).shape
        torch.Size([1, 1, 2, 8])
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        x: Tensor,
        rows: Tensor,
        cols: Tensor,
        labels: Tensor | None = None,
        cond: Tensor | None = None,
    ) -> Tensor:
        """The parameters at ``(rows, cols)``.

        Args:
            x: ``(B, C, H, W)`` int64 image decoded so far.
            rows: ``(n,)`` int64 rows of the step's positions.
            cols: ``(n,)`` int64 columns.
            labels: ``(B,)`` class labels, for a model built with ``num_classes``.
            cond: ``(B, M, h, w)`` map, for a model built with ``cond_channels``.

        Returns:
            ``(B, C, K, n)`` logits for a categorical head, ``(B, P, n)`` for the mixture.
        """
        given = {"labels": labels, "cond": cond}
        kwargs = {name: value for name, value in given.items() if value is not None}
        out: Tensor = self.model(x, **kwargs)
        return out[..., rows, cols]
