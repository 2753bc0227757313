"""save_pretrained / from_pretrained: config.json + model.safetensors, never a pickle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pixelcnn_models import perturb_, random_inputs
from safetensors.torch import load_file, save_file

import maskedconv
from maskedconv import Categorical, GatedPixelCNN, PixelCNN

MODELS: dict[str, Any] = {
    "pixelcnn": lambda: PixelCNN(1, 2, hidden_channels=8, num_layers=2),
    "pixelcnn-color-dmol-bottleneck": lambda: PixelCNN(
        3, 16, hidden_channels=12, num_layers=3, head="dmol", num_mixtures=2, block="bottleneck"
    ),
    "pixelcnn-embedding-conditional": lambda: PixelCNN(
        1, 32, hidden_channels=8, num_layers=2, input="embedding", num_classes=3
    ),
    "gated-color-interleaved": lambda: GatedPixelCNN(
        3, 4, hidden_channels=12, num_layers=2, group_layout="interleaved"
    ),
    "gated-embedding-cond": lambda: GatedPixelCNN(
        1, 16, hidden_channels=8, num_layers=2, input="embedding", num_classes=2, cond_channels=3
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_gives_the_same_model(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = MODELS[name]()
    perturb_(model, 0.1)  # conditioning biases start at zero: make them matter
    assert model.save_pretrained(tmp_path / "m") == tmp_path / "m"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    document = json.loads((tmp_path / "m" / "config.json").read_text())
    assert document["model_type"] == type(model).__name__
    assert document["maskedconv_version"] == maskedconv.__version__
    # Loading never unpickles: it works with pickle-based loading switched off.
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    loaded = type(model).from_pretrained(tmp_path / "m")
    assert not loaded.training and loaded.config == model.config
    model.eval()
    inputs = random_inputs(model, 5, 6, cond_size=(3, 3))
    with torch.no_grad():
        assert torch.equal(loaded(**inputs), model(**inputs))
        assert torch.equal(loaded.log_prob(**inputs), model.log_prob(**inputs))


def test_dtype_is_kept_and_the_directory_is_overwritten_whole(tmp_path: Path) -> None:
    model = PixelCNN(1, 2, hidden_channels=8, num_layers=2).double()
    model.save_pretrained(tmp_path)
    assert next(PixelCNN.from_pretrained(tmp_path).parameters()).dtype == torch.float64
    PixelCNN(1, 4, hidden_channels=8, num_layers=2).save_pretrained(tmp_path)
    assert PixelCNN.from_pretrained(tmp_path).levels == 4
    assert not list(tmp_path.glob(".*.tmp"))


def _saved(tmp_path: Path) -> Path:
    PixelCNN(1, 2, hidden_channels=8, num_layers=2).save_pretrained(tmp_path)
    return tmp_path


def _edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "config.json"
    document = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            document.pop(key)
        else:
            document[key] = value
    path.write_text(json.dumps(document))


def test_a_newer_release_series_is_refused(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    _edit_config(folder, maskedconv_version="0.3.0")
    with pytest.raises(ValueError, match=r"written by maskedconv 0\.3\.0, a newer release series"):
        PixelCNN.from_pretrained(folder)
    _edit_config(folder, maskedconv_version="1.0.0")
    with pytest.raises(ValueError, match=r"upgrade maskedconv to load it"):
        PixelCNN.from_pretrained(folder)
    _edit_config(folder, maskedconv_version="0.2.7")  # same series: fine
    PixelCNN.from_pretrained(folder)
    _edit_config(folder, maskedconv_version=None)
    with pytest.raises(ValueError, match="has no maskedconv_version"):
        PixelCNN.from_pretrained(folder)


def test_unknown_keys_another_class_and_bad_values_are_refused(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    _edit_config(folder, attention_heads=4)
    with pytest.raises(
        ValueError, match=r"config keys this maskedconv .* does not know: attention_heads"
    ):
        PixelCNN.from_pretrained(folder)
    _edit_config(folder, attention_heads=None)
    with pytest.raises(
        ValueError,
        match=r"describes a PixelCNN, not a GatedPixelCNN: load it with PixelCNN\.from_pretrained",
    ):
        GatedPixelCNN.from_pretrained(folder)
    _edit_config(folder, kernel_size=4)
    with pytest.raises(ValueError, match=r"config\.json: kernel_size must be odd"):
        PixelCNN.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        PixelCNN.from_pretrained(folder)


def test_missing_files_and_mismatched_tensors_are_named(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    del tensors["trunk.3.conv.bias"]
    tensors["trunk.0.conv.weight"] = torch.zeros(8, 1, 5, 5)
    tensors["extra.weight"] = torch.zeros(1)
    save_file(tensors, weights)
    with pytest.raises(ValueError) as info:
        PixelCNN.from_pretrained(folder)
    message = str(info.value)
    assert "missing trunk.3.conv.bias" in message
    assert "unexpected extra.weight" in message
    assert "trunk.0.conv.weight has shape (8, 1, 5, 5), the config gives (8, 1, 7, 7)" in message
    weights.write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        PixelCNN.from_pretrained(folder)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="the weights are missing"):
        PixelCNN.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="not a directory written by save_pretrained"):
        PixelCNN.from_pretrained(tmp_path / "nowhere")


def test_a_custom_head_cannot_be_saved_by_name(tmp_path: Path) -> None:
    class MyHead(Categorical):
        pass

    model = PixelCNN(1, 2, hidden_channels=8, num_layers=2, head=MyHead(2))
    with pytest.raises(TypeError, match="a custom head or block cannot be saved by name"):
        model.save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
