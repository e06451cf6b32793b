"""OGM-GE (Peng et al., CVPR 2022): OGM's damping plus Gaussian noise (generalisation
enhancement) with each tensor's own gradient std. Exact on sharded parameters: the shards of a
tensor gather its std and draw their slices of its noise (``mmmod.optim.sharding``)."""
from __future__ import annotations

from .base import register
from .ogm import OGM


class OGMGE(OGM):
    name = "ogm_ge"
    summary = "OGM + Gaussian noise with each tensor's gradient std (generalisation enhancement)"
    noise = True
    # sigma is a whole-tensor statistic: under sharding the shards gather it (optim.sharding)
    shard_safe = True


register(OGMGE())
