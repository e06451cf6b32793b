"""Per-modality confidence on the true label (docs/semantics.md section 2), batched, fp32, no autograd."""
from __future__ import annotations

from typing import Sequence

import torch


@torch.no_grad()
def scores(logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """s_m = sum_i softmax(z_m)[i, y_i] for every modality, as a float32 tensor [M].

    A label outside [0, C) makes that modality's score NaN (never an out-of-bounds read), so
    the coefficient stage sees a non-finite score and the step's modulation is skipped; the
    caller decides whether to raise (that costs a host sync on accelerators).
    """
    out = []
    y = labels.reshape(-1).to(torch.int64)
    for z in logits:
        z = z.detach().float()
        c = z.shape[1]
        valid = (y >= 0) & (y < c)
        yc = torch.where(valid, y, torch.zeros_like(y))
        lse = torch.logsumexp(z, dim=1)
        p = torch.exp(z.gather(1, yc[:, None]).squeeze(1) - lse)
        p = torch.where(valid, p, torch.full_like(p, float("nan")))
        out.append(p.sum())
    return torch.stack(out) if out else torch.zeros(0)
