"""Measured memory bandwidth of the machine, the yardstick for the 12 B/element floor.

``copy``: ``dst.copy_(src)`` of float32 buffers, 8 bytes moved per element (read + write).
``read``: ``src.sum()``, 4 bytes per element. Both at the ResNet-18-pair workload size
(22.3 M elements, 89 MB) and at 4x that. The floor of a two-pass OGM-GE modulation is
12 B/element (read for the statistics, then read + write) at the copy bandwidth.

    python -m benchmarks.bandwidth [--quick|--smoke]
"""
from __future__ import annotations

import torch

from . import common

RESNET_ELEMS = 22_327_552
FLOOR_BYTES = 12


def measure(device: torch.device, numel: int, min_time: float) -> dict:
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t_copy = common.time_fn(lambda: dst.copy_(src), device, min_time=min_time)
    t_read = common.time_fn(lambda: src.sum(), device, min_time=min_time)
    return {"numel": numel,
            "copy_GBps": 8 * numel / t_copy["median_s"] / 1e9, "copy": t_copy,
            "read_GBps": 4 * numel / t_read["median_s"] / 1e9, "read": t_read}


def copy_bandwidth(device: torch.device, numel: int = RESNET_ELEMS, min_time: float = 0.5) -> float:
    """Copy bandwidth in GB/s at ``numel`` float32 elements (for the other benchmarks)."""
    return measure(device, numel, min_time)["copy_GBps"]


def floor_seconds(numel: int, copy_GBps: float, bytes_per_elem: int = FLOOR_BYTES) -> float:
    return bytes_per_elem * numel / (copy_GBps * 1e9)


def run(args) -> dict:
    device = common.pick_device(args.device)
    mt = common.min_time(args, 1.0)
    sizes = [1 << 16] if args.smoke else [RESNET_ELEMS, 4 * RESNET_ELEMS]
    rows, results = [], []
    for n in sizes:
        r = measure(device, n, mt)
        results.append(r)
        rows.append([f"{n / 1e6:.2f} M", f"{4 * n / 1e6:.0f} MB", r["copy_GBps"], r["read_GBps"],
                     common.fmt_time(floor_seconds(n, r["copy_GBps"]))])
    tab = common.table(["elements", "buffer", "copy GB/s (8 B/elem)", "read GB/s (4 B/elem)",
                        "12 B/elem floor at copy BW"], rows)
    print(tab)
    common.write_results("bandwidth", device, args, {"results": results}, tab)
    return {"results": results}


def main(argv=None):
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    with common.session(args):
        return run(args)


if __name__ == "__main__":
    main()
