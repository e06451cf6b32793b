"""OGM (Peng et al., CVPR 2022): damp the modality that leads the others, no noise."""
from __future__ import annotations

from ..reference.coefficients import ogm_coefficients
from .base import Method, register


class OGM(Method):
    name = "ogm"
    summary = "on-the-fly gradient modulation: k = 1 - tanh(alpha * rho) for the leader"
    # official README default; the paper uses 0.8 on CREMA-D and 0.1 on VGGSound
    default_alpha = 0.1
    default_filter = "conv"  # the official code modulates 4-D (conv) weights only
    native = "ogm"

    def coefficients(self, scores, *, alpha, beta_max, state):
        return ogm_coefficients(scores, alpha)


register(OGM())
