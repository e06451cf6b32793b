"""Per-tensor float64 moments ``(count, mean, M2)`` (``mmmod::_bucket_moments``): the
statistics sharded OGM-GE gathers and merges (mmmod/optim/sharding.py), in plain torch."""
from __future__ import annotations

import torch


#: the dtypes _bucket_moments reads (every kernel converts them to float64 exactly)
MOMENT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_moments_inputs(tensors) -> None:
    """Metadata checks of ``_bucket_moments`` (the same as the C++ kernels', same messages):
    floating dtypes it reads, one dtype and one device. Reads no device value."""
    for i, t in enumerate(tensors):
        if t.dtype not in MOMENT_DTYPES:
            raise TypeError(f"mmmod._bucket_moments: tensor {i} is {t.dtype}; expected float32, "
                            f"float16, bfloat16 or float64")
        t0 = tensors[0]
        if t.dtype != t0.dtype or t.device != t0.device:
            raise ValueError(f"mmmod._bucket_moments: a bucket holds one dtype and device; "
                             f"tensor {i} is {t.dtype} on {t.device}, tensor 0 is {t0.dtype} on "
                             f"{t0.device}")


def bucket_moments(tensors):
    """Per tensor, in float64: count, mean, and M2 = the sum of squared deviations from that
    mean (two passes over a float64 copy), stacked ``[T, 3]``."""
    check_moments_inputs(tensors)
    device = tensors[0].device if tensors else torch.device("cpu")
    rows = []
    for t in tensors:
        if t.numel() == 0:
            rows.append(torch.zeros(3, dtype=torch.float64, device=device))
            continue
        x = t.detach().reshape(-1).double()
        mean = x.mean()
        rows.append(torch.stack([torch.full((), x.numel(), dtype=torch.float64, device=device),
                                 mean, (x - mean).square().sum()]))
    if not rows:
        return torch.zeros((0, 3), dtype=torch.float64, device=device)
    return torch.stack(rows)
