"""AGM's coefficients on synthetic per-batch loss sequences, no training: how far the official
rule's upper tail reaches for a given gap between the modalities' mean NLLs, and what the
default ``agm`` (k bounded by 2) makes of the same sequence (docs/demo.md, "AGM's safe
default").

    python -m benchmarks.agm_rule_replay
"""
from __future__ import annotations

import torch

from mmmod import functional, methods

CASES = ((0.6, 0.15), (1.0, 0.3), (2.0, 0.3), (3.0, 0.4))  # (gap in nats, per-batch sd)


def replay(name: str, gap: float, sd: float, steps: int = 500, alpha: float = 1.5,
           seed: int = 0) -> torch.Tensor:
    """k [steps, 2] for s_a = 0.3 + noise, s_v = 0.3 + gap + noise (clamped at 0.01)."""
    g = torch.Generator().manual_seed(seed)
    state = methods.get(name).init_state(2)
    out = []
    for _ in range(steps):
        s = (torch.tensor([0.3, 0.3 + gap]) + torch.randn(2, generator=g) * sd).clamp_min(0.01)
        out.append(functional.coefficients(s, name, alpha=alpha, state=state, backend="torch"))
    return torch.stack(out)


def main() -> None:
    print("| gap (nats) / batch sd | official: max k | steps with k > 2 / > 10 / > 100 | `agm`: max k |")
    print("|---|---|---|---|")
    for gap, sd in CASES:
        k = replay("agm_official", gap, sd)
        kb = replay("agm", gap, sd)
        top = k.amax(1)
        print(f"| {gap} / {sd} | {float(k.max()):.3g} | {int((top > 2).sum())} / {int((top > 10).sum())} / "
              f"{int((top > 100).sum())} | {float(kb.max()):.3g} |")


if __name__ == "__main__":
    main()
