"""Draw the blind spot: what the outputs at one pixel see, for the plain and the gated
PixelCNN (3x3 kernels, 4 layers, a 9x11 image, the pixel at row 6, column 5).

    python docs/blind_spot.py          # prints the pictures in docs/gated.md, writes docs/img/blind_spot.png

Each picture is measured with ``maskedconv.receptive_field``: ``#`` an input the
outputs depend on, ``.`` an input they may see (before the pixel in raster order) but
do not, ``o`` the pixel itself, blank the future.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from maskedconv import GatedPixelCNN, PixelCNN, receptive_field

SHAPE, PIXEL = (1, 9, 11), (6, 5)


def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    out = {}
    for name, cls in (("PixelCNN", PixelCNN), ("GatedPixelCNN", GatedPixelCNN)):
        model = cls(1, 2, hidden_channels=16, num_layers=4, kernel_size=3)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        out[name] = model.double()
    return out


def picture(model: torch.nn.Module) -> str:
    seen = receptive_field(model, SHAPE, PIXEL)[0]
    rows = []
    for r in range(PIXEL[0] + 1):  # the rows below are all in the future
        line = []
        for c in range(SHAPE[2]):
            if (r, c) == PIXEL:
                line.append("o")
            elif (r, c) > PIXEL:
                line.append(" ")
            else:
                line.append("#" if seen[r, c] else ".")
        rows.append(" ".join(line).rstrip())
    return "\n".join(rows)


def main() -> None:
    maps = models()
    for name, model in maps.items():
        print(f"{name}:\n{picture(model)}\n")
    if "--png" in sys.argv:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
        for ax, (name, model) in zip(axes, maps.items(), strict=True):
            seen = receptive_field(model, SHAPE, PIXEL)[0].double()
            order = torch.arange(SHAPE[1] * SHAPE[2]).view(SHAPE[1:])
            allowed = order < PIXEL[0] * SHAPE[2] + PIXEL[1]
            img = torch.where(allowed, 0.35, 1.0) - 0.35 * seen
            img[PIXEL] = 0.6
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{name}: dark = seen, grey = allowed but unseen", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.tight_layout()
        path = Path(__file__).parent / "img" / "blind_spot.png"
        fig.savefig(path, dpi=100)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
