"""Contender (a): the official OGM-GE code's eager algorithm, transcribed (docs/semantics.md section 6).

From the official ``main.py`` (GeWu-Lab/OGM-GE_CVPR2022), per training step::

    score_v = sum([softmax(out_v)[i][label[i]] for i in range(out_v.size(0))])
    score_a = sum([softmax(out_a)[i][label[i]] for i in range(out_a.size(0))])
    ratio_v = score_v / score_a
    ratio_a = 1 / ratio_v
    if ratio_v > 1:
        coeff_v = 1 - tanh(args.alpha * relu(ratio_v)); coeff_a = 1
    else:
        coeff_a = 1 - tanh(args.alpha * relu(ratio_a)); coeff_v = 1
    ...
    for name, parms in model.named_parameters():
        layer = str(name).split('.')[1]
        if 'audio' in layer and len(parms.grad.size()) == 4:
            parms.grad = parms.grad * coeff_a + \
                torch.zeros_like(parms.grad).normal_(0, parms.grad.std().item() + 1e-8)
        if 'visual' in layer and len(parms.grad.size()) == 4:
            ...

Costs kept on purpose: the softmax is recomputed for every sample inside the comprehension,
each ``[label[i]]`` indexes with a 0-d device tensor (a host sync), the ``if`` reads the ratio
on the host, ``.std().item()`` syncs once per tensor, every parameter name is split in Python,
``zeros_like().normal_()`` and ``g * k + noise`` allocate temporaries (~32 B/element of
traffic). The only liberty: with ``hoist_softmax=True`` the softmax is computed once per
modality (for the large score grids, where B softmaxes of a [B, C] matrix per call would take
minutes); the benchmarks record when they use it.

For M > 2 (the official code has two modalities only) the same style is extended with the
maintainer's one-to-others rule, one host ``if`` per modality.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

softmax = nn.Softmax(dim=1)
relu = nn.ReLU(inplace=True)
tanh = nn.Tanh()


def score(out: torch.Tensor, label: torch.Tensor, hoist_softmax: bool = False):
    """``sum([softmax(out)[i][label[i]] for i in range(out.size(0))])``."""
    if hoist_softmax:
        p = softmax(out)
        return sum([p[i][label[i]] for i in range(out.size(0))])
    return sum([softmax(out)[i][label[i]] for i in range(out.size(0))])


def scores(logits: Sequence[torch.Tensor], label: torch.Tensor, hoist_softmax: bool = False):
    """One score per modality (0-d tensors), in modality order."""
    return [score(z, label, hoist_softmax) for z in logits]


def coefficients(s, alpha: float):
    """Official two-modality rule (M = 2) or one-to-others (M > 2), with host ``if``s.

    Returns a list of coefficients, each the int 1 or a 0-d tensor, as the official code.
    """
    if len(s) == 2:
        score_a, score_v = s
        ratio_v = score_v / score_a
        ratio_a = 1 / ratio_v
        if ratio_v > 1:
            coeff_v = 1 - tanh(alpha * relu(ratio_v))
            coeff_a = 1
        else:
            coeff_a = 1 - tanh(alpha * relu(ratio_a))
            coeff_v = 1
        return [coeff_a, coeff_v]
    out = []
    for m in range(len(s)):
        others = sum(s[j] for j in range(len(s)) if j != m) / (len(s) - 1)
        ratio = s[m] / others
        if ratio > 1:
            out.append(1 - tanh(alpha * relu(ratio)))
        else:
            out.append(1)
    return out


def modulate(model: nn.Module, coeffs, names: Sequence[str], dim_test: Callable[[int], bool],
             noise: bool = True) -> None:
    """The official loop over ``model.named_parameters()`` (OGM-GE when ``noise``, else OGM)."""
    for name, parms in model.named_parameters():
        layer = str(name).split('.')[1]
        for m, modality in enumerate(names):
            if modality in layer and dim_test(len(parms.grad.size())):
                if noise:
                    parms.grad = parms.grad * coeffs[m] + \
                        torch.zeros_like(parms.grad).normal_(0, parms.grad.std().item() + 1e-8)
                else:
                    parms.grad *= coeffs[m]


def full_step(model, logits, label, alpha, names, dim_test, noise=True, hoist_softmax=False):
    """Scores, coefficients and modulation of one step, as the official code does them."""
    s = scores(logits, label, hoist_softmax)
    k = coefficients(s, alpha)
    modulate(model, k, names, dim_test, noise)
    return k


def as_tensor(coeffs, device=None) -> torch.Tensor:
    """The coefficients as a float32 tensor [M] (for comparing with the other contenders)."""
    return torch.stack([torch.as_tensor(c, dtype=torch.float32, device=device).reshape(())
                        for c in coeffs])
