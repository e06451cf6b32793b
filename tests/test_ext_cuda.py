"""Parity of the compiled ``cuda`` backend with the reference (needs a GPU and the CUDA build).

Same tolerances as tests/test_cpu_ext.py: OGM/MLB scaling bit-identical, noise within 1e-6
relative (absolute floor 1e-7) of the reference Philox, scores/coefficients within fp32 rounding.
Also: no host sync in modulate_/scores/coefficients, run-to-run bit identity, > 2^31 elements.
"""
import pytest
import torch

from mmmod import backends, reference
from mmmod.reference import philox

LIVE, WHY = backends.status("cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not LIVE, reason=f"CUDA extension (backend 'cuda') not available: {WHY}")]

CHUNK = 1 << 16  # MMMOD_CUDA_CHUNK
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


@pytest.fixture
def cuda():
    return backends.get("cuda", "cuda")


def offsets_of(ts):
    out, run = [], 0
    for t in ts:
        out.append(run)
        run += t.numel()
    return out


def both(cuda, ts, *, noise, noise_std="raw", k=0.45, gate=1.0, seed=0, step=0, modality=0):
    offs = offsets_of(ts)
    a = [t.cuda() for t in ts]
    b = [t.clone() for t in ts]
    cuda.modulate_bucket_(a, offs, torch.tensor(k, device="cuda"), torch.tensor(gate, device="cuda"),
                          noise=noise, noise_std=noise_std, seed=seed, step=step, modality=modality)
    reference.modulate_bucket_(b, offs, torch.tensor(k), torch.tensor(gate), noise=noise,
                               noise_std=noise_std, seed=seed, step=step, modality=modality)
    return [x.cpu() for x in a], b, offs


@pytest.mark.parametrize("M", [2, 3, 4])
def test_scores_and_coefficients(cuda, seed, M):
    for B, C in ((1, 1), (7, 3), (513, 31)):
        logits = [(torch.randn(C, B) * 3).t().to(DTYPES[m % 3]) for m in range(M)]
        labels = torch.randint(0, C, (B,))
        labels[0] = C if M == 4 else labels[0]
        got = cuda.scores([z.cuda() for z in logits], labels.cuda()).cpu()
        torch.testing.assert_close(got, reference.scores(logits, labels), rtol=1e-5, atol=1e-6,
                                   equal_nan=True)
    for method in ("ogm", "mlb", "none"):
        for _ in range(20):
            s = torch.rand(M) * 50
            got = cuda.coefficients(s.cuda(), method, 0.8, 10.0).cpu()
            want = reference.coefficients(s, method, 0.8, 10.0)
            assert torch.equal(got == 1, want == 1)
            torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scaling_bit_identical(cuda, seed, dtype):
    ts = [torch.randn(n).to(dtype) for n in (0, 1, 3, CHUNK + 5, 3 * CHUNK - 1)]
    a, b, _ = both(cuda, ts, noise=False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("noise_std", ["raw", "scaled"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_noise_matches_reference(cuda, seed, dtype, noise_std):
    ts = [torch.randn(n).to(dtype) for n in (0, 1, 5, CHUNK + 3, 2 * CHUNK + 7)]
    a, b, offs = both(cuda, ts, noise=True, noise_std=noise_std, seed=seed, step=9, modality=1)
    k = torch.tensor(0.45)
    for t, x, y, off in zip(ts, a, b, offs):
        if t.numel() == 0:
            continue
        sz = (reference.modulate.tensor_sigma(t, k, noise_std)
              * philox.philox_normal(seed, 9, 1, off, t.numel())).abs()
        tol = 1e-6 * sz + EPS[dtype] * y.float().abs() + torch.finfo(dtype).tiny * EPS[dtype]
        assert ((x.float() - y.float()).abs() <= tol).all()


def test_philox_normal_and_determinism(cuda, seed):
    for off in (0, 3, (1 << 34) + 1):
        out = torch.empty(CHUNK + 11, device="cuda")
        torch.ops.mmmod.philox_normal_(out, seed, 5, 2, off)
        want = philox.philox_normal(seed, 5, 2, off, out.numel())
        assert ((out.cpu() - want).abs() <= 1e-6 * want.abs() + 1e-7).all()
    g = torch.randn(5 * CHUNK + 3, device="cuda")
    runs = []
    for _ in range(2):
        x = g.clone()
        cuda.modulate_bucket_([x], [0], torch.tensor(0.3, device="cuda"), torch.tensor(1.0, device="cuda"),
                              noise=True, noise_std="raw", seed=seed, step=1, modality=0)
        runs.append((x, torch.ops.mmmod.bucket_std([g])))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    torch.testing.assert_close(runs[0][1].cpu(), reference.modulate.tensor_std(g.cpu()).reshape(1),
                               rtol=1e-10, atol=0)


def test_no_host_sync(cuda, seed):
    ts = [torch.randn(n, device="cuda") for n in (10, CHUNK + 1)]
    logits = [torch.randn(8, 3, device="cuda"), torch.randn(8, 3, device="cuda")]
    labels = torch.randint(0, 3, (8,), device="cuda")
    k, gate = torch.tensor(0.5, device="cuda"), torch.tensor(1.0, device="cuda")
    cuda.modulate_bucket_(ts, [0, 10], k, gate, noise=True, noise_std="raw", seed=seed, step=0, modality=0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        s = cuda.scores(logits, labels)
        cuda.coefficients(s, "ogm", 0.8, 2.0)
        cuda.modulate_bucket_(ts, [0, 10], k, gate, noise=True, noise_std="raw", seed=seed, step=1,
                              modality=0)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_more_than_2_31_elements(cuda, seed):
    n = (1 << 31) + 1000
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * 2:
        pytest.skip("not enough GPU memory for a > 2^31-element fp16 tensor")
    g = torch.ones(n, dtype=torch.float16, device="cuda")
    g[-5:] = 2.0
    cuda.modulate_bucket_([g], [0], torch.tensor(0.5, device="cuda"), torch.tensor(1.0, device="cuda"),
                          noise=False, noise_std="raw", seed=seed, step=0, modality=0)
    assert g[-1].item() == 1.0 and g[0].item() == 0.5 and g[(1 << 31) + 3].item() == 0.5
    z = torch.empty(8, device="cuda")
    torch.ops.mmmod.philox_normal_(z, seed, 0, 0, (1 << 31) - 4)
    want = philox.philox_normal(seed, 0, 0, (1 << 31) - 4, 8)
    assert ((z.cpu() - want).abs() <= 1e-6 * want.abs() + 1e-7).all()
    del g


def test_opcheck_cuda(seed):
    from torch.library import opcheck
    d = "cuda"
    opcheck(torch.ops.mmmod.scores.default, ([torch.randn(6, 4, device=d)] * 2, torch.randint(0, 4, (6,), device=d)))
    opcheck(torch.ops.mmmod.coefficients.default, (torch.rand(3, device=d) + 0.1, "ogm", 0.8, 2.0))
    opcheck(torch.ops.mmmod.modulate_.default,
            ([torch.randn(5, device=d), torch.randn(3, 4, device=d)], [0, 5], torch.tensor(0.5, device=d),
             torch.tensor(1.0, device=d), True, False, seed, 3, 1))
    opcheck(torch.ops.mmmod.bucket_std.default, ([torch.randn(7, device=d)],))
    opcheck(torch.ops.mmmod.philox_normal_.default, (torch.empty(11, device=d), seed, 2, 0, 3))
