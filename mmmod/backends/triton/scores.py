"""Launcher of op ``scores`` (and of the fused scores + coefficients): one launch for all M
modalities (``_scores_partial_kernel``, kernels/score_kernel.py) plus a one-program epilogue
(``_finish_kernel``) that can also evaluate the coefficient rule. No host read of a device
value."""
from __future__ import annotations

import torch

from ...reference.native_rules import METHODS, rule_of
from .launch import launch, next_pow2, on

#: ``_finish_kernel``'s METHOD code of each native coefficient rule name: its NativeRule code
#: (0, NONE: scores only)
METHOD_CODE = {name: int(rule_of(name)) for name in METHODS}


def launch_scores(be, logits, labels, method_code, alpha, beta_max, want_k):
    """Scores [M] (and, with ``want_k``, coefficients [M]) of the logits, float32 on the
    labels' device."""
    K = be.modules
    M = len(logits)
    device = labels.device
    B = labels.shape[0]
    scores = torch.empty(M, dtype=torch.float32, device=device)
    k = torch.empty(M, dtype=torch.float32, device=device) if want_k else scores
    zs = tuple(z.detach() for z in logits)
    max_c = max(z.shape[1] for z in zs)
    block_c = min(next_pow2(max_c), be.score_block_c)
    rows = max(1, min(be.score_rows, next_pow2(B), 4096 // block_c))
    n_blocks = -(-B // rows)
    partial = torch.empty(max(M * n_blocks, 1), dtype=torch.float32, device=device)
    if n_blocks > 0:
        launch(
            K.score._scores_partial_kernel, (n_blocks,),
            zs, tuple(z.stride(0) for z in zs), tuple(z.stride(1) for z in zs),
            tuple(z.shape[1] for z in zs), labels, labels.stride(0), partial, B, n_blocks,
            M=M, ROWS=rows, BLOCK_C=block_c)
    launch(
        K.score._finish_kernel, (1,),
        partial, n_blocks, scores, k, float(alpha), float(beta_max),
        M=M, M_P2=max(2, next_pow2(M)), BLOCK_P=be.block_p,
        METHOD=method_code if want_k else 0, WRITE_SCORES=True)
    return scores, k


def scores(be, logits, labels):
    """The op ``scores(Tensor[] logits, Tensor labels) -> Tensor``."""
    with on(labels.device):
        s, _ = launch_scores(be, list(logits), labels, 0, 0.0, 0.0, want_k=False)
    return s
