"""``method="none"``: no modulation (the wrapper only runs the inner step; scores, when
observed, are still computed and reported). The baseline of every comparison."""
from __future__ import annotations

import torch

from .base import Method, register


class NoModulation(Method):
    name = "none"
    summary = "no modulation (baseline); scores still computed when observed"
    default_alpha = 0.0
    modulates = False

    def coefficients(self, scores, *, alpha, beta_max, state):
        return torch.ones_like(scores, dtype=torch.float32)


register(NoModulation())
