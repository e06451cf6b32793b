"""Scores and coefficients (docs/semantics.md: "Scores", "Coefficients"): all M modalities in
one launch plus a one-program epilogue.

``_scores_partial_kernel``: grid ``(cdiv(B, ROWS),)``. Every program takes ROWS rows of the
batch and, for each modality m (a static loop: the logits arrive as a tuple of tensors, one
pointer per modality, each with its own dtype, row stride, column stride and C; nothing is
copied or concatenated), computes a chunked online log-sum-exp over C in float32 (BLOCK_C
columns at a time, so C = 32k is a loop, not a register tile), reads z[i, y_i] with one masked
load, and writes the partial ``sum_i exp(z[i, y_i] - lse_i)`` to ``partial[m, pid]``.
A label outside [0, C_m) is never dereferenced: the load is masked off and that row
contributes NaN, so the modality's score is NaN, as in the reference.

``_finish_kernel``: one program; sums ``partial[m, :]`` in a fixed order (blocked vector
accumulation, then one in-register tree sum: the same order on every run and rank, no atomics),
writes the scores and evaluates the OGM / MLB coefficient rule on the device. The same kernel
computes coefficients from given scores (``partial`` = the scores as an [M, 1] table).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .utils import tanh_f32

@triton.jit
def _scores_partial_kernel(zs, srows, scols, cs, labels, label_stride, partial, B, n_blocks,
                           M: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    y = tl.load(labels + rows64 * label_stride, mask=row_ok, other=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    for m in tl.static_range(M):
        z_ptr = zs[m]
        srow = srows[m]
        scol = scols[m]
        C = cs[m]
        row_base = z_ptr + rows64[:, None] * srow
        run_max = tl.full([ROWS], float("-inf"), tl.float32)
        run_sum = tl.zeros([ROWS], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cols
            msk = row_ok[:, None] & (cc < C)[None, :]
            x = tl.load(row_base + cc.to(tl.int64)[None, :] * scol, mask=msk,
                        other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(run_max, tl.max(x, axis=1))
            new_max = tl.where(run_max != run_max, run_max, new_max)  # keep NaN
            # shift as torch.logsumexp: an infinite max is replaced by 0
            old_shift = tl.where(tl.abs(run_max) == float("inf"), 0.0, run_max)
            new_shift = tl.where(tl.abs(new_max) == float("inf"), 0.0, new_max)
            scale = tl.exp(old_shift - new_shift)
            chunk = tl.sum(tl.exp(x - new_shift[:, None]), axis=1)
            run_sum = tl.where(run_sum == 0.0, 0.0, run_sum * scale) + chunk
            run_max = new_max
        shift = tl.where(tl.abs(run_max) == float("inf"), 0.0, run_max)
        lse = tl.log(tl.where(row_ok, run_sum, 1.0)) + shift
        ok = (y >= 0) & (y < C)
        zy = tl.load(z_ptr + rows64 * srow + tl.where(ok, y, 0) * scol, mask=row_ok & ok,
                     other=0.0).to(tl.float32)
        p = tl.exp(zy - lse)
        p = tl.where(ok, p, float("nan"))
        p = tl.where(row_ok, p, 0.0)
        tl.store(partial + m * n_blocks + pid, tl.sum(p, axis=0))


@triton.jit
def _finish_kernel(partial, n_blocks, scores_out, k_out, alpha, beta_max,
                   M: tl.constexpr, M_P2: tl.constexpr, BLOCK_P: tl.constexpr,
                   METHOD: tl.constexpr, WRITE_SCORES: tl.constexpr):
    mi = tl.arange(0, M_P2)
    m_ok = mi < M
    pj = tl.arange(0, BLOCK_P)
    acc = tl.zeros([M_P2, BLOCK_P], tl.float32)
    for b0 in range(0, n_blocks, BLOCK_P):
        bj = b0 + pj
        acc += tl.load(partial + mi[:, None] * n_blocks + bj[None, :],
                       mask=m_ok[:, None] & (bj < n_blocks)[None, :], other=0.0)
    s = tl.sum(acc, axis=1)
    if WRITE_SCORES:
        tl.store(scores_out + mi, s, mask=m_ok)
    if METHOD != 0:
        bad = tl.sum(tl.where(m_ok & (s != s), 1, 0), axis=0) > 0
        one = tl.full([M_P2], 1.0, tl.float32)
        # sum of the other scores in index order (adding an exact 0 for j == m changes nothing)
        others = tl.zeros([M_P2], tl.float32)
        for j in tl.static_range(M):
            sj = tl.sum(tl.where(mi == j, s, 0.0), axis=0)
            others = others + tl.where(mi == j, 0.0, sj)
        mean_o = tl.math.div_rn(others, tl.full([M_P2], M - 1, tl.float32))
        if METHOD == 1:
            if M == 2:
                s0 = tl.sum(tl.where(mi == 0, s, 0.0), axis=0)
                s1 = tl.sum(tl.where(mi == 1, s, 0.0), axis=0)
                rho1 = tl.math.div_rn(s1 + 0.0 * one, s0 + 0.0 * one)
                rho0 = tl.math.div_rn(one, rho1)
                first_leads = rho1 > 1.0
                k1 = tl.where(first_leads, 1.0 - tanh_f32(alpha * rho1), one)
                k0 = tl.where(first_leads, one, 1.0 - tanh_f32(alpha * rho0))
                k = tl.where(mi == 0, k0, k1)
            else:
                rho = tl.math.div_rn(s, mean_o)
                k = tl.where(rho > 1.0, 1.0 - tanh_f32(alpha * rho), one)
        else:
            r = tl.math.div_rn(mean_o, s)
            beta = tl.where(r > 1.0, beta_max + 0.0 * one, 2.0 * one)
            k = 1.0 + (beta - 1.0) * tanh_f32(alpha * (r - 1.0))
        k = tl.where(bad, float("nan"), k)
        tl.store(k_out + mi, k, mask=m_ok)
