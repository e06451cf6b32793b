"""The host's CPU model name, with the standard library only (benchmarks/common.py and
benchmarks/compare_revisions.py, which runs without importing torch, both record it)."""
from __future__ import annotations

import platform


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"
