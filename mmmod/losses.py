"""The MLB objective: L = CE(fused) + sum_m w_m CE(z_m) (docs/semantics.md section 1)."""
from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch
import torch.nn.functional as F

Logits = Union[Sequence[torch.Tensor], Mapping[str, torch.Tensor]]


def multi_loss(fused_logits: torch.Tensor, unimodal_logits: Logits, labels: torch.Tensor,
               weights: Union[Sequence[float], Mapping[str, float], None] = None) -> torch.Tensor:
    """Cross-entropy of the fused head plus the weighted unimodal heads' cross-entropies."""
    if isinstance(unimodal_logits, Mapping):
        names = list(unimodal_logits)
        heads = [unimodal_logits[n] for n in names]
        if isinstance(weights, Mapping):
            unknown = set(weights) - set(names)
            if unknown:
                raise KeyError(f"weights name unknown modalities {sorted(unknown)}; have {names}")
            weights = [float(weights.get(n, 1.0)) for n in names]
    else:
        heads = list(unimodal_logits)
    if weights is None:
        weights = [1.0] * len(heads)
    if isinstance(weights, Mapping) or len(weights) != len(heads):
        raise ValueError(f"need one weight per unimodal head ({len(heads)}), got {weights!r}")
    names = names if isinstance(unimodal_logits, Mapping) else list(range(len(heads)))
    if torch.is_grad_enabled() and fused_logits.requires_grad:
        for n, z in zip(names, heads):
            if isinstance(z, torch.Tensor) and not z.requires_grad:
                # e.g. mmmod.fusion.concat_logits / sum_logits: detached by design (scores
                # only), so their cross-entropy would add to the loss but not to any gradient
                raise ValueError(
                    f"unimodal logits {n!r} do not require grad, so their loss term would "
                    f"train nothing (mmmod.fusion.concat_logits / sum_logits are detached: "
                    f"they are for observe() only). MLB's objective needs unimodal heads with "
                    f"grad, e.g. head_m(encoder_m(x_m)); see examples/mlb_unimodal_heads.py")
    loss = F.cross_entropy(fused_logits, labels)
    for w, z in zip(weights, heads):
        loss = loss + w * F.cross_entropy(z, labels)
    return loss
