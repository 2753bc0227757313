"""pytest-benchmark entry points; ``python benchmarks/report.py`` runs them and prints ratios.

Each test times all variants of one case interleaved in this process and stores the
medians and ratios in ``extra_info``. Nothing here asserts a time.
"""

from __future__ import annotations

import pytest
from cases import (
    checkerboard_sample_case,
    code_prior_sample_case,
    codec_case,
    conv_case,
    conv_formulations_case,
    gated_sample_case,
    gated_train_case,
    head_sample_case,
    sample_case,
    sample_floor_case,
    train_case,
)


def run(benchmark, case, *args, **kwargs) -> None:
    result = benchmark.pedantic(case, args=args, kwargs=kwargs, rounds=1, iterations=1)
    benchmark.extra_info.update(result)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize(
    ("kind", "channels", "groups"), [("A", 64, 1), ("B", 64, 1), ("A", 120, 3), ("B", 120, 3)]
)
def test_masked_conv_7x7(benchmark, kind: str, channels: int, groups: int, backward: bool) -> None:
    run(benchmark, conv_case, kind, channels, groups, backward)


@pytest.mark.parametrize(
    ("channels", "batch"), [(64, 32), (120, 32), (64, 128)], ids=["64-b32", "120-b32", "64-b128"]
)
def test_conv_formulations(benchmark, channels: int, batch: int) -> None:
    run(benchmark, conv_formulations_case, channels, batch, rounds=15 if batch == 32 else 7)


@pytest.mark.parametrize("color", [False, True], ids=["binary-b128", "color-b32"])
def test_training_step(benchmark, color: bool) -> None:
    run(benchmark, train_case, color, rounds=5 if color else 15)


@pytest.mark.parametrize(
    ("color", "batch", "naive_rows", "rounds"),
    [
        (False, 1, 1, 15),
        (False, 16, 1, 15),
        (False, 64, None, 15),
        (False, 256, None, 5),
        (True, 16, None, 5),
    ],
    ids=["binary-b1", "binary-b16", "binary-b64", "binary-b256", "color-b16"],
)
def test_sampling(benchmark, color: bool, batch: int, naive_rows: int | None, rounds: int) -> None:
    run(benchmark, sample_case, color, batch, naive_rows, rounds)


@pytest.mark.parametrize("batch", [1, 16, 64], ids=["binary-b1", "binary-b16", "binary-b64"])
def test_sampling_floor(benchmark, batch: int) -> None:
    run(benchmark, sample_floor_case, batch, rounds=9)


@pytest.mark.parametrize("kind", ["dmol", "embedding"], ids=["dmol-k256", "embedding-k512"])
def test_sampling_8x8_b64(benchmark, kind: str) -> None:
    run(benchmark, head_sample_case, kind, rounds=3)


def test_gated_training_step(benchmark) -> None:
    run(benchmark, gated_train_case, rounds=5)


def test_gated_sampling_b16(benchmark) -> None:
    run(benchmark, gated_sample_case, 16, rounds=15)


def test_code_prior_sampling_7x7_k512_b100(benchmark) -> None:
    run(benchmark, code_prior_sample_case, rounds=5)


def test_codec_decode_b16(benchmark) -> None:
    run(benchmark, codec_case, 16, rounds=9)


def test_checkerboard_sampling(benchmark) -> None:
    run(benchmark, checkerboard_sample_case, rounds=9)
