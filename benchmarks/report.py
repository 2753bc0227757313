"""Run the benchmarks once and print the ratio table.

    python benchmarks/report.py            # all cases, a few minutes on 2 cores
    python benchmarks/report.py -k conv    # a subset (any pytest arguments)
    python benchmarks/report.py --device cuda   # every case on the GPU
    python benchmarks/report.py --from-json runs/bench.json   # print an earlier run

Every ratio is the median of paired ratios: the variants of a case run interleaved in
one process, and each round's time of one is divided by the same round's time of the
other. The table gives the quartiles of those paired ratios and their count; a target is
met when the median meets it, and flagged when the quartiles fall on both sides.
The run tells glibc to keep freed memory (``MALLOC_*`` below): by default it hands large
freed blocks back to the OS, and a forward pass that re-faults its activations was up to
1.6x slower from one run to the next. Keeping them gives every baseline its best time.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _meets(value: float, target: str) -> bool:
    op, bound = target.split()
    return value <= float(bound) if op == "<=" else value >= float(bound)


def check(r: dict) -> str:
    """``met`` or ``MISSED`` by the median paired ratio; flagged when the quartiles of the
    paired ratios fall on both sides of the target (the verdict is then not settled)."""
    target = r.get("target")
    if not target:
        return ""
    status = f"{target}  {'met' if _meets(r['value'], target) else 'MISSED'}"
    q1, q3 = r.get("q1", r["value"]), r.get("q3", r["value"])
    if _meets(q1, target) != _meets(q3, target):
        status += " (spread crosses)"
    return status


def table(data: dict) -> str:
    lines = []
    info = data.get("machine_info", {})
    lines.append(
        f"machine: {info.get('cpu', {}).get('brand_raw', platform.processor())}, "
        f"{os.cpu_count()} logical cores; python {info.get('python_version', '')}; "
        f"device {data.get('device', 'cpu')}"
    )
    lines.append("")
    lines.append(
        f"| {'case':<58} | {'ratio':<40} | {'median':>8} | {'IQR (paired rounds)':<22} | target |"
    )
    lines.append(f"|{'-' * 60}|{'-' * 42}|{'-' * 10}|{'-' * 24}|--------|")
    for bench in data["benchmarks"]:
        extra = bench["extra_info"]
        case = bench["name"].removeprefix("test_")
        for r in extra["ratios"]:
            iqr = f"{r.get('q1', r['value']):.3f}-{r.get('q3', r['value']):.3f} (n={r.get('n', 1)})"
            lines.append(
                f"| {case:<58} | {r['name']:<40} | {r['value']:>8.3f} | {iqr:<22} | {check(r)} |"
            )
    lines.append("")
    lines.append("medians (ms):")
    for bench in data["benchmarks"]:
        extra = bench["extra_info"]
        parts = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in extra["medians"].items())
        notes = []
        if "images_per_s" in extra:
            notes.append(
                "images/s " + ", ".join(f"{k} {v:.1f}" for k, v in extra["images_per_s"].items())
            )
        if "cache_bytes" in extra:
            notes.append(f"sampler caches {extra['cache_bytes'] / 2**20:.2f} MiB")
        if "steps" in extra:
            notes.append("steps " + ", ".join(f"{k} {v}" for k, v in extra["steps"].items()))
        if extra.get("chosen"):
            notes.append(
                "autotune chose " + "; ".join(f"{v} for {k}" for k, v in extra["chosen"].items())
            )
        if "naive_note" in extra:
            notes.append(extra["naive_note"])
        if "decode_symbols_per_s" in extra:
            notes.append(
                f"decode {extra['decode_symbols_per_s']:,.0f} symbols/s (target >= 40,000), "
                f"encode {extra['encode_symbols_per_s']:,.0f}; {extra['symbols']} symbols in "
                f"{extra['bytes']} bytes"
            )
        lines.append(
            f"- {bench['name'].removeprefix('test_')}: {parts}"
            + ("; " + "; ".join(notes) if notes else "")
        )
    return "\n".join(lines)


def _gpu_name(device: str) -> str:
    import torch

    return str(torch.cuda.get_device_name(torch.device(device)))


def device_arg(argv: list[str]) -> tuple[str, list[str]]:
    """``--device cpu|cuda|cuda:N`` (or ``--device=...``) taken out of ``argv``."""
    rest, device = [], "cpu"
    args = iter(argv)
    for arg in args:
        if arg == "--device":
            device = next(args, "")
        elif arg.startswith("--device="):
            device = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if device != "cpu" and device != "cuda" and not device.startswith("cuda:"):
        raise SystemExit(f"error: --device must be cpu, cuda or cuda:N, but got {device!r}")
    return device, rest


def main(argv: list[str]) -> int:
    if argv[:1] == ["--from-json"]:
        print(table(json.loads(Path(argv[1]).read_text())))
        return 0
    device, argv = device_arg(argv)
    if device != "cpu":
        import torch

        if not torch.cuda.is_available():
            print(f"error: --device {device}: this torch sees no CUDA device", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            str(HERE),
            "-q",
            "-p",
            "no:cacheprovider",
            f"--benchmark-json={out}",
            "--benchmark-disable-gc",
            *argv,
        ]
        env = {
            **os.environ,
            "MASKEDCONV_BENCH_DEVICE": device,
            "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
            "MALLOC_TRIM_THRESHOLD_": str(64 << 30),
            "MALLOC_TOP_PAD_": str(256 << 20),
        }
        code = subprocess.call(cmd, env=env)
        if code != 0:
            return code
        data = json.loads(out.read_text())
        data["device"] = device if device == "cpu" else f"{device} ({_gpu_name(device)})"
        print(table(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
