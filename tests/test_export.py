"""Export: ``torch.export`` and ONNX (``torch.onnx.export(..., dynamo=True)``, run under
onnxruntime) of MaskedConv2d with every mask type, of each model's forward with a
dynamic height and width, and of one decoding step; outputs equal to eager within 1e-5
at two image sizes. Skipped where the ``export`` extra is not installed."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from pixelcnn_models import perturb_
from test_cached_step import decode_loop

from maskedconv import (
    CachedDecodeStep,
    DecodeStep,
    GatedPixelCNN,
    IncrementalEvaluator,
    MaskedConv2d,
    PixelCNN,
    checkerboard,
)

ort = pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is not installed")
pytest.importorskip("onnxscript", reason="the export extra (onnxscript) is not installed")
pytest.importorskip("onnx", reason="the export extra (onnx) is not installed")

SIZES = [(7, 9), (12, 5)]  # the example is exported at the first, run at both


def _session(module: torch.nn.Module, args: tuple[Any, ...], dynamic: tuple[Any, ...]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own notes (axis names, torchvision)
        program = torch.onnx.export(
            module, args, dynamo=True, dynamic_shapes=dynamic, verbose=False, report=False
        )
    assert program is not None
    return ort.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )


def _run(session: Any, *inputs: torch.Tensor) -> torch.Tensor:
    names = [i.name for i in session.get_inputs()]
    feed = {name: t.numpy() for name, t in zip(names, inputs, strict=True)}
    return torch.from_numpy(session.run(None, feed)[0])


IMAGE = {0: "batch", 2: "height", 3: "width"}

CONVS = [
    ("A", dict(mask_type="A")),
    ("B", dict(mask_type="B")),
    ("A G3", dict(mask_type="A", color_groups=3)),
    ("B uneven", dict(mask_type="B", color_groups=[1, 2])),
    ("checkerboard", dict(mask_type="checkerboard")),
    ("checkerboard G3", dict(mask_type="checkerboard", color_groups=3)),
    ("group checkerboard G3", dict(mask_type="group-checkerboard", color_groups=3)),
    ("dilated", dict(mask_type="B", dilation=2)),
]


@pytest.mark.parametrize(("name", "options"), CONVS, ids=[n for n, _ in CONVS])
def test_masked_conv_exports_with_dynamic_size(name, options) -> None:
    torch.manual_seed(0)
    conv = MaskedConv2d(3, 6, 5, **options).eval()
    example = torch.randn(2, 3, *SIZES[0])
    exported = torch.export.export(
        conv, (example,), dynamic_shapes=({2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO},)
    )
    session = _session(conv, (example,), (IMAGE,))
    for height, width in SIZES:
        x = torch.randn(2, 3, height, width)
        with torch.no_grad():
            eager = conv(x)
            assert torch.allclose(exported.module()(x), eager, atol=1e-5)
        assert torch.allclose(_run(session, x), eager, atol=1e-5)


def _models() -> list[tuple[str, torch.nn.Module, dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    labels = torch.tensor([0, 2])
    return [
        ("pixelcnn", PixelCNN(1, 2, hidden_channels=16, num_layers=3), {}),
        ("checkerboard", PixelCNN(3, 4, hidden_channels=12, num_layers=2, order="checkerboard"), {}),
        ("group checkerboard",
         PixelCNN(3, 4, hidden_channels=12, num_layers=2, order="group-checkerboard"), {}),
        ("dmol", PixelCNN(3, 16, hidden_channels=12, num_layers=2, head="dmol"), {}),
        ("gated labels", GatedPixelCNN(3, 4, hidden_channels=12, num_layers=2, num_classes=3),
         {"labels": labels}),
    ]  # fmt: skip


@pytest.mark.parametrize("index", range(5), ids=[n for n, _, _ in _models()])
def test_model_forward_exports_with_dynamic_size(index) -> None:
    name, model, kwargs = _models()[index]
    model = perturb_(model, 0.1).eval()
    c, k = model.in_channels, model.levels
    example = torch.randint(0, k, (2, c, *SIZES[0]))
    args = (example, *kwargs.values())
    dynamic = (IMAGE, *({0: "batch"} for _ in kwargs))
    session = _session(model, args, dynamic)
    auto = torch.export.Dim.AUTO
    exported = torch.export.export(
        model, args, dynamic_shapes=({0: auto, 2: auto, 3: auto}, *({0: auto} for _ in kwargs))
    )
    for height, width in SIZES:
        x = torch.randint(0, k, (2, c, height, width))
        with torch.no_grad():
            eager = model(x, **kwargs)
            assert torch.allclose(exported.module()(x, *kwargs.values()), eager, atol=1e-5)
        assert torch.allclose(_run(session, x, *kwargs.values()), eager, atol=1e-5), name


def test_decode_step_exports_and_decodes_like_the_evaluator() -> None:
    """A decoder's loop around the exported step (as a C++ one would run it): every step of
    the checkerboard schedule, group by group, gives the evaluator's parameters."""
    torch.manual_seed(0)
    model = perturb_(PixelCNN(3, 4, hidden_channels=12, num_layers=2, order="checkerboard"), 0.1)
    model.eval()
    step = DecodeStep(model)
    at = checkerboard(SIZES[0])[1]
    example = torch.randint(0, 4, (2, 3, *SIZES[0]))
    session = _session(step, (example, at.rows, at.cols), (IMAGE, {0: "n"}, {0: "n"}))
    for height, width in SIZES:
        target = torch.randint(0, 4, (2, 3, height, width))
        decoded = torch.zeros_like(target)
        ev = IncrementalEvaluator(model, 2, (height, width))
        with torch.no_grad():
            while not ev.done:
                at = ev.schedule[ev.step]
                values = decoded[:, :, at.rows, at.cols]
                for chans in ev.groups:
                    params = _run(session, decoded, at.rows, at.cols)  # (B, C, K, n)
                    assert torch.allclose(params, ev.params(values), atol=1e-5)
                    values[:, chans] = target[:, chans][:, :, at.rows, at.cols]
                    decoded[:, :, at.rows, at.cols] = values
                ev.advance(values)
        assert torch.equal(decoded, target)


def test_decode_step_is_the_forward_at_positions() -> None:
    model = PixelCNN(1, 2, hidden_channels=8, num_layers=2, num_classes=2).eval()
    x = torch.randint(0, 2, (2, 1, 5, 6))
    labels = torch.tensor([1, 0])
    rows, cols = torch.tensor([0, 4, 2]), torch.tensor([5, 0, 3])
    with torch.no_grad():
        expected = model(x, labels=labels)[..., rows, cols]
        assert torch.equal(DecodeStep(model)(x, rows, cols, labels=labels), expected)


def test_cached_decode_step_exports_and_decodes_like_the_evaluator() -> None:
    """The incremental step with its caches as inputs and outputs, exported once per image
    size with a dynamic number of positions: a decoder's loop around the ONNX graph and
    around the ``torch.export`` program, every wavefront step group by group, gives the
    evaluator's parameters (1e-5) at both sizes."""
    torch.manual_seed(0)
    model = perturb_(PixelCNN(3, 4, hidden_channels=12, num_layers=3), 0.1).eval()
    for height, width in SIZES:
        step = CachedDecodeStep(model, 2, (height, width))
        caches = step.initial_caches()
        # Example positions of two sizes (m, n >= 2: a size of 1 would be taken as fixed).
        last = (
            torch.zeros(2, 3, 3, dtype=torch.long),
            torch.tensor([0, 1, 2]),
            torch.tensor([4, 0, 1]),
        )
        now = (torch.zeros(2, 3, 2, dtype=torch.long), torch.tensor([3, 4]), torch.tensor([1, 2]))
        m, n = torch.export.Dim("m", min=1), torch.export.Dim("n", min=1)
        dims = ({2: m}, {0: m}, {0: m}, {2: n}, {0: n}, {0: n})
        args = (*last, *now, *caches)
        exported = torch.export.export(
            step, args, dynamic_shapes=(*dims, tuple({} for _ in caches))
        ).module()
        session = _session(step, args, (*dims, tuple({} for _ in caches)))
        names = [i.name for i in session.get_inputs()]

        def onnx_step(
            *inputs: torch.Tensor, session: Any = session, names: list[str] = names
        ) -> list[torch.Tensor]:
            feed = {name: t.numpy() for name, t in zip(names, inputs, strict=True)}
            return [torch.from_numpy(out) for out in session.run(None, feed)]

        target = torch.randint(0, 4, (2, 3, height, width))
        for run in (onnx_step, exported):
            assert decode_loop(run, model, target, "wavefront", atol=1e-5) > 0
