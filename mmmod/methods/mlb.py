"""MLB (Kontras et al., BMVC 2024): slow the leader and speed up the laggards in one rule."""
from __future__ import annotations

from ..reference.coefficients import mlb_coefficients
from .base import Method, register


class MLB(Method):
    name = "mlb"
    summary = "multi-loss balancing: k = 1 + (beta - 1) tanh(alpha (r - 1)), beta <= beta_max"
    default_alpha = 0.5  # the MLB code's CREMA-D setting
    default_filter = "all"
    native = "mlb"
    hyperparameters = ("alpha", "beta_max")

    def coefficients(self, scores, *, alpha, beta_max, state):
        return mlb_coefficients(scores, alpha, beta_max)


register(MLB())
