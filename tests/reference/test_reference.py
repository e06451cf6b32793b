"""The reference against a literal, per-sample transcription of docs/semantics.md (fresh seeds)."""
import math

import numpy as np
import pytest
import torch

from mmmod import functional, reference
from mmmod.reference import philox


# ---- literal transcriptions ---------------------------------------------------------------
def spec_scores(logits, labels):
    out = []
    for z in logits:
        total = 0.0
        for i in range(z.shape[0]):
            row = z[i].double()
            total += float(torch.softmax(row, 0)[int(labels[i])])
        out.append(total)
    return out


def spec_ogm(s, alpha):
    if len(s) == 2:
        rho1 = s[1] / s[0]
        rho0 = 1 / rho1
        if rho1 > 1:
            return [1.0, 1 - math.tanh(alpha * rho1)]
        return [1 - math.tanh(alpha * rho0), 1.0]
    out = []
    for m in range(len(s)):
        others = [s[j] for j in range(len(s)) if j != m]
        rho = s[m] / (sum(others) / len(others))
        out.append(1 - math.tanh(alpha * rho) if rho > 1 else 1.0)
    return out


def spec_mlb(s, alpha, beta_max):
    out = []
    for m in range(len(s)):
        others = [s[j] for j in range(len(s)) if j != m]
        r = (sum(others) / len(others)) / s[m]
        beta = beta_max if r > 1 else 2.0
        out.append(1 + (beta - 1) * math.tanh(alpha * (r - 1)))
    return out


def py_philox(seed, counter):
    """Philox4x32-10 on Python ints (independent of the torch implementation)."""
    c = list(counter)
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    for _ in range(10):
        p0 = 0xD2511F53 * c[0]
        p1 = 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & 0xFFFFFFFF, p1 & 0xFFFFFFFF,
             ((p0 >> 32) ^ c[3] ^ k1) & 0xFFFFFFFF, p0 & 0xFFFFFFFF]
        k0 = (k0 + 0x9E3779B9) & 0xFFFFFFFF
        k1 = (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c


def py_normals(seed, step, modality, e):
    q = e // 4
    w = py_philox(seed, (q & 0xFFFFFFFF, q >> 32, step & 0xFFFFFFFF, modality))
    u = []
    for x in w:
        x = x - (1 << 32) if x >= (1 << 31) else x
        x = -x - 1 if x < 0 else x
        u.append(float(np.float32(x) * np.float32(4.6566127342e-10)))
    out = []
    for a, b in ((u[0], u[1]), (u[2], u[3])):
        r = math.sqrt(-2 * math.log(max(a, 1e-7)))
        th = float(np.float32(6.283185307179586) * np.float32(b))
        out += [r * math.cos(th), r * math.sin(th)]
    return out[e % 4]


# ---- Philox ----------------------------------------------------------------------------
def test_philox_known_answer():
    # Random123's published known-answer vectors for philox4x32_10
    c0, c1, c2, c3 = (torch.tensor([v], dtype=torch.int64) for v in (0, 0, 0, 0))
    assert [int(x) for x in philox.philox4x32_10(c0, c1, c2, c3, 0, 0)] == \
        [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ff = torch.tensor([0xFFFFFFFF], dtype=torch.int64)
    assert [int(x) for x in philox.philox4x32_10(ff, ff, ff, ff, 0xFFFFFFFF, 0xFFFFFFFF)] == \
        [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def test_philox_matches_python_ints(seed):
    rng = np.random.default_rng(seed)
    key = int(rng.integers(0, 2**63))
    step, mod = int(rng.integers(0, 2**40)), int(rng.integers(0, 4))
    offset = int(rng.integers(0, 2**34))
    n = 13
    got = philox.philox_normal(key, step, mod, offset, n)
    want = torch.tensor([py_normals(key, step, mod, offset + i) for i in range(n)], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=2e-6)


def test_philox_offsets_are_a_stream(seed):
    whole = philox.philox_normal(seed, 3, 1, 0, 37)
    parts = torch.cat([philox.philox_normal(seed, 3, 1, a, b - a)
                       for a, b in ((0, 5), (5, 6), (6, 21), (21, 37))])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, philox.philox_normal(seed, 4, 1, 0, 37))  # step matters
    assert not torch.equal(whole, philox.philox_normal(seed, 3, 0, 0, 37))  # modality matters


def test_philox_statistics(seed):
    from scipy import stats
    z = philox.philox_normal(seed, seed % 1000, 0, 0, 200_000).double()
    assert abs(z.mean()) < 0.015 and abs(z.std() - 1) < 0.015
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-4


# ---- scores and coefficients ---------------------------------------------------------------
@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scores_match_spec(seed, m, dtype):
    b, c = 1 + seed % 17, 1 + seed % 11
    logits = [(torch.randn(b, c) * 4).to(dtype) for _ in range(m)]
    labels = torch.randint(0, c, (b,))
    got = functional.scores(logits, labels, backend="torch")
    assert got.dtype == torch.float32 and got.shape == (m,)
    want = spec_scores([z.float() for z in logits], labels)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)


def test_scores_noncontiguous_and_empty(seed):
    z = torch.randn(7, 10)[:, ::2]
    y = torch.randint(0, 5, (7,))
    torch.testing.assert_close(functional.scores([z, z.t().contiguous().t()], y, backend="torch"),
                               torch.tensor(spec_scores([z, z], y), dtype=torch.float32))
    empty = functional.scores([torch.zeros(0, 3), torch.zeros(0, 3)], torch.zeros(0, dtype=torch.long))
    assert torch.equal(empty, torch.zeros(2))


def test_scores_without_autograd():
    z = torch.randn(4, 3, requires_grad=True)
    s = functional.scores([z, z * 2], torch.tensor([0, 1, 2, 0]), backend="torch")
    assert not s.requires_grad


def test_out_of_range_label_gives_nan():
    s = functional.scores([torch.randn(3, 4), torch.randn(3, 6)], torch.tensor([0, 5, 1]),
                          backend="torch")
    assert torch.isnan(s[0]) and torch.isfinite(s[1])


@pytest.mark.parametrize("m", [2, 3, 4])
def test_ogm_coefficients_match_spec(seed, m):
    g = torch.Generator().manual_seed(seed)
    for alpha in (0.1, 0.8, 3.0):
        s = torch.rand(m, generator=g) * 10 + 0.01
        want = spec_ogm([float(x) for x in s], alpha)
        got = functional.coefficients(s, "ogm_ge", alpha=alpha)
        torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64),
                                   rtol=2e-6, atol=2e-6)


def test_ogm_tie_rule_and_jump():
    s = torch.tensor([2.5, 2.5])
    k = functional.coefficients(s, "ogm", alpha=0.8)
    assert k[1] == 1 and abs(float(k[0]) - (1 - math.tanh(0.8))) < 1e-6  # tie damps modality 0
    k_up = functional.coefficients(torch.tensor([2.5, 2.5000002]), "ogm", alpha=0.8)
    assert k_up[0] == 1 and k_up[1] < 0.34
    # M > 2 with everyone equal: nobody leads, nobody is damped
    assert torch.equal(functional.coefficients(torch.full((3,), 2.0), "ogm", alpha=0.8), torch.ones(3))


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("beta_max", [2.0, 10.0])
def test_mlb_coefficients_match_spec(seed, m, beta_max):
    s = torch.rand(m, generator=torch.Generator().manual_seed(seed)) * 5 + 0.05
    want = spec_mlb([float(x) for x in s], 0.5, beta_max)
    got = functional.coefficients(s, "mlb", alpha=0.5, beta_max=beta_max)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64),
                               rtol=2e-6, atol=2e-6)
    lag = int(torch.argmin(s))
    assert got[lag] > 1  # the lagging modality is accelerated


def test_nan_score_poisons_all_coefficients():
    for method in ("ogm", "mlb"):
        k = functional.coefficients(torch.tensor([1.0, float("nan"), 2.0]), method)
        assert torch.isnan(k).all()


def test_default_alphas():
    s = torch.tensor([1.0, 3.0])
    assert torch.equal(functional.coefficients(s, "ogm_ge"), functional.coefficients(s, "ogm", alpha=0.1))
    assert torch.equal(functional.coefficients(s, "mlb"), functional.coefficients(s, "mlb", alpha=0.5))


# ---- modulation ------------------------------------------------------------------------
def spec_modulate(grads, coeffs, noise, noise_std, seed, step):
    """Per tensor, per element, straight from docs/semantics.md sections 4 and 5 (Philox)."""
    out = []
    for m, tensors in enumerate(grads):
        k = float(coeffs[m])
        off, res = 0, []
        for g in tensors:
            n = g.numel()
            flat = g.double().reshape(-1)
            if noise and n:
                std = float(flat.std()) if n > 1 else 0.0
                sigma = (abs(k) * std if noise_std == "scaled" else std) + 1e-8
                z = torch.tensor([py_normals(seed, step, m, off + i) for i in range(n)],
                                 dtype=torch.float64)
                flat = flat * k + sigma * z
            else:
                flat = flat * k
            res.append(flat.reshape(g.shape))
            off += n
        out.append(res)
    return out


@pytest.mark.parametrize("noise_std", ["raw", "scaled"])
@pytest.mark.parametrize("m", [2, 3])
def test_modulation_matches_spec(seed, noise_std, m):
    shapes = [(3, 2, 3, 3), (0,), (1,), (5, 7), (11,)]
    grads = [[torch.randn(s) for s in shapes] for _ in range(m)]
    coeffs = torch.rand(m) * 2
    want = spec_modulate(grads, coeffs, True, noise_std, seed, 7)
    functional.modulate_(grads, coeffs, noise=True, noise_std=noise_std, seed=seed, step=7,
                         backend="torch")
    for gs, ws in zip(grads, want):
        for g, w in zip(gs, ws):
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scale_only_is_exact(seed, dtype):
    grads = [[torch.randn(4, 3, 3, 3).to(dtype), torch.randn(17).to(dtype)] for _ in range(2)]
    before = [[g.clone() for g in gs] for gs in grads]
    coeffs = torch.tensor([0.3, 1.7])
    functional.modulate_(grads, coeffs, noise=False, backend="torch")
    for m in range(2):
        for g, b in zip(grads[m], before[m]):
            assert g.dtype == dtype
            assert torch.equal(g, (b.float() * coeffs[m]).to(dtype))


def test_noncontiguous_grad_uses_logical_order(seed):
    base = torch.randn(6, 8)
    nc = base.clone().t()  # non-contiguous view
    c = nc.contiguous()
    coeffs = torch.tensor([0.5, 1.0])
    functional.modulate_([[nc], [torch.randn(3)]], coeffs, noise=True, seed=seed, backend="torch")
    functional.modulate_([[c], [torch.randn(3)]], coeffs, noise=True, seed=seed, backend="torch")
    assert torch.equal(nc, c)


def test_nan_coefficients_leave_grads_untouched(seed):
    grads = [[torch.randn(5, 5)], [torch.randn(7)]]
    before = [[g.clone() for g in gs] for gs in grads]
    functional.modulate_(grads, torch.tensor([float("nan"), 1.0]), noise=True, seed=seed,
                         backend="torch")
    for gs, bs in zip(grads, before):
        for g, b in zip(gs, bs):
            assert torch.equal(g, b)


def test_torch_rng_reproduces_official_code():
    """noise_rng="torch" consumes the generator exactly as the official loop does."""
    torch.manual_seed(1)
    a = [[torch.randn(3, 2, 3, 3), torch.randn(4, 4, 1, 1)], [torch.randn(2, 3, 3, 3)]]
    b = [[g.clone() for g in gs] for gs in a]
    coeffs = torch.tensor([1.0, 0.25])
    torch.manual_seed(123)
    for m, gs in enumerate(b):  # the official code, verbatim arithmetic
        for i, g in enumerate(gs):
            gs[i] = g * float(coeffs[m]) + torch.zeros_like(g).normal_(0, g.std().item() + 1e-8)
    torch.manual_seed(123)
    functional.modulate_(a, coeffs, noise=True, noise_rng="torch", backend="torch")
    for ga, gb in zip(a, b):
        for x, y in zip(ga, gb):
            assert torch.equal(x, y)


def test_one_element_sigma_is_eps():
    g = torch.tensor([3.0])
    assert float(reference.tensor_sigma(g, torch.tensor(1.0), "raw")) == pytest.approx(1e-8)
