"""torch.compile(fullgraph=True) and torch.export of every model equal eager."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from pixelcnn_models import perturb_, random_inputs

from maskedconv import GatedPixelCNN, PixelCNN

MODELS: dict[str, Any] = {
    "pixelcnn": lambda: PixelCNN(1, 2, hidden_channels=8, num_layers=2, kernel_size=3),
    "pixelcnn-color-dmol-embedding": lambda: PixelCNN(
        3, 8, hidden_channels=12, num_layers=2, kernel_size=3, head="dmol", input="embedding"
    ),
    "gated-color-conditional": lambda: GatedPixelCNN(
        3, 4, hidden_channels=12, num_layers=2, kernel_size=3, num_classes=3, cond_channels=2
    ),
}


def _model_and_inputs(name: str) -> tuple[Any, tuple[torch.Tensor, ...], dict[str, Any]]:
    torch.manual_seed(0)
    model = perturb_(MODELS[name]().eval(), 0.05)  # conditioning starts at zero
    kwargs: dict[str, Any] = random_inputs(model, 6, 5)
    return model, (kwargs.pop("x"),), kwargs


@pytest.mark.parametrize("name", list(MODELS))
def test_compile_fullgraph_equals_eager(name: str) -> None:
    torch._dynamo.reset()
    model, args, kwargs = _model_and_inputs(name)
    with torch.no_grad():
        eager_out, eager_lp = model(*args, **kwargs), model.log_prob(*args, **kwargs)
        forward = torch.compile(model, fullgraph=True)
        log_prob = torch.compile(model.log_prob, fullgraph=True)
        torch.testing.assert_close(forward(*args, **kwargs), eager_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(log_prob(*args, **kwargs), eager_lp, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_export_round_trips(name: str) -> None:
    model, args, kwargs = _model_and_inputs(name)
    with torch.no_grad():
        eager = model(*args, **kwargs)
    program = torch.export.export(model, args, kwargs)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    with torch.no_grad():
        torch.testing.assert_close(program.module()(*args, **kwargs), eager)
        torch.testing.assert_close(loaded(*args, **kwargs), eager)
        # The exported graph is not tied to the example's values.
        other = torch.randint(0, model.levels, args[0].shape)
        torch.testing.assert_close(loaded(other, **kwargs), model(other, **kwargs))


def test_jit_script_is_not_supported_and_says_what_to_use() -> None:
    model = PixelCNN(1, 2, hidden_channels=8, num_layers=2)
    with pytest.raises(Exception, match=r"torch\.jit\.script is not supported"):
        torch.jit.script(model)
