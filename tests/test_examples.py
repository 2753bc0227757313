"""The MNIST examples: data, checkpoints, resume, signals, torchrun (CPU, gloo)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

import maskedconv

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import files  # noqa: E402
import mnist_binary  # noqa: E402
import mnist_color  # noqa: E402
import mnist_common as mc  # noqa: E402
import mnist_data as md  # noqa: E402
import mnist_gray  # noqa: E402
import train  # noqa: E402

REAL_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
HAVE_REAL = all((REAL_MNIST / f"{name}.gz").exists() for name in md.MNIST_FILES)
TINY = [
    "--hidden-channels",
    "8",
    "--num-layers",
    "2",
    "--kernel-size",
    "3",
    "--batch-size",
    "16",
    "--eval-batch-size",
    "512",
    "--num-samples",
    "4",
    "--device",
    "cpu",
    "--no-download",
]


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_synthetic_mnist(folder: Path, n_train: int = 96, n_test: int = 40) -> None:
    """Tiny MNIST-format files: random strokes, so the examples have something to learn."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        for i in range(n):
            r, c = rng.integers(4, 20, size=2)
            images[i, r : r + 8, c : c + 3] = 255
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))


@pytest.fixture(scope="session")
def data_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Real MNIST from ../shared/data/mnist when present, tiny synthetic files otherwise."""
    if HAVE_REAL:
        return ["--data-dir", str(REAL_MNIST)]
    folder = tmp_path_factory.mktemp("mnist")
    write_synthetic_mnist(folder)
    return ["--data-dir", str(folder), "--no-verify"]


# ---------------------------------------------------------------------- data


def test_parse_idx_gzip_and_raw(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(md.parse_idx(idx_bytes(images)), images)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(images))
    assert np.array_equal(md._read_verified(tmp_path, "train-images-idx3-ubyte", None), images)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    sha = hashlib.sha256(idx_bytes(images)).hexdigest()
    assert np.array_equal(md._read_verified(tmp_path, "t10k-images-idx3-ubyte", sha), images)


def test_parse_idx_rejects_bad_files() -> None:
    with pytest.raises(mc.DataError, match="bad magic number"):
        md.parse_idx(b"\x00\x00\x0d\x03" + bytes(12))
    with pytest.raises(mc.DataError, match=r"IDX header says \(2, 2\) \(4 bytes\) but 3 follow"):
        md.parse_idx(bytes([0, 0, 8, 2]) + (2).to_bytes(4, "big") * 2 + bytes(3))


def test_checksum_mismatch_is_refused(tmp_path: Path) -> None:
    write_synthetic_mnist(tmp_path)
    with pytest.raises(
        mc.DataError, match=r"SHA-256 of the decompressed bytes is .* expected ba891046"
    ):
        md.load_mnist(tmp_path, download=False)


def test_missing_files_without_network_fail_with_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(md.urllib.request, "urlopen", offline)
    with pytest.raises(mc.DataError) as info:
        md.load_mnist(tmp_path / "nowhere")
    message = str(info.value)
    assert "\n" not in message
    assert f"is not in {tmp_path / 'nowhere'}. Put the four MNIST files" in message
    assert "download failed" in message and "no network" in message


def test_download_writes_verified_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "mirror"
    write_synthetic_mnist(source)
    hashes = {
        name: hashlib.sha256(gzip.decompress((source / f"{name}.gz").read_bytes())).hexdigest()
        for name in md.MNIST_FILES
    }
    monkeypatch.setattr(md, "MNIST_FILES", hashes)

    class Response(io.BytesIO):
        headers: ClassVar[dict[str, str]] = {}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def fake_urlopen(url: str, timeout: float):
        return Response((source / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(md.urllib.request, "urlopen", fake_urlopen)
    data = md.load_mnist(tmp_path / "data")
    assert data["train"].shape == (96, 28, 28) and data["test_labels"].shape == (40,)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(
        f"{n}.gz" for n in hashes
    )


@pytest.mark.skipif(not HAVE_REAL, reason="real MNIST not found in ../shared/data/mnist")
def test_real_mnist_loads_and_verifies() -> None:
    data = md.load_mnist(REAL_MNIST, download=False)
    assert data["train"].shape == (60000, 28, 28) and data["test"].shape == (10000, 28, 28)
    assert data["train"].dtype == np.uint8
    ones = md.binarize(data["test"]).mean()
    assert 0.1 < ones < 0.2  # about 13% of MNIST pixels are > 127.5


def test_binarize_threshold() -> None:
    assert md.binarize(np.array([0, 127, 128, 255], dtype=np.uint8)).tolist() == [0, 0, 1, 1]


def test_colorize_is_deterministic_and_well_formed() -> None:
    rng = np.random.default_rng(1)
    digits = (rng.random((50, 28, 28)) > 0.8).astype(np.uint8) * 255
    a, b, c = md.colorize(digits, seed=3), md.colorize(digits, seed=3), md.colorize(digits, seed=4)
    assert a.shape == (50, 28, 28, 3) and a.dtype == np.uint8 and a.max() <= 3
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    for image, digit in zip(a, digits, strict=True):
        fg = image[digit > 127.5]
        assert (fg == fg[0]).all()  # one colour per digit
        bg = np.unique(image[digit <= 127.5], axis=0)
        assert len(bg) > 1  # a textured, multi-colour background
        assert (np.abs(bg.astype(int) - fg[0]) >= 2).any(axis=1).all()  # the digit stands out


def test_pickle_reader_admits_arrays_only(tmp_path: Path) -> None:
    good = {"train": np.zeros((4, 28, 28, 1), np.uint8), "test": np.ones((2, 28, 28, 1), np.uint8)}
    path = tmp_path / "mnist.pkl"
    path.write_bytes(pickle.dumps(good))
    data = md.load_pickle(path)
    assert np.array_equal(data["test"], good["test"])

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"train": Evil(), "test": Evil()}))
    with pytest.raises(
        mc.DataError,
        match=r"refusing to load (posix|nt)\.system: this reader admits only numpy arrays",
    ):
        md.load_pickle(evil)
    wrong = tmp_path / "wrong.pkl"
    wrong.write_bytes(
        pickle.dumps({"train": np.zeros((4, 28, 28), np.uint8), "test": good["test"]})
    )
    with pytest.raises(mc.DataError, match="'train' must be a uint8 array"):
        md.load_pickle(wrong)


# ------------------------------------------------------------------ training


def run_binary(out: Path, data_args: list[str], *extra: str) -> int:
    return mc.run(mnist_binary.BINARY, "test", [*data_args, *TINY, "--out-dir", str(out), *extra])


def test_smoke_run_writes_every_output(tmp_path: Path, data_args: list[str]) -> None:
    assert run_binary(tmp_path, data_args, "--max-steps", "3") == 0
    for name in ("nll.png", "samples.png", "completion.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [p[0] for p in metrics["train"]] == [1, 2, 3]
    assert metrics["test"][-1]["step"] == 3 and metrics["test"][-1]["nats_per_dim"] > 0
    assert "test_nats_per_dim" in (tmp_path / "metrics.csv").read_text()
    ckpt = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["identity"]["model"]["hidden_channels"] == 8
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind
    final = mc.PixelCNN.from_pretrained(tmp_path / "model")
    assert final.config.to_dict() == ckpt["identity"]["model"]
    for name, value in final.state_dict().items():
        same = (
            torch.equal(value, ckpt["model"][name])
            if torch.is_tensor(value)
            else value == ckpt["model"][name]
        )
        assert same, name


def test_checkerboard_order_trains_and_is_refused_for_the_gated_model(
    tmp_path: Path, data_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_binary(tmp_path, data_args, "--max-steps", "2", "--order", "checkerboard") == 0
    final = mc.PixelCNN.from_pretrained(tmp_path / "model")
    assert final.config.order == "checkerboard"
    assert (tmp_path / "samples.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        run_binary(tmp_path / "g", data_args, "--order", "checkerboard", "--model", "gated")
    assert "--order checkerboard needs --model pixelcnn" in capsys.readouterr().err


def test_resume_continues_exactly(tmp_path: Path, data_args: list[str]) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_binary(straight, data_args, "--max-steps", "4") == 0
    assert run_binary(split, data_args, "--max-steps", "2") == 0
    assert run_binary(split, data_args, "--max-steps", "4", "--resume") == 0
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for name, value in a["model"].items():
        assert (
            torch.equal(value, b["model"][name])
            if torch.is_tensor(value)
            else value == b["model"][name]
        ), name
    assert a["train_curve"] == b["train_curve"]


def test_save_every_survives_a_crash_mid_epoch(
    tmp_path: Path, data_args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # --save-every 2, then a hard crash (not a signal) in step 3: the checkpoint of step 2
    # is there, and resuming it ends where a straight run ends.
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert run_binary(straight, data_args, "--max-steps", "4") == 0
    step = train.Trainer._step

    def crash_at_3(self: train.Trainer, *args: torch.Tensor | None) -> float:
        if self.state["step"] == 2:
            raise RuntimeError("the machine went down")
        return step(self, *args)

    monkeypatch.setattr(train.Trainer, "_step", crash_at_3)
    with pytest.raises(RuntimeError, match="went down"):
        run_binary(crashed, data_args, "--max-steps", "4", "--save-every", "2")
    assert files.load_checkpoint(crashed / "checkpoint.pt")["step"] == 2
    monkeypatch.setattr(train.Trainer, "_step", step)
    assert run_binary(crashed, data_args, "--max-steps", "4", "--resume") == 0
    a = files.load_checkpoint(straight / "checkpoint.pt")
    b = files.load_checkpoint(crashed / "checkpoint.pt")
    assert a["step"] == b["step"] == 4 and a["train_curve"] == b["train_curve"]
    for name, value in a["model"].items():
        same = torch.equal(value, b["model"][name]) if torch.is_tensor(value) else None
        assert same if same is not None else value == b["model"][name], name


def test_channels_last_and_autotune_change_the_speed_not_the_run(
    tmp_path: Path, data_args: list[str]
) -> None:
    plain, fast = tmp_path / "plain", tmp_path / "fast"
    assert run_binary(plain, data_args, "--max-steps", "3") == 0
    assert run_binary(fast, data_args, "--max-steps", "3", "--channels-last", "--autotune") == 0
    assert not maskedconv.set_conv_autotune(False)  # the run put the setting back
    a = json.loads((plain / "metrics.json").read_text())
    b = json.loads((fast / "metrics.json").read_text())
    # Same data, seed and maths: the losses agree up to float rounding.
    for (step_a, loss_a), (step_b, loss_b) in zip(a["train"], b["train"], strict=True):
        assert step_a == step_b and loss_b == pytest.approx(loss_a, rel=1e-4)
    assert b["test"][-1]["nats_per_dim"] == pytest.approx(a["test"][-1]["nats_per_dim"], rel=1e-4)


def test_the_allocator_keeps_freed_memory_as_in_the_benchmark() -> None:
    # glibc refuses a value out of range (mallopt returns 0): the settings must all take.
    expected = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None
    assert train.keep_freed_memory() is expected


def test_resume_from_another_config_is_refused(
    tmp_path: Path, data_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_binary(tmp_path, data_args, "--max-steps", "1") == 0
    code = mc.run(
        mnist_binary.BINARY,
        "test",
        [*data_args, *TINY, "--hidden-channels", "16", "--out-dir", str(tmp_path), "--resume"],
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "is from another configuration: hidden_channels=8 (this run: 16)" in err


def test_resume_without_checkpoint(
    tmp_path: Path, data_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_binary(tmp_path, data_args, "--resume") == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_color_example_smoke(tmp_path: Path, data_args: list[str]) -> None:
    code = mc.run(
        mnist_color.COLOR,
        "test",
        [
            *data_args,
            *TINY,
            "--hidden-channels",
            "12",
            "--out-dir",
            str(tmp_path),
            "--max-steps",
            "2",
        ],
    )
    assert code == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert (
        ckpt["identity"]["model"]["in_channels"] == 3 and ckpt["identity"]["model"]["levels"] == 4
    )
    assert (tmp_path / "completion.png").exists()


def test_color_example_with_the_mixture_head(tmp_path: Path, data_args: list[str]) -> None:
    args = [*data_args, *TINY, "--head", "dmol", "--num-mixtures", "2", "--out-dir", str(tmp_path)]
    assert mc.run(mnist_color.COLOR, "test", [*args, "--max-steps", "2"]) == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    model = ckpt["identity"]["model"]
    assert model["head"] == "dmol" and model["num_mixtures"] == 2
    assert model["color_groups"] is None  # the head's choice: one group, channels coupled
    assert mc.run(mnist_color.COLOR, "test", [*args, "--max-steps", "3", "--resume"]) == 0
    assert (tmp_path / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_0_1_checkpoint_identity_still_resumes(tmp_path: Path) -> None:
    current = mc.run_identity(
        mnist_binary.BINARY,
        mc.make_parser(mnist_binary.BINARY, "t").parse_args([]),
        mc.PixelCNN(1, 2).config.to_dict(),
        1,
    )
    saved = {**current, "model": {k: current["model"][k] for k in list(current["model"])[:8]}}
    mc.check_identity(saved, current, tmp_path / "checkpoint.pt")  # the 0.1 fields only
    saved["model"]["hidden_channels"] = 32
    with pytest.raises(mc.DataError, match="hidden_channels=32 \\(this run: 64\\)"):
        mc.check_identity(saved, current, tmp_path / "checkpoint.pt")


def test_trains_from_a_course_pickle(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = {
        "train": rng.integers(0, 256, (64, 28, 28, 1), dtype=np.uint8),
        "test": rng.integers(0, 256, (16, 28, 28, 1), dtype=np.uint8),
    }
    path = tmp_path / "mnist.pkl"
    path.write_bytes(pickle.dumps(data))
    code = mc.run(
        mnist_binary.BINARY,
        "test",
        ["--pickle", str(path), *TINY, "--out-dir", str(tmp_path / "o"), "--max-steps", "1"],
    )
    assert code == 0


def test_bad_flags_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        mc.run(mnist_binary.BINARY, "test", ["--max-steps", "0"])
    assert "--max-steps must be >= 1, but got 0" in capsys.readouterr().err


def script_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return env


def test_ctrl_c_checkpoints_and_exits_cleanly(tmp_path: Path, data_args: list[str]) -> None:
    cmd = [
        sys.executable,
        str(EXAMPLES / "mnist_binary.py"),
        *data_args,
        *TINY,
        "--out-dir",
        str(tmp_path),
        "--epochs",
        "1000",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=script_env()
    )
    assert proc.stdout is not None
    header = proc.stdout.readline()  # printed once the data is loaded, before training
    assert "binary MNIST" in header
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGINT" in out
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] >= 1
    assert not (tmp_path / "samples.png").exists()  # stopped: no sampling, just the checkpoint


def test_torchrun_two_processes_gloo(tmp_path: Path, data_args: list[str]) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(EXAMPLES / "mnist_binary.py"),
        *data_args,
        *TINY,
        "--out-dir",
        str(tmp_path),
        "--max-steps",
        "3",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=script_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) on cpu" in result.stdout
    assert "parameters identical across 2 ranks" in result.stdout
    assert result.stdout.count("step 3: test NLL") == 1  # only rank 0 reports and writes
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.pt",
        "completion.png",
        "metrics.csv",
        "metrics.json",
        "model",
        "nll.png",
        "samples.png",
    ]
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["identity"]["processes"] == 2


def test_gated_conditional_binary_smoke(tmp_path: Path, data_args: list[str]) -> None:
    extra = ["--model", "gated", "--conditional", "--num-samples", "20", "--max-steps", "2"]
    assert run_binary(tmp_path, data_args, *extra) == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["identity"]["architecture"] == "gated"
    assert ckpt["identity"]["model"]["num_classes"] == 10
    model = mc.GatedPixelCNN.from_config(ckpt["identity"]["model"])
    model.load_state_dict(ckpt["model"])  # the checkpoint holds a gated, conditional model
    assert (tmp_path / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Resuming as the plain model is refused, naming the difference.
    code = run_binary(tmp_path, data_args, "--conditional", "--max-steps", "3", "--resume")
    assert code == 2


def test_conditional_grid_has_a_row_per_class(monkeypatch: pytest.MonkeyPatch) -> None:
    grids = []
    monkeypatch.setattr(
        mc, "save_grid", lambda path, images, levels, rows, title: grids.append((images, rows))
    )
    model = mc.GatedPixelCNN(1, 2, hidden_channels=4, num_layers=1, kernel_size=3, num_classes=10)
    args = mc.make_parser(mnist_binary.BINARY, "t").parse_args(
        ["--conditional", "--num-samples", "30"]
    )
    test = torch.zeros(10, 1, 28, 28, dtype=torch.uint8)
    mc.write_images(
        model,
        mc.Split(test, torch.arange(10)),
        mnist_binary.BINARY,
        args,
        torch.device("cpu"),
        Path("."),
    )
    images, rows = grids[0]
    assert images.shape[0] == 30 and rows == 10  # 3 per class, row r = class r


def test_gray_example_with_the_mixture_head(tmp_path: Path, data_args: list[str]) -> None:
    args = [*data_args, *TINY, "--head", "dmol", "--num-mixtures", "2", "--out-dir", str(tmp_path)]
    assert mc.run(mnist_gray.GRAY, "test", [*args, "--max-steps", "2", "--num-samples", "4"]) == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert (
        ckpt["identity"]["architecture"] == "gated" and ckpt["identity"]["model"]["levels"] == 256
    )


def test_color_groups_flag(
    tmp_path: Path, data_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    args = [*data_args, *TINY, "--hidden-channels", "12", "--out-dir", str(tmp_path)]
    assert mc.run(mnist_color.COLOR, "t", [*args, "--color-groups", "1", "--max-steps", "1"]) == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["identity"]["model"]["color_groups"] == 1
    with pytest.raises(SystemExit):
        mc.run(mnist_color.COLOR, "t", [*args, "--color-groups", "2"])
    assert "--color-groups must divide the 3 channels, but got 2" in capsys.readouterr().err


def test_conditional_needs_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mnist.pkl"
    data = {"train": np.zeros((4, 28, 28, 1), np.uint8), "test": np.zeros((4, 28, 28, 1), np.uint8)}
    path.write_bytes(pickle.dumps(data))
    code = mc.run(
        mnist_binary.BINARY,
        "t",
        ["--pickle", str(path), "--conditional", "--out-dir", str(tmp_path)],
    )
    assert code == 2
    assert "the course's pickles carry no class labels" in capsys.readouterr().err


# --- reliability findings of the release-readiness issue ----------------------------------


def test_an_unwritable_out_dir_is_found_before_any_work(
    tmp_path: Path, data_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert run_binary(blocker / "run", data_args) == 2
    err = capsys.readouterr().err
    assert f"--out-dir {blocker / 'run'} cannot be written" in err and "Traceback" not in err


def test_stale_temporaries_are_cleared_at_start(tmp_path: Path, data_args: list[str]) -> None:
    stale = tmp_path / ".checkpoint.pt.x1y2z3.tmp"
    tmp_path.mkdir(exist_ok=True)
    stale.write_bytes(b"\0" * 1000)
    assert run_binary(tmp_path, data_args, "--max-steps", "1") == 0
    assert not stale.exists() and not list(tmp_path.glob(".*.tmp"))


def test_resume_applies_a_new_learning_rate_and_says_so(
    tmp_path: Path, data_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_binary(tmp_path, data_args, "--max-steps", "1") == 0
    assert run_binary(tmp_path, data_args, "--max-steps", "2", "--resume", "--lr", "3e-4") == 0
    assert "--resume: learning rate changed from 0.001 to 0.0003" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == 3e-4


def test_a_flipped_byte_in_a_checkpoint_is_found_on_resume(
    tmp_path: Path, data_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_binary(tmp_path, data_args, "--max-steps", "1") == 0
    path = tmp_path / "checkpoint.pt"
    weight = torch.load(path, weights_only=True)["model"]["trunk.3.conv.weight"]
    raw = bytearray(path.read_bytes())
    at = raw.find(weight.numpy().tobytes())
    assert at > 0
    raw[at + 5] ^= 0x10  # one bit of one weight: the zip still unpacks
    path.write_bytes(bytes(raw))
    capsys.readouterr()
    assert run_binary(tmp_path, data_args, "--max-steps", "2", "--resume") == 2
    err = capsys.readouterr().err
    assert "is corrupt: its contents do not match the SHA-256 saved with them" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is not a readable checkpoint"),
        ("half", "is not a readable checkpoint"),
        ("foreign", "is not a checkpoint of this example (it lacks 'identity'"),
        ("list", "is not a checkpoint of this example (it holds a list)"),
    ],
)
def test_truncated_empty_or_foreign_checkpoints_are_one_line_errors(
    tmp_path: Path,
    data_args: list[str],
    capsys: pytest.CaptureFixture[str],
    content: bytes | str,
    message: str,
) -> None:
    assert run_binary(tmp_path, data_args, "--max-steps", "1") == 0
    path = tmp_path / "checkpoint.pt"
    if content == "half":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif content == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    elif content == "list":
        torch.save([1, 2], path)
    else:
        path.write_bytes(content)  # type: ignore[arg-type]
    capsys.readouterr()
    assert run_binary(tmp_path, data_args, "--max-steps", "2", "--resume") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_damaged_gzip_and_pickles_are_one_line_errors(tmp_path: Path) -> None:
    # A single-byte corruption of a gzip file fails its checks or the SHA-256 (a
    # DataError), or hits a byte nothing reads (the header's time stamp): never zlib.error.
    array = np.arange(28 * 28 * 3, dtype=np.uint8).reshape(3, 28, 28)
    good = gzip.compress(idx_bytes(array))
    name = "train-images-idx3-ubyte"
    refused = 0
    positions = range(0, len(good), max(1, len(good) // 48))
    for at in positions:
        bad = bytearray(good)
        bad[at] ^= 0xFF
        (tmp_path / f"{name}.gz").write_bytes(bytes(bad))
        try:
            read = md._read_verified(tmp_path, name, hashlib.sha256(idx_bytes(array)).hexdigest())
        except mc.DataError:
            refused += 1
            continue
        assert np.array_equal(read, array), at
    assert refused > len(positions) // 2
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    with pytest.raises(mc.DataError, match="is empty or truncated"):
        md.load_pickle(empty)
    # A pickle declaring a 1 TiB array: shape (2**40, 1, 1, 1), one byte of data.
    arrays = {"train": np.zeros((1, 1, 1, 1), np.uint8), "test": np.zeros((1, 1, 1, 1), np.uint8)}
    raw = pickle.dumps(arrays, protocol=3)
    shape, huge_shape = (
        b"(K\x01K\x01K\x01K\x01t",
        b"(\x8a\x06\x00\x00\x00\x00\x00\x01K\x01K\x01K\x01t",
    )
    assert shape in raw
    (tmp_path / "huge.pkl").write_bytes(raw.replace(shape, huge_shape, 1))
    with pytest.raises(mc.DataError, match="is not a readable pickle"):
        md.load_pickle(tmp_path / "huge.pkl")


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, data_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_binary(tmp_path, data_args, "--max-steps", "1") == 0
    path = tmp_path / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    first = next(k for k in ckpt["model"] if k.endswith("weight"))
    ckpt["model"][first] = torch.full_like(ckpt["model"][first], float("nan"))
    files.save_checkpoint(path, {k: v for k, v in ckpt.items() if k != "digest"})
    before = path.read_bytes()
    assert run_binary(tmp_path, data_args, "--max-steps", "3", "--resume") == 2
    assert "at step 2: log_prob is not finite" in capsys.readouterr().err
    assert path.read_bytes() == before  # nothing written over it


def test_a_rerun_into_an_earlier_runs_out_dir_is_refused(
    tmp_path: Path, data_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_binary(tmp_path, data_args, "--max-steps", "1") == 0
    before = (tmp_path / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert run_binary(tmp_path, data_args, "--max-steps", "1") == 2
    assert (
        "holds a checkpoint of an earlier run: continue it with --resume" in capsys.readouterr().err
    )
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--clip", "-1"], "--clip must be a finite number > 0, but got -1.0"),
        (["--clip", "0"], "--clip must be a finite number > 0, but got 0.0"),
        (["--lr", "nan"], "--lr must be a finite number > 0, but got nan"),
        (["--kernel-size", "4"], "the model flags do not make a model: kernel_size must be odd"),
        (["--kernel-size", "1"], "the model flags do not make a model: kernel_size must be >= 3"),
        (["--num-layers", "0"], "num_layers must be an int >= 1, but got 0"),
        (["--hidden-channels", "0"], "hidden_channels must be an int >= 1, but got 0"),
        (["--threads", "0"], "--threads must be >= 1, but got 0"),
    ],
)
def test_every_flag_is_checked_up_front(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Issue 20, item 10: these trained by gradient ascent, never trained, or gave tracebacks.
    with pytest.raises(SystemExit):
        mc.run(mnist_binary.BINARY, "test", flags)
    assert message in capsys.readouterr().err


def test_colour_flags_that_do_not_split_into_groups_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        mc.run(mnist_color.COLOR, "test", ["--hidden-channels", "8"])
    assert "hidden_channels must be divisible by color_groups=3" in capsys.readouterr().err


def test_a_data_dir_that_is_a_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit):
        mc.run(mnist_binary.BINARY, "test", ["--data-dir", str(tmp_path / "f")])
    assert "--data-dir must be a directory" in capsys.readouterr().err


def test_a_gzip_bomb_is_stopped_before_it_inflates(tmp_path: Path) -> None:
    # Issue 20, item 11: a 2 MB file inflated to 2 GiB before the checksum refused it.
    import gzip

    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        chunk = b"\0" * (1 << 20)
        for _ in range(md._LARGEST_IDX // len(chunk) + 2):
            f.write(chunk)
    with pytest.raises(mc.DataError, match="inflates to more than the largest MNIST file"):
        md._read_verified(tmp_path, "train-images-idx3-ubyte", None)


def test_threads_flag_sets_and_restores(tmp_path: Path, data_args: list[str]) -> None:
    before = torch.get_num_threads()
    assert run_binary(tmp_path, data_args, "--max-steps", "1", "--threads", "1") == 0
    assert torch.get_num_threads() == before
