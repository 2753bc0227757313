"""Train a small PixelCNN on synthetic bar images for a minute and draw samples.

Each 12x12 binary image holds one to three full-length horizontal or vertical bars
(never both), so a model that learned the structure draws straight, full bars.

    python examples/demo.py --out-dir runs/demo
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from tqdm import tqdm

from maskedconv import PixelCNN, nll_per_dim


def bars(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, 1, size, size)`` int64 images of 1-3 horizontal or vertical bars."""
    images = torch.zeros(n, size, size, dtype=torch.long)
    vertical = torch.rand(n, generator=generator) < 0.5
    count = torch.randint(1, 4, (n,), generator=generator)
    for i in range(n):
        lines = torch.randperm(size, generator=generator)[: int(count[i])]
        if vertical[i]:
            images[i, :, lines] = 1
        else:
            images[i, lines, :] = 1
    return images.unsqueeze(1)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def save_grid(images: torch.Tensor, path: Path, title: str) -> None:
    """Write ``(N, 1, H, W)`` binary images as a square grid PNG."""
    n = images.shape[0]
    side = int(n**0.5)
    fig, axes = plt.subplots(side, side, figsize=(side, side), facecolor="0.6")
    for ax, image in zip(axes.flat, images[: side * side].cpu(), strict=True):
        ax.imshow(image[0], cmap="gray", vmin=0, vmax=1)
        ax.axis("off")
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=12, help="image height and width")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/demo"))
    args = parser.parse_args()
    if args.steps < 1 or args.batch_size < 1 or args.size < 2:
        parser.error("--steps and --batch-size must be >= 1 and --size >= 2")

    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    data = torch.Generator().manual_seed(args.seed)
    test = bars(512, args.size, data).to(device)
    model = PixelCNN(1, 2, hidden_channels=32, num_layers=4, kernel_size=5).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    start = time.perf_counter()
    progress = tqdm(range(args.steps), desc="training", unit="step")
    for _ in progress:
        x = bars(args.batch_size, args.size, data).to(device)
        loss = -model.log_prob(x).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        progress.set_postfix(nats_per_dim=f"{nll_per_dim(-loss, x.shape).item():.4f}")

    model.eval()
    with torch.no_grad():
        test_nll = nll_per_dim(model.log_prob(test), test.shape).mean().item()
    generator = torch.Generator(device=device).manual_seed(args.seed)
    samples = model.sample(64, (args.size, args.size), generator=generator)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / "samples.png"
    save_grid(samples, path, f"PixelCNN samples after {args.steps} steps")
    elapsed = time.perf_counter() - start
    print(f"test NLL {test_nll:.4f} nats/dim; {elapsed:.0f} s on {device}; samples: {path}")


if __name__ == "__main__":
    main()
