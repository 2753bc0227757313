"""Sampling with this tree's package against the package of an earlier commit.

    python benchmarks/against_commit.py 5f4bd38                 # the blog's model, b16
    python benchmarks/against_commit.py 5f4bd38 --batch 64 --rounds 9
    python benchmarks/against_commit.py 5f4bd38 --model gated   # the default GatedPixelCNN

The commit's ``src/maskedconv`` is taken with ``git archive`` into a temporary folder
and imported under another name (the package imports itself only relatively), so both
run in one process: the same weights, ``sample`` with the same seed (the images must be
equal, bit for bit), the rounds interleaved, the ratio paired. Prints both caches'
bytes and new / old with its quartiles. Threads are pinned (``--threads``, default 2).
"""

from __future__ import annotations

import argparse
import importlib
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import torch
from timing import interleaved, spread

import maskedconv

ROOT = Path(__file__).resolve().parents[1]


def package_at(commit: str, folder: Path) -> Any:
    """``src/maskedconv`` of ``commit``, imported as ``maskedconv_at_<commit>``."""
    tar = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit, "src/maskedconv"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(folder, filter="data")
    name = f"maskedconv_at_{commit}".replace("-", "_")
    (folder / "src" / "maskedconv").rename(folder / name)
    sys.path.insert(0, str(folder))
    return importlib.import_module(name)


def build(package: Any, kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gated":
        return package.GatedPixelCNN(1, 2).eval()
    return package.PixelCNN(1, 2, hidden_channels=64, num_layers=5).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("commit", help="the commit to compare with (e.g. 5f4bd38)")
    parser.add_argument("--model", choices=("plain", "gated"), default="plain")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        old = package_at(args.commit, Path(tmp))
        new_model, old_model = build(maskedconv, args.model), build(old, args.model)
        old_model.load_state_dict(new_model.state_dict())
        shape = (args.batch, 1, 28, 28)

        def drawn(package: Any, model: torch.nn.Module) -> Any:
            return lambda: package.sample(model, shape, generator=torch.Generator().manual_seed(0))

        new, before = drawn(maskedconv, new_model), drawn(old, old_model)
        if not torch.equal(new(), before()):
            raise SystemExit(f"the samples differ from those of {args.commit}")
        times = interleaved({"new": new, "old": before}, args.rounds)
        size = (28, 28)
        nbytes = [
            package.IncrementalEvaluator(model, args.batch, size).cache_bytes()
            for package, model in ((maskedconv, new_model), (old, old_model))
        ]
    r = spread(times.ratios("new", "old"))
    print(
        f"{args.model} b{args.batch}, {args.threads} threads: the same samples; caches "
        f"{nbytes[0] / 1e6:.2f} MB (this tree) against {nbytes[1] / 1e6:.2f} MB "
        f"({args.commit}); new {times['new'] * 1e3:.1f} ms, old {times['old'] * 1e3:.1f} ms; "
        f"new / old {r['value']:.3f} (quartiles {r['q1']:.3f}-{r['q3']:.3f}, n={r['n']})"
    )


if __name__ == "__main__":
    main()
