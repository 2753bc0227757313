"""What a checkerboard context costs in NLL and saves in sampling time, beside raster order.

    python examples/vqvae_prior.py --data-dir ../shared/data/mnist --out-dir runs/vq
    python examples/vqvae_prior.py --data-dir ../shared/data/mnist --out-dir runs/vq_board \\
        --order checkerboard
    python benchmarks/checkerboard_cost.py --vq runs/vq runs/vq_board

    python examples/mnist_binary.py --data-dir ../shared/data/mnist --out-dir runs/bin \\
        --max-steps 1000
    python examples/mnist_binary.py --data-dir ../shared/data/mnist --out-dir runs/bin_board \\
        --max-steps 1000 --order checkerboard
    python benchmarks/checkerboard_cost.py --mnist runs/bin runs/bin_board

Each pair is one example run twice, with ``--order raster`` (the default) and ``--order
checkerboard``, trained alike. The test NLL comes from each run's ``metrics.json``; the
sampling time is measured here, both models in turn for ``--rounds`` paired rounds, at
one thread (pinned: on a busy 2-core machine torch's default thread count swings the time
several-fold), reported as the median ratio of the pairs with its quartiles. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from timing import interleaved, spread

from maskedconv import IncrementalEvaluator, PixelCNN


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _vq(run: Path) -> tuple[Any, float, str]:
    from vqvae_prior import load_models

    _, priors = load_models(run / "models.pt")
    metrics = json.loads((run / "metrics.json").read_text())
    return priors[0], metrics["priors"][0]["test_nll_bits_per_map"], "bits per 7x7 map"


def _mnist(run: Path) -> tuple[Any, float, str]:
    model = PixelCNN.from_pretrained(run / "model")
    metrics = json.loads((run / "metrics.json").read_text())
    return model, metrics["test"][-1]["bits_per_dim"], "bits per dim"


@torch.no_grad()
def _by_colour(model: Any, x: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
    """Mean NLL in bits of the anchors (``row + col`` even) and of the others."""
    kwargs = {} if labels is None else {"labels": labels}
    per = []
    for start in range(0, len(x), 500):
        part = x[start : start + 500]
        more = {k: v[start : start + 500] for k, v in kwargs.items()}
        params = model(part, **more)
        per.append(-model.head.log_prob(params, part).sum(1))  # (B, H, W) nats
    nats = torch.cat(per)
    rows = torch.arange(x.shape[-2]).view(-1, 1)
    cols = torch.arange(x.shape[-1]).view(1, -1)
    anchors = (rows + cols) % 2 == 0
    bits = nats / torch.log(torch.tensor(2.0))
    return {
        "anchors": float(bits[:, anchors].mean()),
        "non_anchors": float(bits[:, ~anchors].mean()),
    }


def _test_data(args: argparse.Namespace, run: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    from mnist_common import load_mnist

    mnist = load_mnist(Path(args.data_dir), download=False)
    labels = torch.from_numpy(mnist["test_labels"].copy()).long()
    if args.vq:
        codes = torch.load(run / "codes.pt", weights_only=True)["test"][0]
        return codes[:, None].long(), labels[: len(codes)]
    images = torch.from_numpy(mnist["test"].copy())[:, None]
    return (images > 127.5).long(), None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    kind = parser.add_mutually_exclusive_group(required=True)
    kind.add_argument("--vq", nargs=2, metavar=("RASTER", "BOARD"), help="vqvae_prior.py runs")
    kind.add_argument("--mnist", nargs=2, metavar=("RASTER", "BOARD"), help="mnist_*.py runs")
    parser.add_argument("--images", type=int, default=100, help="images (maps) a sampling call")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--data-dir",
        default=None,
        help="MNIST IDX files: also split each model's test NLL into anchors and the rest",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = _vq if args.vq else _mnist
    runs = [Path(p) for p in (args.vq or args.mnist)]
    (raster, raster_nll, unit), (board, board_nll, _) = (load(run) for run in runs)
    size = (7, 7) if args.vq else (28, 28)
    kwargs = {"labels": torch.arange(args.images) % 10} if args.vq else {}
    generator = torch.Generator().manual_seed(0)

    def draw(model: Any) -> Any:
        return lambda: model.sample(args.images, size, generator=generator, **kwargs)

    timings = interleaved({"raster": draw(raster), "checkerboard": draw(board)}, args.rounds)
    ratio = spread(timings.ratios("raster", "checkerboard"))
    steps = {
        name: len(IncrementalEvaluator(model, 1, size, **{k: v[:1] for k, v in kwargs.items()})
                  .schedule)
        for name, model in (("raster", raster), ("checkerboard", board))
    }  # fmt: skip
    result = {
        "cpu": _cpu(),
        "threads": 1,
        "torch": torch.__version__,
        "images": args.images,
        "rounds": args.rounds,
        "nll_unit": unit,
        "raster": {"nll": raster_nll, "seconds": timings["raster"], "steps": steps["raster"]},
        "checkerboard": {
            "nll": board_nll,
            "seconds": timings["checkerboard"],
            "steps": steps["checkerboard"],
        },
        "nll_increase": board_nll / raster_nll - 1,
        "bits_by_colour": None,
        "speedup": ratio,
    }
    if args.data_dir:
        x, labels = _test_data(args, runs[1])
        result["bits_by_colour"] = {
            "raster": _by_colour(raster, x, labels),
            "checkerboard": _by_colour(board, x, labels),
        }
    print(json.dumps(result, indent=1))
    print(
        f"{_cpu()}, 1 thread: checkerboard NLL {board_nll:.4f} vs raster {raster_nll:.4f} {unit} "
        f"({100 * result['nll_increase']:+.1f}%); sampling {args.images} images: "
        f"{timings['checkerboard']:.3f} s vs {timings['raster']:.3f} s, "
        f"{ratio['value']:.1f}x faster (quartiles {ratio['q1']:.1f}-{ratio['q3']:.1f}, "
        f"{ratio['n']} paired rounds); steps {steps['checkerboard']} vs {steps['raster']}"
    )


if __name__ == "__main__":
    main()
