"""One parity suite: every live backend x every registered method x dtype x shape, against the
plain-torch reference (the ``torch`` backend), through the public functional API.

Backend-specific cases (the CPU AVX2 table, thread counts, > 2^31 offsets, Triton launch
shapes) stay in the per-backend files. One tolerance table for all backends:

| what | tolerance | why |
|---|---|---|
| scores | rtol 1e-5, atol 1e-6 | float32 sums in another order (fused kernels also use float64) |
| coefficients | rtol 2e-6, atol 2e-6 | libdevice-free tanh in the fused rules, a few float32 ulp |
| scaling ``k g`` (same k) | bit-identical, every dtype | one float32 multiply, one rounding |
| noise ``k g + sigma n`` (same k) | ``1e-6 |sigma n|`` + 1 ulp of the dtype | log/sin/cos/sqrt differ by ulps |
"""
import pytest
import torch

from mmmod import _ext, functional, methods, reference
from mmmod.reference import philox

from _backends import LIVE_BACKENDS, device_for

FUSED = [b for b in LIVE_BACKENDS if b != "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
TOL = {"scores": dict(rtol=1e-5, atol=1e-6), "coefficients": dict(rtol=2e-6, atol=2e-6)}
_CPU_EXT = _ext.load("cpu")[0]
#: elements per chunk of the CPU kernels as compiled (their default when the extension is absent)
CPU_CHUNK = _CPU_EXT.build_info()["chunk"] if _CPU_EXT is not None else 1 << 14
# empty, one element, odd sizes, a tensor crossing several kernel chunks (4096-element Triton
# blocks, CPU kernel chunks), and a non-contiguous (transposed) gradient
SHAPES = {
    "empty": [(0,), (3,)],
    "one": [(1,), (2,)],
    "odd": [(3, 0, 5), (17,), (7, 3)],
    "chunks": [(CPU_CHUNK + 5,), (1,), (4096 * 2 - 3,)],
    "transposed": [(5, 9, "T"), (31,)],
}


def _grads(shapes, dtype, device, gen):
    out = []
    for shp in shapes:
        if shp and shp[-1] == "T":
            t = torch.randn(shp[1], shp[0], generator=gen).t()  # non-contiguous view
        else:
            t = torch.randn(*shp, generator=gen)
        out.append((t * 0.01).to(dtype).to(device))
    return out


def _assert_noise_close(got, want, sigma_n, dtype):
    ulp = EPS[dtype] * want.float().abs() + torch.finfo(dtype).tiny * EPS[dtype]
    tol = 1e-6 * sigma_n + ulp
    bad = (got.float() - want.float()).abs() > tol
    assert not bad.any(), (got[bad][:5], want[bad][:5])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("M", [2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("bc", [(1, 1), (7, 1), (33, 10), (300, 31)])
def test_scores(backend, seed, M, dtype, bc):
    B, C = bc
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(seed)
    # modality 1 non-contiguous (a transposed [C, B] buffer), others contiguous; modality 3 in
    # another dtype (one launch reads every modality's own dtype)
    zs = [(torch.randn(C, B, generator=gen).t() if m == 1 else torch.randn(B, C, generator=gen))
          .mul(3).to(torch.float16 if m == 3 else dtype).to(dev) for m in range(M)]
    y = torch.randint(0, C, (B,), generator=gen).to(dev)
    got = functional.scores(zs, y, backend=backend)
    want = functional.scores(zs, y, backend="torch")
    torch.testing.assert_close(got.cpu(), want.cpu(), **TOL["scores"])


@pytest.mark.parametrize("backend", FUSED)
def test_scores_empty_batch_and_bad_labels(backend):
    dev = device_for(backend)
    zs = [torch.zeros(0, 3, device=dev), torch.zeros(0, 4, device=dev)]
    y = torch.zeros(0, dtype=torch.int64, device=dev)
    assert torch.equal(functional.scores(zs, y, backend=backend).cpu(), torch.zeros(2))
    zs = [torch.randn(4, 3, device=dev), torch.randn(4, 5, device=dev)]
    y = torch.tensor([0, 1, 4, 2], device=dev)  # 4 is out of range for modality 0 only
    got = functional.scores(zs, y, backend=backend).cpu()
    assert torch.isnan(got[0]) and torch.isfinite(got[1])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("M", [2, 3, 4])
@pytest.mark.parametrize("method", methods.names())
def test_coefficients(backend, seed, M, method):
    """Random scores, an exact tie and an extreme ratio, several alpha / beta_max."""
    m = methods.get(method)
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(seed)
    for trial in range(4):
        s = torch.rand(M, generator=gen) * 10 + 0.01
        if trial == 1:
            s[:] = s[0]
        if trial == 2:
            s[0] = s[1] * 1e4
        alpha = [0.1, 0.5, 2.0, 8.0][trial]
        for beta_max in (2.0, 10.0):
            kw = dict(alpha=alpha if method != "none" else None, beta_max=beta_max)
            got = functional.coefficients(s.to(dev), method, backend=backend,
                                          state=m.init_state(M, dev), **kw)
            want = functional.coefficients(s.to(dev), method, backend="torch",
                                           state=m.init_state(M, dev), **kw)
            torch.testing.assert_close(got.cpu(), want.cpu(), **TOL["coefficients"])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("method", methods.names())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_method_step(backend, seed, method, dtype, shape):
    """scores -> coefficients -> in-place modulation, each compared with the reference."""
    m = methods.get(method)
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(seed)
    M, B, C = 2, 9, 5
    zs = [torch.randn(B, C, generator=gen).mul(2 + 3 * i).to(dev) for i in range(M)]
    y = torch.randint(0, C, (B,), generator=gen).to(dev)
    s = functional.scores(zs, y, backend=backend)
    k = functional.coefficients(s, method, backend=backend,
                                state=m.init_state(M, dev))
    k_ref = functional.coefficients(s, method, backend="torch", state=m.init_state(M, dev))
    torch.testing.assert_close(k.cpu(), k_ref.cpu(), **TOL["coefficients"])
    if not m.modulates:
        return
    grads = [_grads(SHAPES[shape], dtype, dev, gen) for _ in range(M)]
    a = [[g.clone() for g in gs] for gs in grads]
    b = [[g.clone() for g in gs] for gs in grads]
    kw = dict(noise=m.noise, seed=seed, step=seed % 97)
    functional.modulate_(a, k_ref, backend=backend, **kw)
    functional.modulate_(b, k_ref, backend="torch", **kw)
    for mi, (xs, ys, gs) in enumerate(zip(a, b, grads)):
        off = 0
        for x, y_, g in zip(xs, ys, gs):
            assert x.shape == g.shape and x.stride() == g.stride()
            if not m.noise:
                assert torch.equal(x, y_), (method, backend, dtype, shape)
            elif g.numel():
                sigma = reference.modulate.tensor_sigma(g.contiguous(), k_ref[mi].float(), "raw")
                z = philox.philox_normal(seed, seed % 97, mi, off, g.numel()).to(dev)
                _assert_noise_close(x.reshape(-1), y_.reshape(-1),
                                    (sigma * z).abs(), dtype)
            off += g.numel()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("noise", [False, True])
def test_nan_coefficients_leave_gradients_untouched(backend, noise):
    dev = device_for(backend)
    grads = [[torch.randn(33, device=dev), torch.randn(5, 2, device=dev)], [torch.randn(7, device=dev)]]
    before = [[g.clone() for g in gs] for gs in grads]
    functional.modulate_(grads, torch.tensor([float("nan"), 0.5], device=dev), noise=noise,
                         backend=backend)
    for gs, bs in zip(grads, before):
        for g, b in zip(gs, bs):
            assert torch.equal(g, b)


def _check_noisy(got, want, g, k, seed, step, modality, offset, noise_std):
    if g.numel() == 0:
        return
    sigma = reference.modulate.tensor_sigma(g.contiguous(), k.float().cpu(), noise_std)
    z = philox.philox_normal(seed, step, modality, offset, g.numel())
    _assert_noise_close(got.reshape(-1).cpu(), want.reshape(-1).cpu(), (sigma * z).abs(),
                        g.dtype)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ["odd", "chunks", "transposed"])
def test_noise_std_scaled(backend, seed, dtype, shape):
    """OGM-GE with the noise scale taken after scaling (``noise_std="scaled"``)."""
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(seed)
    grads = [_grads(SHAPES[shape], dtype, dev, gen) for _ in range(2)]
    k = torch.tensor([0.6, 1.3], device=dev)
    a = [[g.clone() for g in gs] for gs in grads]
    b = [[g.clone() for g in gs] for gs in grads]
    kw = dict(noise=True, noise_std="scaled", seed=seed, step=7)
    functional.modulate_(a, k, backend=backend, **kw)
    functional.modulate_(b, k, backend="torch", **kw)
    for mi, (xs, ys, gs) in enumerate(zip(a, b, grads)):
        for x, y, g, off in zip(xs, ys, gs, functional.stream_offsets(gs)):
            _check_noisy(x, y, g, k[mi], seed, 7, mi, off, "scaled")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("noise", [False, True])
def test_mixed_buckets_and_none_entries(backend, seed, noise):
    """Three modalities, ``None`` entries, several dtypes in one modality (one bucket per
    dtype, one noise stream per modality), a non-contiguous gradient."""
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(dev)

    grads = [[r(4, 3).t(), None, r(5)], [r(9).half()], [r(2, 2), r(3).bfloat16(), r(6)]]
    k = torch.tensor([0.4, 1.0, 1.7], device=dev)
    a = [[None if g is None else g.clone() for g in gs] for gs in grads]
    b = [[None if g is None else g.clone() for g in gs] for gs in grads]
    functional.modulate_(a, k, noise=noise, seed=seed, step=4, backend=backend)
    functional.modulate_(b, k, noise=noise, seed=seed, step=4, backend="torch")
    for mi, (xs, ys, gs) in enumerate(zip(a, b, grads)):
        for x, y, g, off in zip(xs, ys, gs, functional.stream_offsets(gs)):
            if g is None:
                assert x is None
            elif noise:
                _check_noisy(x, y, g, k[mi], seed, 4, mi, off, "raw")
            else:
                assert torch.equal(x, y)
