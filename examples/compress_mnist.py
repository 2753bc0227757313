"""Compress binarized MNIST's test set with a PixelCNN, losslessly, and compare.

The model's probabilities drive a range coder (``maskedconv.codec``): the file is as
small as the model's NLL. The script encodes the test images into one file, decodes it,
checks every image, and prints bits per pixel on disk beside the model's NLL and beside
PNG (Pillow), gzip, bz2 and xz of the same images (their pixels packed 8 to a byte, the
best start those get), with encode and decode speed.

    python examples/compress_mnist.py --data-dir data/mnist --model runs/mnist_binary/model
    python examples/compress_mnist.py --data-dir data/mnist --train-steps 300

Needs the codec extra: pip install 'maskedconv[codec]'.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import io
import json
import lzma
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from files import DataError, StopFlag, atomic_write_bytes
from mnist_data import binarize, load_mnist
from torch import Tensor
from train import LogProb, Recipe, Split, Trainer, evaluate

from maskedconv import GatedPixelCNN, PixelCNN, codec

MODELS: dict[str, type[PixelCNN] | type[GatedPixelCNN]] = {
    "PixelCNN": PixelCNN,
    "GatedPixelCNN": GatedPixelCNN,
}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-dir", default="data/mnist", help="the MNIST IDX files (gzip)")
    p.add_argument("--no-download", action="store_true", help="fail if MNIST is missing")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a folder written by the MNIST example (out/model)")
    source.add_argument("--train-steps", type=int, help="train the blog's model this many steps")
    p.add_argument("--images", type=int, default=10_000, help="test images to compress")
    p.add_argument("--block-size", type=int, default=128, help="images coded together")
    p.add_argument("--out-dir", default="runs/compress_mnist", help="the stream, results.json")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 on a busy CPU)")
    p.add_argument("--seed", type=int, default=0)
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag in ("train_steps", "images", "block_size", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, but got {value}")
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model} is not a folder written by save_pretrained")
    if Path(args.out_dir).is_file():
        parser.error(f"--out-dir {args.out_dir} is a file")


def load_model(folder: Path) -> PixelCNN | GatedPixelCNN:
    kind = json.loads((folder / "config.json").read_text()).get("model_type")
    if kind not in MODELS:
        raise DataError(f"{folder}: model_type {kind!r} is not one of {sorted(MODELS)}")
    model = MODELS[kind].from_pretrained(folder)
    if model.levels != 2 or model.in_channels != 1:
        raise DataError(f"{folder} is not a binary MNIST model ({model.in_channels} channels)")
    return model


def train_model(train_images: Tensor, test: Tensor, steps: int, seed: int, out: Path) -> Trainer:
    """The blog's model and recipe (Adam 1e-3, batch 128, clipping at 1) for ``steps``
    steps, on the examples' training loop; the model is kept in OUT/model for --model.

    A model trained earlier in ``out`` is not written over. The loop's checkpoint is
    removed once the model is saved (this script does not resume a training)."""
    if (out / "model").exists():
        raise DataError(
            f"--out-dir {out} holds a model trained earlier ({out / 'model'}): code with it "
            f"(--model {out / 'model'}), or choose another --out-dir"
        )
    torch.manual_seed(seed)
    model = PixelCNN(1, 2, hidden_channels=64, num_layers=5)
    trainer = Trainer(
        model,
        Split(train_images),
        Split(test),
        Recipe(epochs=None, batch_size=128, lr=1e-3, max_steps=steps),
        checkpoint=out / "train.ckpt.pt",
        identity={"steps": steps, "seed": seed},
        device=torch.device("cpu"),
    )
    stop = StopFlag()
    try:
        if trainer.fit(stop):
            raise DataError(f"stopped by {trainer.stopped_by} while training; nothing was coded")
    finally:
        stop.close()
    model.save_pretrained(out / "model")
    trainer.checkpoint.unlink(missing_ok=True)
    return trainer


def baselines(images: np.ndarray) -> dict[str, int]:
    """Bytes of PNG, gzip, bz2 and xz for ``(N, 28, 28)`` binary images."""
    from PIL import Image

    packed = np.packbits(images, axis=None).tobytes()
    side = math.ceil(math.sqrt(len(images)))
    tiled = np.zeros((side * side, 28, 28), dtype=np.uint8)
    tiled[: len(images)] = images
    tiled = tiled.reshape(side, side, 28, 28).transpose(0, 2, 1, 3).reshape(side * 28, -1)
    png = io.BytesIO()
    Image.fromarray(tiled.astype(bool)).save(png, format="PNG", optimize=True)
    return {
        "PNG (Pillow, 1 bit, one tiled image)": len(png.getvalue()),
        "gzip -9": len(gzip.compress(packed, 9)),
        "bz2 -9": len(bz2.compress(packed, 9)),
        "xz -9e": len(lzma.compress(packed, preset=9 | lzma.PRESET_EXTREME)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        mnist = load_mnist(Path(args.data_dir), download=not args.no_download)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    test = torch.from_numpy(binarize(mnist["test"])[: args.images, None].copy())
    out = Path(args.out_dir)
    dims = test.numel()
    if args.model is not None:
        model = load_model(Path(args.model)).eval()
        nll = evaluate(LogProb(model), Split(test), 500, torch.device("cpu")) * dims / math.log(2)
    else:
        train_images = torch.from_numpy(binarize(mnist["train"])[:, None].copy())
        try:
            trainer = train_model(train_images, test, args.train_steps, args.seed, out)
        except DataError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        model = trainer.model.eval()  # type: ignore[assignment]
        nll = trainer.test_nll() * dims / math.log(2)

    started = time.perf_counter()
    data = codec.encode(model, test, block_size=args.block_size, progress=True)
    encode_s = time.perf_counter() - started
    atomic_write_bytes(out / "test_images.mcz", data)
    started = time.perf_counter()
    decoded = codec.decode(model, (out / "test_images.mcz").read_bytes(), progress=True)
    decode_s = time.perf_counter() - started
    exact = int((decoded == test).flatten(1).all(1).sum())

    rows = [
        ("model NLL (no file)", nll / 8, None, None),
        ("maskedconv.codec", len(data), encode_s, decode_s),
    ]
    others = baselines(test[:, 0].numpy())
    rows += [(name, size, None, None) for name, size in others.items()]
    print(f"\n{len(test)} binarized MNIST test images ({dims} pixels)")
    print(f"{exact}/{len(test)} decoded exactly, from {out / 'test_images.mcz'}")
    print("| method | bytes | bits/pixel | encode | decode |")
    print("| --- | --- | --- | --- | --- |")
    for name, size, enc, dec in rows:
        speed = [f"{dims / s / 1e3:.1f}k pixels/s ({s:.1f} s)" if s else "" for s in (enc, dec)]
        print(f"| {name} | {size:,.0f} | {8 * size / dims:.4f} | {speed[0]} | {speed[1]} |")
    print(f"file / NLL = {len(data) / (nll / 8):.4f}")
    results = {
        "images": len(test),
        "decoded_exactly": exact,
        "nll_bits": nll,
        "bytes": len(data),
        "encode_s": encode_s,
        "decode_s": decode_s,
        "baselines": others,
        "threads": torch.get_num_threads(),
    }
    atomic_write_bytes(out / "results.json", (json.dumps(results, indent=1) + "\n").encode())
    return 0 if exact == len(test) else 1


if __name__ == "__main__":
    raise SystemExit(main())
