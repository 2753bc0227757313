"""Run the benchmarks once and print the ratio table.

    python benchmarks/report.py            # all cases, a few minutes on 2 cores
    python benchmarks/report.py -k conv    # a subset (any pytest arguments)
    python benchmarks/report.py --from-json runs/bench.json   # print an earlier run

Every ratio is between medians of variants timed interleaved in the same process.
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


def check(value: float, target: str | None) -> str:
    if not target:
        return ""
    op, bound = target.split()
    ok = value <= float(bound) if op == "<=" else value >= float(bound)
    return f"{target}  {'met' if ok else 'MISSED'}"


def table(data: dict) -> str:
    lines = []
    info = data.get("machine_info", {})
    lines.append(
        f"machine: {info.get('cpu', {}).get('brand_raw', platform.processor())}, "
        f"{os.cpu_count()} logical cores; python {info.get('python_version', '')}"
    )
    lines.append("")
    lines.append(f"| {'case':<58} | {'ratio':<40} | {'value':>8} | target |")
    lines.append(f"|{'-' * 60}|{'-' * 42}|{'-' * 10}|--------|")
    for bench in data["benchmarks"]:
        extra = bench["extra_info"]
        case = bench["name"].removeprefix("test_")
        for r in extra["ratios"]:
            status = check(r["value"], r["target"])
            lines.append(f"| {case:<58} | {r['name']:<40} | {r['value']:>8.3f} | {status} |")
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
        if "naive_note" in extra:
            notes.append(extra["naive_note"])
        lines.append(
            f"- {bench['name'].removeprefix('test_')}: {parts}"
            + ("; " + "; ".join(notes) if notes else "")
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--from-json"]:
        print(table(json.loads(Path(argv[1]).read_text())))
        return 0
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
            "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
            "MALLOC_TRIM_THRESHOLD_": str(64 << 30),
            "MALLOC_TOP_PAD_": str(256 << 20),
        }
        code = subprocess.call(cmd, env=env)
        if code != 0:
            return code
        print(table(json.loads(out.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
