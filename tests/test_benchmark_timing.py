"""The benchmarks' paired ratios (benchmarks/timing.py) and the report's verdicts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import report  # noqa: E402
from timing import Timings, spread  # noqa: E402


def test_ratios_are_paired_round_by_round_within_one_run() -> None:
    # A machine that slows down between rounds: each round's pair shares the slowdown.
    t = Timings({"ours": [1.0, 2.0, 4.0], "dense": [2.0, 4.0, 8.0]}, run=0)
    assert t.ratios("ours", "dense") == [0.5, 0.5, 0.5]
    assert spread(t.ratios("ours", "dense")) == {
        "value": 0.5,
        "q1": 0.5,
        "q3": 0.5,
        "min": 0.5,
        "max": 0.5,
        "n": 3,
    }
    # Timed by another call: no pairing, every combination counts.
    t.update(Timings({"loop": [10.0]}, run=1))
    assert sorted(t.ratios("loop", "ours")) == [2.5, 5.0, 10.0]
    t.add_scaled("ours_x3", t, "ours", 3)
    assert t.ratios("ours_x3", "ours") == [3.0, 3.0, 3.0] and t["ours_x3"] == 6.0


def test_the_verdict_is_the_median_and_a_straddling_spread_is_flagged() -> None:
    r = {"target": "<= 0.65", **spread([0.60, 0.63, 0.64, 0.66, 0.70])}
    assert r["value"] == 0.64 and r["q1"] == pytest.approx(0.63) and r["q3"] == pytest.approx(0.66)
    assert report.check(r) == "<= 0.65  met (spread crosses)"
    r = {"target": ">= 150", **spread([160.0, 170.0, 180.0])}
    assert report.check(r) == ">= 150  met"
    r = {"target": ">= 150", **spread([100.0, 110.0, 120.0])}
    assert report.check(r) == ">= 150  MISSED"
    assert report.check({"target": None, "value": 1.0}) == ""


def test_each_timing_waits_for_the_device() -> None:
    from timing import interleaved

    events: list[str] = []
    timings = interleaved(
        {"a": lambda: events.append("a"), "b": lambda: events.append("b")},
        rounds=2,
        sync=lambda: events.append("sync"),
    )
    # One warm-up round, a sync, then every timed call followed by its sync.
    assert events == ["a", "b", "sync", "a", "sync", "b", "sync", "a", "sync", "b", "sync"]
    assert set(timings) == {"a", "b"} and len(timings.rounds["a"]) == 2


def test_device_flag_is_taken_out_of_the_pytest_arguments() -> None:
    assert report.device_arg(["-k", "conv"]) == ("cpu", ["-k", "conv"])
    assert report.device_arg(["--device", "cuda", "-k", "conv"]) == ("cuda", ["-k", "conv"])
    assert report.device_arg(["--device=cuda:1"]) == ("cuda:1", [])
    with pytest.raises(SystemExit, match="--device must be cpu, cuda or cuda:N, but got 'tpu'"):
        report.device_arg(["--device", "tpu"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_device_cuda_without_a_gpu_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main(["--device", "cuda", "-k", "conv"]) == 2
    assert "--device cuda: this torch sees no CUDA device" in capsys.readouterr().err


def test_checkerboard_cost_compares_a_raster_run_with_board_runs(tmp_path, monkeypatch, capsys):
    # Three tiny "runs" as the MNIST examples leave them (a saved model, metrics.json):
    # the script times each against raster and prints one line per board order.
    import json

    import checkerboard_cost

    from maskedconv import PixelCNN

    runs = []
    for order, nll in (("raster", 0.5), ("checkerboard", 0.75), ("group-checkerboard", 0.6)):
        torch.manual_seed(0)
        model = PixelCNN(3, 4, hidden_channels=6, num_layers=2, kernel_size=3, order=order)
        run = tmp_path / order
        model.save_pretrained(run / "model")
        (run / "metrics.json").write_text(json.dumps({"test": [{"bits_per_dim": nll}]}))
        runs.append(str(run))
    argv = ["checkerboard_cost.py", "--mnist", *runs, "--rounds", "2", "--images", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    threads = torch.get_num_threads()
    try:
        checkerboard_cost.main()
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    result = json.loads(out[: out.rindex("}") + 1])
    assert result["raster"]["steps"] == 28 + 2 * 27  # the 3x3 model's wavefront
    assert result["checkerboard"]["steps"] == 2 and result["group-checkerboard"]["steps"] == 6
    assert result["checkerboard"]["nll_increase"] == pytest.approx(0.5)
    assert result["group-checkerboard"]["nll_increase"] == pytest.approx(0.2)
    assert "checkerboard NLL 0.7500 vs raster 0.5000 bits per dim (+50.0%)" in out
    assert "group-checkerboard NLL 0.6000 vs raster 0.5000 bits per dim (+20.0%)" in out
    # The first run must be raster.
    monkeypatch.setattr(sys, "argv", ["checkerboard_cost.py", "--mnist", runs[1], runs[0]])
    with pytest.raises(SystemExit):
        checkerboard_cost.main()
    assert "the first run must be raster" in capsys.readouterr().err
