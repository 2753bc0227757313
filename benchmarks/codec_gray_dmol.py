"""The codec's rate with the mixture head on 8-bit gray MNIST: file size against NLL.

    python benchmarks/codec_gray_dmol.py --data-dir ../shared/data/mnist

Trains a small ``PixelCNN(1, 256, head="dmol")`` (4 layers, 32 filters; 200 steps of 64
images, Adam 1e-3, clipping at 1), then codes the test images and decodes them.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from mnist_data import load_mnist

from maskedconv import PixelCNN, codec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default="data/mnist")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--images", type=int, default=10_000)
    args = parser.parse_args()
    torch.manual_seed(0)
    mnist = load_mnist(Path(args.data_dir), download=False)
    train = torch.from_numpy(mnist["train"][:, None].copy()).long()
    test = torch.from_numpy(mnist["test"][: args.images, None].copy()).long()
    model = PixelCNN(1, 256, head="dmol", hidden_channels=32, num_layers=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, args.steps + 1):
        x = train[torch.randint(len(train), (64,), generator=generator)]
        loss = -model.log_prob(x).mean() / 784
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0:
            print(f"step {step}: {loss.item() / math.log(2):.3f} bits/dim", flush=True)
    model.eval()
    with torch.no_grad():
        nll = -model.log_prob(test).double().sum().item() / math.log(2) / 8
    started = time.perf_counter()
    data = codec.encode(model, test)
    encode_s = time.perf_counter() - started
    started = time.perf_counter()
    decoded = codec.decode(model, data)
    decode_s = time.perf_counter() - started
    exact = int((decoded == test).flatten(1).all(1).sum())
    print(
        f"{len(test)} images, {exact} exact; {len(data)} bytes, NLL {nll:.0f} bytes "
        f"({len(data) / nll:.4f}x), {8 * len(data) / test.numel():.4f} bits/pixel; "
        f"encode {encode_s:.1f} s, decode {decode_s:.1f} s "
        f"({test.numel() / decode_s:,.0f} symbols/s)"
    )


if __name__ == "__main__":
    main()
