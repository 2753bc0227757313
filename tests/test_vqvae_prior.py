"""The VQ-VAE prior example (examples/vqvae_prior.py) and the prior's maths."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from example_stops import StopAtPoll
from pixelcnn_models import perturb_

from maskedconv import GatedPixelCNN, IncrementalEvaluator, PixelCNN, receptive_field

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
pytest.importorskip("vector_quantize_pytorch", reason="the examples extra is not installed")

import files  # noqa: E402
import mnist_data as md  # noqa: E402
import vqvae_common as vc  # noqa: E402
import vqvae_prior as vp  # noqa: E402

REAL_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
HAVE_REAL = all((REAL_MNIST / f"{name}.gz").exists() for name in md.MNIST_FILES)
needs_mnist = pytest.mark.skipif(not HAVE_REAL, reason=f"real MNIST is not in {REAL_MNIST}")
TINY = [
    "--data-dir",
    str(REAL_MNIST),
    "--no-download",
    "--device",
    "cpu",
    "--vq-channels",
    "8",
    "--code-dim",
    "8",
    "--codebook-size",
    "16",
    "--prior-channels",
    "8",
    "--prior-layers",
    "2",
    "--batch-size",
    "32",
    "--eval-batch-size",
    "2000",
    "--samples-per-class",
    "2",
    "--max-steps",
    "3",
]
OUTPUTS = ("samples.png", "reconstructions.png", "curves.png", "metrics.json", "models.pt")


def all_maps(k: int, h: int, w: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(k), repeat=h * w))).view(-1, 1, h, w)


@pytest.mark.parametrize("bottom", [False, True], ids=["top prior", "bottom prior (cond=)"])
def test_the_code_prior_is_normalised(bottom: bool) -> None:
    # Every 1x2 map of K = 7 codes, for each class (and each top map given as cond=):
    # the probabilities sum to one.
    torch.manual_seed(0)
    k = 7
    prior = GatedPixelCNN(
        1,
        k,
        input="embedding",
        num_classes=3,
        cond_channels=4 if bottom else None,
        hidden_channels=8,
        num_layers=2,
        kernel_size=3,
    ).double()
    perturb_(prior, 0.3)  # learned biases start at zero: make them matter
    maps = all_maps(k, 1, 2)
    for label in range(3):
        labels = torch.full((len(maps),), label)
        cond = torch.randn(1, 4, 1, 1, dtype=torch.float64).expand(len(maps), -1, -1, -1)
        lp = prior.log_prob(maps, labels=labels, cond=cond if bottom else None)
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-10)
        assert lp.std() > 0.1  # not the uniform distribution


def test_the_default_prior_sees_every_earlier_code_of_a_7x7_map() -> None:
    # The default depth and kernel (the width does not change what can be seen; at 16
    # no ReLU silences a path at the measured input).
    torch.manual_seed(0)
    args = vc.make_parser(vp.PRIOR, "").parse_args(["--prior-channels", "16"])
    prior = vc.make_prior(vc.VQVAEConfig(codebook_size=8), 0, args)
    for i in range(7):
        for j in range(7):
            seen = receptive_field(prior, (1, 7, 7), (i, j), labels=torch.zeros(1).long())[0]
            earlier = torch.arange(49).view(7, 7) < i * 7 + j
            assert torch.equal(seen, earlier), (i, j)


def test_the_bottom_nll_conditions_each_map_on_its_own_top_map() -> None:
    torch.manual_seed(0)
    prior = GatedPixelCNN(
        1, 6, input="embedding", num_classes=2, cond_channels=3, hidden_channels=8, num_layers=2
    )
    perturb_(prior, 0.3)  # conditioning starts at zero: make it matter
    codebook = torch.randn(6, 3)
    bottoms, tops = torch.randint(0, 6, (7, 4, 4)), torch.randint(0, 6, (7, 2, 2))
    labels = torch.randint(0, 2, (7,))

    def cond(top: torch.Tensor) -> torch.Tensor:
        return codebook[top.long()].permute(0, 3, 1, 2)

    with torch.no_grad():
        lp = prior.log_prob(bottoms[:, None], labels=labels, cond=cond(tops))
    got = vc.prior_nll(prior, bottoms, labels, tops, cond, 3, torch.device("cpu"))
    assert got == pytest.approx(-lp.mean().item() / math.log(2), rel=1e-6)
    shuffled = vc.prior_nll(prior, bottoms, labels, tops.roll(1, 0), cond, 3, torch.device("cpu"))
    assert shuffled != pytest.approx(got, rel=1e-3)  # the top maps matter


def _main(argv: list[str]) -> int:
    return vc.run(vp.PRIOR, "", argv)


def _run(out: Path, *extra: str) -> int:
    return _main([*TINY, "--out-dir", str(out), *extra])


def _models(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)  # type: ignore[no-any-return]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@needs_mnist
def test_stopped_in_each_stage_and_resumed_equals_a_straight_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert _run(straight) == 0
    for name in OUTPUTS:
        assert (straight / name).stat().st_size > 0, name
    assert (straight / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()

    # Stopped at step 2 of stage 1 (3 steps each): no codes, no prior, no outputs yet.
    monkeypatch.setattr(vc, "StopFlag", lambda: StopAtPoll(2))
    assert _run(stopped) == 0
    assert "stopped by SIGINT in stage 1: VQ-VAE" in capsys.readouterr().out
    assert files.load_checkpoint(stopped / "vqvae.ckpt.pt")["step"] == 2
    assert not (stopped / "codes.pt").exists() and not (stopped / "models.pt").exists()

    # Resumed: stage 1's last step (poll 1), then stopped at the prior's step 2 (poll 3).
    monkeypatch.setattr(vc, "StopFlag", lambda: StopAtPoll(3))
    assert _run(stopped, "--resume") == 0
    assert "stopped by SIGINT in stage 2" in capsys.readouterr().out
    assert files.load_checkpoint(stopped / "prior_top.ckpt.pt")["step"] == 2
    assert (stopped / "codes.pt").exists() and not (stopped / "models.pt").exists()

    # Resumed again: the prior's last step, then stage 3.
    monkeypatch.setattr(vc, "StopFlag", files.StopFlag)
    assert _run(stopped, "--resume") == 0
    assert _same(_models(stopped / "models.pt"), _models(straight / "models.pt"))
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((stopped / "metrics.json").read_text())
    a["sampling"].pop("seconds"), b["sampling"].pop("seconds")
    assert a == b

    # A finished run resumed: nothing to train, the same outputs again.
    assert _run(stopped, "--resume") == 0
    assert _same(_models(stopped / "models.pt"), _models(straight / "models.pt"))


@needs_mnist
def test_outputs_metrics_and_loading_the_final_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(tmp_path) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["vqvae"]["steps"] == 3
    # Issue 20, item 12: a smoke run encodes a batch a step (3 x 32 training maps, 3 x
    # 2000 test maps), not all 70,000 images in silence.
    assert metrics["vqvae"]["encoded"] == {"train": 96, "test": 6000}
    codes = files.load_checkpoint(tmp_path / "codes.pt")
    assert [len(m) for m in codes["train"]] == [96] and [len(m) for m in codes["test"]] == [6000]
    assert "encoding 6000 images" in capsys.readouterr().err
    level = metrics["vqvae"]["levels"][0]
    assert level["map"] == [7, 7] and 1 <= level["codes_used"] <= 16
    assert 1 <= level["perplexity"] <= level["codes_used"]
    assert 0 < metrics["vqvae"]["test_reconstruction_mse"] < 1
    (prior,) = metrics["priors"]
    assert prior["steps"] == 3 and len(prior["train_curve"]) == 3
    # Log2(16) = 4 bits per code is the uniform prior's; a few steps stay near it.
    assert 0 < prior["test_nll_bits_per_code"] < 6
    assert prior["test_nll_bits_per_map"] == pytest.approx(49 * prior["test_nll_bits_per_code"])
    assert metrics["sampling"]["maps"] == 20 and metrics["sampling"]["method"] == "cached"

    # Another script loads the models without unpickling anything, and uses them.
    vqvae, (loaded,) = vp.load_models(tmp_path / "models.pt")
    again = GatedPixelCNN.from_pretrained(tmp_path / "prior_top")
    assert again.config == loaded.config
    assert all(
        torch.equal(a, b) for a, b in zip(again.parameters(), loaded.parameters(), strict=True)
    )
    assert loaded.config.input == "embedding" and loaded.config.num_classes == 10
    codes = loaded.sample(4, (7, 7), labels=torch.arange(4), generator=torch.Generator())
    with torch.no_grad():
        images = vqvae.decode([codes[:, 0]])
    assert images.shape == (4, 1, 28, 28) and images.min() >= 0 and images.max() <= 1


@needs_mnist
def test_two_levels_sample_top_then_bottom_given_top(tmp_path: Path) -> None:
    assert _run(tmp_path, "--hierarchy", "2", "--max-steps", "2") == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [p["map"] for p in metrics["priors"]] == [[7, 7], [14, 14]]
    assert [lv["map"] for lv in metrics["vqvae"]["levels"]] == [[7, 7], [14, 14]]
    per_image = sum(p["test_nll_bits_per_map"] for p in metrics["priors"])
    assert metrics["test_nll_bits_per_image"] == pytest.approx(per_image)
    vqvae, (top, bottom) = vp.load_models(tmp_path / "models.pt")
    assert top.config.cond_channels is None and bottom.config.cond_channels == 8
    # The bottom prior's test NLL, recomputed here: each bottom map given its own top map.
    codes = files.load_checkpoint(tmp_path / "codes.pt")
    tops, bottoms = (c[:500].long() for c in codes["test"])
    labels = torch.from_numpy(md.load_mnist(REAL_MNIST, download=False)["test_labels"][:500].copy())
    with torch.no_grad():
        lp = bottom.log_prob(
            bottoms[:, None], labels=labels.long(), cond=vqvae.code_vectors(0, tops)
        )
    # (over the first 500 test images; the metrics average all 10,000)
    assert -lp.mean().item() / math.log(2) == pytest.approx(
        metrics["priors"][1]["test_nll_bits_per_map"], rel=0.05
    )
    # The bottom prior reads the top map: other top codes, other bottom probabilities.
    x = torch.zeros(2, 1, 14, 14, dtype=torch.long)
    tops = torch.stack([torch.zeros(7, 7), torch.full((7, 7), 5)]).long()
    with torch.no_grad():
        cond = vqvae.code_vectors(0, tops)
        lp = bottom.log_prob(x, labels=torch.zeros(2, dtype=torch.long), cond=cond)
    assert lp[0] != lp[1]


@needs_mnist
def test_reruns_and_resumes_that_do_not_fit_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(tmp_path, "--resume") == 2
    assert "--resume: no checkpoint in" in capsys.readouterr().err
    assert _run(tmp_path, "--max-steps", "1") == 0
    assert _run(tmp_path) == 2
    assert "holds an earlier run (vqvae.ckpt.pt, codes.pt, prior_top.ckpt.pt)" in (
        capsys.readouterr().err
    )
    assert _run(tmp_path, "--resume", "--codebook-size", "32") == 2
    err = capsys.readouterr().err
    assert "is from another configuration" in err and "codebook_size=16 (this run: 32)" in err


def test_missing_data_and_bad_flags_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--data-dir", str(tmp_path / "none"), "--no-download", "--out-dir", str(tmp_path)]
    assert _main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: MNIST file") and err.count("\n") == 1
    for flag, value, message in [
        ("--codebook-size", "1", "--codebook-size must be >= 2, but got 1"),
        ("--prior-kernel", "4", "--prior-kernel must be odd and >= 3, but got 4"),
        ("--context-kernel", "1", "--context-kernel must be odd and >= 3, but got 1"),
        ("--order", "zigzag", "invalid choice: 'zigzag'"),
        ("--temperature", "0", "--temperature must be > 0, but got 0.0"),
        ("--hierarchy", "3", "invalid choice: 3"),
        ("--threads", "0", "--threads must be >= 1, but got 0"),
    ]:
        with pytest.raises(SystemExit):
            _main([flag, value])
        assert message in capsys.readouterr().err


@needs_mnist
def test_a_checkerboard_prior_trains_samples_codes_and_loads(tmp_path: Path) -> None:
    pytest.importorskip("constriction", reason="the codec extra is not installed")
    assert _run(tmp_path, "--order", "checkerboard", "--context-kernel", "5", "--compress") == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["sampling"]["order"] == "checkerboard"
    (coded,) = metrics["compression"]
    assert coded["decoded_exactly"] == coded["maps"]
    _, (prior,) = vp.load_models(tmp_path / "models.pt")
    assert isinstance(prior, PixelCNN) and prior.config.order == "checkerboard"
    assert prior.config.kernel_size == 5 and prior.config.num_classes == 10
    assert IncrementalEvaluator(prior, 1, (7, 7), labels=torch.tensor([3])).schedule.steps == 2


@needs_mnist
def test_compress_codes_the_test_maps_at_the_priors_nll(tmp_path: Path) -> None:
    pytest.importorskip("constriction", reason="the codec extra is not installed")
    assert _run(tmp_path, "--hierarchy", "2", "--compress") == 0
    top, bottom = json.loads((tmp_path / "metrics.json").read_text())["compression"]
    assert top["map"] == [7, 7] and bottom["map"] == [14, 14]
    for level in (top, bottom):
        assert level["decoded_exactly"] == level["maps"] == 6000
        # Within 0.5% of the prior's NLL, plus the header, a CRC a block and of the stream.
        fixed = 42 + 4 * -(-level["maps"] // 128) + 8
        assert level["bytes"] <= 1.005 * level["nll_bits_per_map"] * level["maps"] / 8 + fixed


@needs_mnist
def test_a_prior_checkpoint_of_the_old_loop_resumes_at_its_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Stopped at the prior's step 1 (after the VQ-VAE's 3 steps), then its checkpoint
    # rewritten as 0.2's own loop saved it: a step and a curve in bits per code.
    monkeypatch.setattr(vc, "StopFlag", lambda: StopAtPoll(1, start=3))
    assert _run(tmp_path) == 0
    path = tmp_path / "prior_top.ckpt.pt"
    ckpt = files.load_checkpoint(path)
    assert ckpt["step"] == 1
    old = {k: ckpt[k] for k in ("identity", "model", "optimizer", "rng_cpu", "step")}
    old["curve"] = [{"step": s, "bits_per_code": v / math.log(2)} for s, v in ckpt["train_curve"]]
    files.save_checkpoint(path, old)
    capsys.readouterr()
    monkeypatch.setattr(vc, "StopFlag", files.StopFlag)
    assert _run(tmp_path, "--resume") == 0
    assert "an earlier version of this example: resuming at step 1" in capsys.readouterr().out
    (prior,) = json.loads((tmp_path / "metrics.json").read_text())["priors"]
    assert prior["steps"] == 3 and [p["step"] for p in prior["train_curve"]] == [1, 2, 3]
    assert prior["train_curve"][0]["bits_per_code"] == pytest.approx(
        old["curve"][0]["bits_per_code"]
    )
    assert [t["step"] for t in prior["test_curve"]] == [3]


def test_the_experiment_file_runs_as_a_script_with_its_defaults() -> None:
    import subprocess

    script = Path(__file__).resolve().parents[1] / "examples" / "vqvae_prior.py"
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "A PixelCNN prior over the discrete codes of a VQ-VAE" in done.stdout
    # The defaults shown are the experiment's.
    assert f"(default: {vp.PRIOR.prior_steps})" in done.stdout.split("--prior-steps")[-1]
    assert f"(default: {vp.PRIOR.codebook_size})" in done.stdout.split("--codebook-size")[-1]
