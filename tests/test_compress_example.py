"""examples/compress_mnist.py: the test set compressed, decoded, checked, compared."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from maskedconv import GatedPixelCNN, PixelCNN

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
pytest.importorskip("constriction", reason="the codec extra is not installed")
pytest.importorskip("PIL", reason="the examples extra is not installed")

import compress_mnist as cm  # noqa: E402
import mnist_common as mc  # noqa: E402
import mnist_data as md  # noqa: E402

REAL_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
HAVE_REAL = all((REAL_MNIST / f"{name}.gz").exists() for name in md.MNIST_FILES)
needs_mnist = pytest.mark.skipif(not HAVE_REAL, reason=f"real MNIST is not in {REAL_MNIST}")
DATA = ["--data-dir", str(REAL_MNIST), "--no-download"]


@needs_mnist
def test_a_saved_model_compresses_the_test_images_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    PixelCNN(1, 2, hidden_channels=8, num_layers=2, kernel_size=3).save_pretrained(
        tmp_path / "model"
    )
    out = tmp_path / "out"
    argv = [*DATA, "--model", str(tmp_path / "model"), "--images", "40", "--block-size", "16"]
    assert cm.main([*argv, "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "40/40 decoded exactly" in printed
    for name in ("maskedconv.codec", "PNG (Pillow", "gzip -9", "bz2 -9", "xz -9e"):
        assert f"| {name}" in printed, name
    results = json.loads((out / "results.json").read_text())
    assert results["decoded_exactly"] == results["images"] == 40
    assert results["bytes"] == (out / "test_images.mcz").stat().st_size
    # The file is the model's NLL, a 42-byte header, 3 block CRCs, a CRC and a word.
    assert results["bytes"] <= 1.005 * results["nll_bits"] / 8 + 42 + 12 + 4 + 8


@needs_mnist
def test_a_gated_model_and_one_trained_here_work_too(tmp_path: Path) -> None:
    GatedPixelCNN(1, 2, hidden_channels=8, num_layers=2, kernel_size=3).save_pretrained(
        tmp_path / "gated"
    )
    out = tmp_path / "out"
    assert (
        cm.main([*DATA, "--model", str(tmp_path / "gated"), "--images", "3", "--out-dir", str(out)])
        == 0
    )
    assert cm.main([*DATA, "--train-steps", "1", "--images", "3", "--out-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["decoded_exactly"] == 3
    # Trained on the examples' loop, the model is kept for --model; the same NLL again.
    assert (
        cm.main([*DATA, "--model", str(out / "model"), "--images", "3", "--out-dir", str(out)]) == 0
    )
    again = json.loads((out / "results.json").read_text())
    assert again["nll_bits"] == pytest.approx(results["nll_bits"], rel=1e-6)
    assert not (out / "train.ckpt.pt").exists()  # the loop's checkpoint, removed
    # Training again into the same folder would write over that model: refused.
    before = (out / "model" / "model.safetensors").read_bytes()
    assert cm.main([*DATA, "--train-steps", "1", "--images", "3", "--out-dir", str(out)]) == 2
    assert (out / "model" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--train-steps", "0"], "--train-steps must be >= 1"),
        (["--train-steps", "1", "--images", "0"], "--images must be >= 1"),
        (["--train-steps", "1", "--block-size", "0"], "--block-size must be >= 1"),
        (["--model", "/nonexistent"], "is not a folder written by save_pretrained"),
        ([], "one of the arguments --model --train-steps is required"),
    ],
)
def test_bad_flags_are_one_line_errors(
    flags: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cm.main(["--data-dir", "/nonexistent", *flags])
    assert exit_info.value.code == 2
    assert says in capsys.readouterr().err


def test_a_model_of_other_images_is_refused(tmp_path: Path) -> None:
    PixelCNN(3, 4, hidden_channels=12, num_layers=1, kernel_size=3).save_pretrained(tmp_path)
    with pytest.raises(mc.DataError, match="is not a binary MNIST model"):
        cm.load_model(tmp_path)
