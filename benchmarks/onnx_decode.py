"""Decoding through ONNX Runtime: ``CachedDecodeStep`` against ``DecodeStep``.

    python benchmarks/onnx_decode.py            # the blog's binary model, 28x28, 1 image
    python benchmarks/onnx_decode.py --rounds 5 --threads 1

Both steps are exported with ``torch.onnx.export(..., dynamo=True)`` and run in a
decoder's loop over the 136 wavefront steps of one image, the known image's values in
place of an entropy decoder; the rounds are interleaved and the ratio is paired. The two
loops' parameters are compared first. Needs the ``export`` extra.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from maskedconv import CachedDecodeStep, DecodeStep, PixelCNN, wavefront


def _session(
    module: torch.nn.Module, args: tuple[Any, ...], dims: tuple[Any, ...], threads: int
) -> Any:
    import onnxruntime as ort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes (axis names, torchvision)
        program = torch.onnx.export(
            module, args, dynamo=True, dynamic_shapes=dims, verbose=False, report=False
        )
    assert program is not None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(
        program.model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def loops(
    model: torch.nn.Module, image: torch.Tensor, threads: int
) -> dict[str, Callable[[], list[np.ndarray]]]:
    """The two decoder loops over ``image`` ``(1, C, H, W)``, each returning its params."""
    size = (int(image.shape[2]), int(image.shape[3]))
    schedule = wavefront(model, size)
    steps = [
        (at.rows.numpy(), at.cols.numpy()) for at in (schedule[t] for t in range(len(schedule)))
    ]
    truth = image.numpy()
    rows2, cols2 = torch.tensor([0, 1]), torch.tensor([5, 1])  # example positions (n >= 2)
    full = _session(DecodeStep(model), (image, rows2, cols2), ({}, {0: "n"}, {0: "n"}), threads)
    step = CachedDecodeStep(model, 1, size)
    first = [c.numpy() for c in step.initial_caches()]
    last = (
        torch.zeros(1, image.shape[1], 3, dtype=torch.long),
        torch.tensor([0, 1, 2]),
        torch.tensor([9, 5, 1]),
    )
    now = (torch.zeros(1, image.shape[1], 2, dtype=torch.long), rows2, cols2)
    m, n = torch.export.Dim("m", min=1), torch.export.Dim("n", min=1)
    dims = ({2: m}, {0: m}, {0: m}, {2: n}, {0: n}, {0: n}, tuple({} for _ in first))
    cached = _session(step, (*last, *now, *step.initial_caches()), dims, threads)
    full_names = [i.name for i in full.get_inputs()]
    cached_names = [i.name for i in cached.get_inputs()]

    def run_full() -> list[np.ndarray]:
        decoded, out = np.zeros_like(truth), []
        for rows, cols in steps:
            feed = dict(zip(full_names, (decoded, rows, cols), strict=True))
            out.append(full.run(None, feed)[0])
            decoded[:, :, rows, cols] = truth[:, :, rows, cols]
        return out

    def run_cached() -> list[np.ndarray]:
        caches, previous, out = first, None, []
        for rows, cols in steps:
            values = np.zeros((1, truth.shape[1], len(rows)), dtype=np.int64)
            previous = previous or (values, rows, cols)  # the first step: itself, zeros
            feed = dict(zip(cached_names, (*previous, values, rows, cols, *caches), strict=True))
            params, *caches = cached.run(None, feed)
            out.append(params)
            previous = (truth[:, :, rows, cols], rows, cols)
        return out

    return {"DecodeStep": run_full, "CachedDecodeStep": run_cached}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime's intra-op threads")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = PixelCNN(1, 2, hidden_channels=64, num_layers=5).eval()
    image = torch.randint(0, 2, (1, 1, 28, 28))
    runs = loops(model, image, args.threads)
    a, b = (run() for run in runs.values())
    diff = max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))
    print(f"largest difference between the two loops' parameters: {diff:.2e}")
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    ratios = sorted(
        f / c for f, c in zip(times["DecodeStep"], times["CachedDecodeStep"], strict=True)
    )
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(
        f"one 28x28 image, {len(wavefront(model, (28, 28)))} wavefront steps, {args.threads} "
        f"onnxruntime threads: DecodeStep {medians['DecodeStep']:.0f} ms, CachedDecodeStep "
        f"{medians['CachedDecodeStep']:.0f} ms; DecodeStep / CachedDecodeStep "
        f"{statistics.median(ratios):.1f} (paired rounds: {', '.join(f'{r:.1f}' for r in ratios)})"
    )


if __name__ == "__main__":
    main()
