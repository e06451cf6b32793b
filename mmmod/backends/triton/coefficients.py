"""Launcher of op ``coefficients``: the native OGM / MLB rule evaluated on the device by the
scores epilogue (``_finish_kernel`` of kernels/score_kernel.py fed the scores as an [M, 1]
table), and the fused scores + coefficients of :meth:`TritonBackend.scores_and_coefficients`."""
from __future__ import annotations

import torch

from ...reference.native_rules import rule_of
from .launch import launch, next_pow2, on
from .scores import METHOD_CODE, launch_scores


def check_args(M, method):
    if M < 2:
        raise ValueError(f"scores must be a 1-D tensor of M >= 2 modalities, got M = {M}")
    if method not in METHOD_CODE:
        from ...reference.coefficients import METHODS
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def coefficients(be, scores, rule, alpha, beta_max):
    """The op ``coefficients(Tensor scores, int rule, float alpha, float beta_max) -> Tensor``
    (``rule``: a NativeRule code; a method name is accepted too)."""
    method = rule_of(rule).label
    if scores.dim() != 1:
        raise ValueError(f"scores must be a 1-D tensor of M >= 2 modalities, got shape "
                         f"{tuple(scores.shape)}")
    M = scores.shape[0]
    check_args(M, method)
    if method == "none":
        return torch.ones(M, dtype=torch.float32, device=scores.device)
    s = scores.detach().float().contiguous()
    k = torch.empty(M, dtype=torch.float32, device=s.device)
    with on(s.device):
        launch(
            be.modules.score._finish_kernel, (1,),
            s, 1, k, k, float(alpha), float(beta_max), M=M, M_P2=next_pow2(M), BLOCK_P=2,
            METHOD=METHOD_CODE[method], WRITE_SCORES=False)
    return k


def scores_and_coefficients(be, logits, labels, method, alpha, beta_max=2.0):
    """Scores [M] and coefficients [M] in one launch plus one epilogue (no host sync)."""
    logits = list(logits)
    check_args(len(logits), method)
    if method == "none":
        s = be.scores(logits, labels)
        return s, torch.ones_like(s)
    with on(labels.device):
        return launch_scores(be, logits, labels, METHOD_CODE[method], alpha, beta_max,
                             want_k=True)
