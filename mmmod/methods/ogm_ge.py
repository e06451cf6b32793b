"""OGM-GE (Peng et al., CVPR 2022): OGM's damping plus Gaussian noise (generalisation
enhancement) with each tensor's own gradient std; the noise needs whole tensors, so sharded
parameters need a cross-shard statistic (not exact per shard)."""
from __future__ import annotations

from .base import register
from .ogm import OGM


class OGMGE(OGM):
    name = "ogm_ge"
    summary = "OGM + Gaussian noise with each tensor's gradient std (generalisation enhancement)"
    noise = True
    shard_safe = False  # sigma is a whole-tensor statistic


register(OGMGE())
