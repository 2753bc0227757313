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

    python examples/mnist_color.py --data-dir ../shared/data/mnist --out-dir runs/col ...
    python examples/mnist_color.py ... --out-dir runs/col_board --order checkerboard
    python examples/mnist_color.py ... --out-dir runs/col_groups --order group-checkerboard
    python benchmarks/checkerboard_cost.py --mnist runs/col runs/col_board runs/col_groups

Each set is one example run several times, first with ``--order raster`` (the default),
then with ``--order checkerboard`` or ``group-checkerboard``, trained alike. The test NLL
comes from each run's ``metrics.json``; the sampling time is measured here, the models in
turn for ``--rounds`` interleaved rounds, at one thread (pinned: on a busy 2-core machine
torch's default thread count swings the time several-fold), each board model reported as
the median ratio of its rounds to raster's with the quartiles. With ``--data-dir`` each
test NLL is also split into the anchors (``row + col`` even) and the rest, per channel
for colour images. Run it alone.
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
def _by_colour(model: Any, x: torch.Tensor, labels: torch.Tensor | None) -> dict[str, Any]:
    """Mean NLL in bits a sub-pixel of the anchors (``row + col`` even) and of the others,
    per channel."""
    kwargs = {} if labels is None else {"labels": labels}
    per = []
    for start in range(0, len(x), 500):
        part = x[start : start + 500]
        more = {k: v[start : start + 500] for k, v in kwargs.items()}
        params = model(part, **more)
        per.append(-model.head.log_prob(params, part))  # (B, C, H, W) nats
    bits = torch.cat(per) / torch.log(torch.tensor(2.0))
    rows = torch.arange(x.shape[-2]).view(-1, 1)
    cols = torch.arange(x.shape[-1]).view(1, -1)
    anchors = (rows + cols) % 2 == 0
    return {
        "anchors": [float(bits[:, c][:, anchors].mean()) for c in range(bits.shape[1])],
        "non_anchors": [float(bits[:, c][:, ~anchors].mean()) for c in range(bits.shape[1])],
    }


def _test_data(args: argparse.Namespace, run: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    from mnist_data import load_mnist

    mnist = load_mnist(Path(args.data_dir), download=False)
    labels = torch.from_numpy(mnist["test_labels"].copy()).long()
    if args.vq:
        codes = torch.load(run / "codes.pt", weights_only=True)["test"][0]
        return codes[:, None].long(), labels[: len(codes)]
    if _mnist(run)[0].in_channels == 3:  # the colour example's test set
        from mnist_data import colorize

        coloured = colorize(mnist["test"], seed=1).transpose(0, 3, 1, 2)
        return torch.from_numpy(coloured.copy()).long(), None
    images = torch.from_numpy(mnist["test"].copy())[:, None]
    return (images > 127.5).long(), None


def _order(model: Any) -> str:
    return str(getattr(model, "order", "raster"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    kind = parser.add_mutually_exclusive_group(required=True)
    runs_help = "the raster run, then one or more board runs"
    kind.add_argument("--vq", nargs="+", metavar="RUN", help="vqvae_prior.py runs: " + runs_help)
    kind.add_argument("--mnist", nargs="+", metavar="RUN", help="mnist_*.py runs: " + runs_help)
    parser.add_argument("--images", type=int, default=100, help="images (maps) a sampling call")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--data-dir",
        default=None,
        help="MNIST IDX files: also split each model's test NLL into anchors and the rest",
    )
    args = parser.parse_args()
    runs = [Path(p) for p in (args.vq or args.mnist)]
    if len(runs) < 2:
        parser.error(f"give the raster run and at least one board run, but got {len(runs)} run")
    torch.set_num_threads(1)
    load = _vq if args.vq else _mnist
    loaded = [load(run) for run in runs]
    models = {_order(model): model for model, _, _ in loaded}
    if next(iter(models)) != "raster" or len(models) != len(runs):
        parser.error(
            f"the first run must be raster and each other of another order, but got "
            f"{[_order(m) for m, _, _ in loaded]}"
        )
    nll = {_order(model): value for model, value, _ in loaded}
    unit = loaded[0][2]
    size = (7, 7) if args.vq else (28, 28)
    kwargs = {"labels": torch.arange(args.images) % 10} if args.vq else {}
    generator = torch.Generator().manual_seed(0)

    def draw(model: Any) -> Any:
        return lambda: model.sample(args.images, size, generator=generator, **kwargs)

    timings = interleaved({name: draw(model) for name, model in models.items()}, args.rounds)
    first = {k: v[:1] for k, v in kwargs.items()}
    result: dict[str, Any] = {
        "cpu": _cpu(),
        "threads": 1,
        "torch": torch.__version__,
        "images": args.images,
        "rounds": args.rounds,
        "nll_unit": unit,
    }
    split = None
    if args.data_dir:
        x, labels = _test_data(args, runs[1])
        split = {name: _by_colour(model, x, labels) for name, model in models.items()}
    for name, model in models.items():
        result[name] = {
            "nll": nll[name],
            "seconds": timings[name],
            "steps": len(IncrementalEvaluator(model, 1, size, **first).schedule),
            "bits_by_colour": None if split is None else split[name],
        }
        if name != "raster":
            result[name]["nll_increase"] = nll[name] / nll["raster"] - 1
            result[name]["speedup"] = spread(timings.ratios("raster", name))
    print(json.dumps(result, indent=1))
    for name in list(models)[1:]:
        ratio, entry = result[name]["speedup"], result[name]
        print(
            f"{_cpu()}, 1 thread: {name} NLL {nll[name]:.4f} vs raster {nll['raster']:.4f} "
            f"{unit} ({100 * entry['nll_increase']:+.1f}%); sampling {args.images} images: "
            f"{timings[name]:.3f} s vs {timings['raster']:.3f} s, {ratio['value']:.1f}x faster "
            f"(quartiles {ratio['q1']:.1f}-{ratio['q3']:.1f}, {ratio['n']} paired rounds); "
            f"steps {entry['steps']} vs {result['raster']['steps']}"
        )


if __name__ == "__main__":
    main()
