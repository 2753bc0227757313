"""Flip one random bit in each of many codec streams, and truncate each: count what decodes.

    python benchmarks/codec_corruption.py --streams 1000

Every stream is a few random images coded with a small random model (a different model
seed, image size, head and block size per stream). A flipped or truncated stream must
raise ``CodecError``; the script prints how many did, and how many decoded to wrong
images (must be 0).
"""

from __future__ import annotations

import argparse
import random

import torch

from maskedconv import PixelCNN, codec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(0)
    counts = {"streams": 0, "flips detected": 0, "truncations detected": 0, "wrong images": 0}
    models = [
        PixelCNN(1, 2, hidden_channels=8, num_layers=2, kernel_size=3).eval(),
        PixelCNN(3, 4, hidden_channels=12, num_layers=2, kernel_size=3).eval(),
        PixelCNN(1, 256, hidden_channels=8, num_layers=1, kernel_size=3, head="dmol").eval(),
    ]
    for index in range(args.streams):
        model = models[index % len(models)]
        size = rng.randint(2, 6)
        x = torch.randint(0, model.levels, (rng.randint(1, 4), model.in_channels, size, size))
        data = codec.encode(model, x, block_size=rng.randint(1, 3))
        counts["streams"] += 1
        for kind, bad in (
            ("flips", _flipped(data, rng.randrange(8 * len(data)))),
            ("truncations", data[: rng.randrange(len(data))]),
        ):
            try:
                decoded = codec.decode(model, bad)
            except codec.CodecError:
                counts[f"{kind} detected"] += 1
            else:
                counts["wrong images"] += int(not torch.equal(decoded, x))
    print(counts)


def _flipped(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


if __name__ == "__main__":
    main()
