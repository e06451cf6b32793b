"""Counter-based Gaussian noise: the definition every backend must reproduce.

Definition (``noise_rng="philox"``), for modality ``m`` at optimizer step ``t`` with seed ``S``:
flat element ``e`` of the modality's selected tensors, concatenated in registration order,
receives output ``e % 4`` of

1. Philox4x32-10 with key ``(lo32(S), hi32(S))`` and counter
   ``(lo32(e // 4), hi32(e // 4), t mod 2**32, m)``;
2. each output word ``x`` read as a signed int32, folded to ``x' = x if x >= 0 else -x - 1`` and
   mapped to ``u = float32(x') * 4.6566127342e-10`` (in [0, 1));
3. Box-Muller on the pairs ``(u0, u1)`` and ``(u2, u3)`` in float32:
   ``r = sqrt(-2 log(max(u_a, 1e-7)))``, ``th = 6.283185307179586 * u_b``,
   normals ``(r cos th, r sin th)``.

This is exactly ``tl.randn4x(seed, offset)`` of Triton 3.x with a four-word counter, so the Triton
kernels compute it natively; the C++/CUDA extension shares one ``__host__ __device__`` header.
This module implements it with torch int64 arithmetic (uint32 values held in int64), which is
slow but obviously correct, and bounded in memory by chunking.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53  # round multiplier A (Triton: PHILOX_ROUND_A)
PHILOX_M1 = 0xCD9E8D57  # round multiplier B (Triton: PHILOX_ROUND_B)
PHILOX_W0 = 0x9E3779B9  # key increment A
PHILOX_W1 = 0xBB67AE85  # key increment B
UNIFORM_SCALE = 4.6566127342e-10
TWO_PI = 6.283185307179586
# elements per chunk when the reference materialises noise (bounds its int64 temporaries)
CHUNK = 1 << 18


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product of constant ``a`` and uint32 tensor ``b``.

    Split b into 16-bit halves so every partial product fits in int64 (no signed overflow).
    """
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p_lo = b_lo * a  # < 2**48
    p_hi = b_hi * a  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & MASK32
    return hi & MASK32, lo


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Ten rounds of Philox4x32 on int64 tensors holding uint32 values; key given as ints."""
    for _ in range(10):
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for 32-bit words: float32 in [0, 1)."""
    s = torch.where(x >= (1 << 31), x - (1 << 32), x)  # reinterpret as int32
    s = torch.where(s < 0, -s - 1, s)
    return s.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=x.device)


def box_muller(u_a: torch.Tensor, u_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u_a = torch.clamp_min(u_a, 1.0e-7)
    th = u_b * torch.tensor(TWO_PI, dtype=torch.float32, device=u_b.device)
    r = torch.sqrt(torch.log(u_a) * -2.0)
    return r * torch.cos(th), r * torch.sin(th)


def seed_int64(seed: int) -> int:
    """The seed's low 64 bits (what the key uses) as a signed int64: the value the ops' ``int
    seed`` argument and the Triton kernels' int64 seed carry, with the same bits."""
    s = int(seed) & ((1 << 64) - 1)
    return s - (1 << 64) if s >= (1 << 63) else s


def check_step(step) -> None:
    """A step is a Python int or a 0-d integer tensor (a device counter)."""
    if isinstance(step, torch.Tensor) and (step.dim() != 0 or step.dtype.is_floating_point
                                           or step.dtype == torch.bool):
        raise ValueError(f"step must be an int or a 0-d integer tensor, got a {step.dtype} "
                         f"tensor of shape {tuple(step.shape)}")


def step_word(step: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Counter word 2 from a step held in a 0-d integer tensor: ``step mod 2**32`` (int64),
    computed on ``device`` without reading the value on the host."""
    check_step(step)
    return step.to(device=device, dtype=torch.int64) & MASK32


def normal4(seed: int, step, modality: int, counters: torch.Tensor) -> torch.Tensor:
    """The four normals of each Philox counter in ``counters`` (int64), shape [len, 4].

    ``step``: a Python int, or a 0-d integer tensor (read on the device, never on the host)."""
    seed = int(seed) & ((1 << 64) - 1)
    c0 = counters & MASK32
    c1 = (counters >> 32) & MASK32
    c2 = (torch.zeros_like(counters) + step_word(step, counters.device)
          if isinstance(step, torch.Tensor) else torch.full_like(counters, int(step) & MASK32))
    c3 = torch.full_like(counters, int(modality) & MASK32)
    w = philox4x32_10(c0, c1, c2, c3, seed & MASK32, (seed >> 32) & MASK32)
    n0, n1 = box_muller(uint32_to_uniform(w[0]), uint32_to_uniform(w[1]))
    n2, n3 = box_muller(uint32_to_uniform(w[2]), uint32_to_uniform(w[3]))
    return torch.stack((n0, n1, n2, n3), dim=1)


def philox_normal(seed: int, step: int, modality: int, offset: int, numel: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Noise for flat elements ``offset .. offset + numel - 1`` of a modality: float32 [numel]."""
    out = torch.empty(numel, dtype=torch.float32, device=device)
    for start in range(0, numel, CHUNK):
        out[start:start + CHUNK] = _philox_range(seed, step, modality, offset + start,
                                                 min(CHUNK, numel - start), device)
    return out


def _philox_range(seed, step, modality, offset, numel, device):
    first, last = offset // 4, (offset + numel - 1) // 4
    counters = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    flat = normal4(seed, step, modality, counters).reshape(-1)
    lead = offset - 4 * first
    return flat[lead:lead + numel]
