"""Triton backend vs the reference (CPU: under TRITON_INTERPRET=1; the same tests run on CUDA).

Tolerances (stated once):
- scores: float32 accumulation in a different order and an online log-sum-exp: rtol 1e-5,
  atol 1e-6 (B <= 64 here);
- coefficients from the same scores: rtol 2e-6, atol 2e-6 (tanh from exp/log, a few ulp);
- OGM / MLB modulation (and OGM-GE with the noise gated off): bit-identical;
- OGM-GE noise: the noise term sigma * n within 1e-6 relative of the reference's Philox plus an
  absolute floor of 1e-6 * sigma (float32 log/cos/sin of the two implementations); fp16/bf16
  results within one rounding of the gradient's dtype;
- sigma (per-tensor std + 1e-8): rtol 1e-6 (float64 accumulation on both sides, usually equal).
Small blocks (``small`` fixture) make tensors span many programs at interpreter-friendly sizes.
"""
import math

import pytest
import torch

from mmmod import backends, reference
from mmmod.functional import stream_offsets
from mmmod.reference.philox import philox_normal

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_live, _why = backends.status("triton")
pytestmark = [
    pytest.mark.skipif(not _live, reason=f"triton backend not available: {_why}"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # numpy log(0)/inf in the interpreter
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def be():
    b = backends.get("triton", DEVICE)
    return b


@pytest.fixture
def small():
    """A private backend instance with tiny blocks: many chunks per tensor, many row blocks."""
    from mmmod.backends.triton import TritonBackend
    b = TritonBackend()
    b.block, b.block_c, b.score_block_c, b.score_rows, b.block_p = 64, 8, 8, 2, 4
    return b


def _logits(b, c, dtype, kind, scale=3.0):
    if kind == "contig":
        z = torch.randn(b, c) * scale
    elif kind == "transposed":  # column stride != 1
        z = (torch.randn(c, b) * scale).t()
    else:  # row-sliced: row stride > C
        z = (torch.randn(b, c + 5) * scale)[:, 2:2 + c]
    return z.to(dtype).to(DEVICE)


# ---------------------------------------------------------------- scores and coefficients
@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_scores_parity(small, seed, m, dtype):
    g = torch.Generator().manual_seed(seed)
    b = int(torch.randint(1, 12, (1,), generator=g))
    kinds = ["contig", "transposed", "sliced", "contig"]
    zs = [_logits(b, int(torch.randint(1, 30, (1,), generator=g)), dtype, kinds[i]) for i in range(m)]
    c_min = min(z.shape[1] for z in zs)
    y = torch.randint(0, c_min, (b,), generator=g).to(DEVICE)
    got = small.scores(zs, y)
    ref = reference.scores(zs, y)
    assert got.dtype == torch.float32 and got.shape == (m,)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_scores_mixed_dtypes_default_blocks(be, seed):
    zs = [_logits(9, 13, torch.float32, "contig"), _logits(9, 40, torch.bfloat16, "transposed"),
          _logits(9, 5, torch.float16, "sliced")]
    y = torch.randint(0, 5, (9,)).to(DEVICE)
    torch.testing.assert_close(be.scores(zs, y), reference.scores(zs, y), rtol=1e-5, atol=1e-6)


def test_scores_large_c_chunked(be, seed):
    """C = 32000: the online log-sum-exp runs over many BLOCK_C chunks; large logits."""
    zs = [_logits(3, 32000, torch.float32, "contig", scale=10.0),
          _logits(3, 32000, torch.bfloat16, "sliced", scale=10.0)]
    y = torch.randint(0, 32000, (3,)).to(DEVICE)
    # make one true class dominate so the score is not tiny
    zs[0][0, y[0]] = 80.0
    torch.testing.assert_close(be.scores(zs, y), reference.scores(zs, y), rtol=1e-5, atol=1e-6)


def test_scores_b1_c1(small):
    zs = [torch.randn(1, 1, device=DEVICE), torch.randn(1, 1, device=DEVICE).half()]
    y = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    s = small.scores(zs, y)
    assert torch.equal(s.cpu(), torch.ones(2))  # softmax over one class is exactly 1
    assert torch.equal(small.scores([zs[0]], y).cpu(), torch.ones(1))  # M = 1 also works


def test_scores_empty_batch(small):
    zs = [torch.randn(0, 3, device=DEVICE), torch.randn(0, 4, device=DEVICE)]
    y = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    assert torch.equal(small.scores(zs, y).cpu(), reference.scores(zs, y).cpu())


@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32])
def test_scores_labels_out_of_range(small, seed, label_dtype):
    """Out-of-range labels never read out of bounds and make only that modality NaN."""
    zs = [_logits(6, 3, torch.float32, "contig"), _logits(6, 8, torch.float16, "transposed"),
          _logits(6, 8, torch.float32, "sliced")]
    for bad in (-1, 3, 5, 8, 10 ** 9, -(10 ** 9)):
        y = torch.randint(0, 3, (6,), dtype=label_dtype)
        y[4] = bad
        y = y.to(DEVICE)
        got, ref = small.scores(zs, y), reference.scores(zs, y)
        assert torch.equal(got.isnan().cpu(), ref.isnan().cpu()), (bad, got, ref)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, equal_nan=True)
        s, k = small.scores_and_coefficients(zs, y, "ogm", 0.5)
        assert torch.isnan(k).all()  # a NaN score turns every coefficient NaN


def test_scores_non_finite_logits(small):
    z = torch.randn(5, 6)
    z[0, :] = float("-inf")          # all -inf row: NaN
    z[1, 2] = float("inf")           # +inf elsewhere than the label: 0
    z[2, 1] = float("nan")           # NaN row: NaN
    z[3, 4] = float("-inf")          # one -inf: fine
    y = torch.tensor([1, 0, 3, 2, 5])
    zs = [z.to(DEVICE), torch.randn(5, 6, device=DEVICE)]
    y = y.to(DEVICE)
    got, ref = small.scores(zs, y), reference.scores(zs, y)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, equal_nan=True)
    z2 = torch.zeros(2, 3)
    z2[0, 1] = float("inf")
    zs = [z2.to(DEVICE), zs[1][:2]]
    y = torch.tensor([0, 1]).to(DEVICE)
    torch.testing.assert_close(small.scores(zs, y), reference.scores(zs, y), rtol=1e-5,
                               atol=1e-6, equal_nan=True)


def test_coefficients_tie_rule_and_nan(be):
    s = torch.tensor([3.0, 3.0], device=DEVICE)
    k = be.coefficients(s, "ogm", 0.8, 2.0).cpu()
    assert k[1] == 1.0 and abs(float(k[0]) - (1 - math.tanh(0.8))) < 1e-6  # tie damps modality 0
    s = torch.tensor([1.0, float("nan"), 2.0], device=DEVICE)
    for method in ("ogm", "mlb"):
        assert torch.isnan(be.coefficients(s, method, 0.5, 2.0)).all()
    with pytest.raises(ValueError):
        be.coefficients(torch.ones(1, device=DEVICE), "ogm", 0.1, 2.0)
    with pytest.raises(ValueError):
        be.coefficients(torch.ones(2, device=DEVICE), "bogus", 0.1, 2.0)


@pytest.mark.parametrize("method", ["ogm", "mlb"])
def test_fused_scores_and_coefficients(small, seed, method):
    zs = [_logits(7, 11, torch.float32, "contig"), _logits(7, 11, torch.bfloat16, "transposed"),
          _logits(7, 4, torch.float16, "sliced")]
    y = torch.randint(0, 4, (7,)).to(DEVICE)
    s, k = small.scores_and_coefficients(zs, y, method, 0.7, 10.0)
    assert torch.equal(s, small.scores(zs, y))
    torch.testing.assert_close(k, small.coefficients(s, method, 0.7, 10.0), rtol=0, atol=0)
    torch.testing.assert_close(k, reference.coefficients(s, method, 0.7, 10.0), rtol=2e-6, atol=2e-6)


# ---------------------------------------------------------------- modulation
SIZES = [(0,), (1,), (7,), (64,), (65,), (3, 5), (200,), (2, 0, 3), (129,)]


def _grads(dtype, sizes=SIZES, scale=1.0, mean=0.0):
    return [(torch.randn(s) * scale + mean).to(dtype).to(DEVICE) for s in sizes]


def _k(v):
    return torch.tensor(v, dtype=torch.float32, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("kv", [0.3361, 1.0, 1.7, -0.5, 0.0])
def test_scale_bitwise(small, seed, dtype, kv):
    a = _grads(dtype)
    b = [t.clone() for t in a]
    offs = stream_offsets(a, 0)
    small.modulate_bucket_(a, offs, _k(kv), _k(1.0), noise=False, noise_std="raw", seed=seed,
                           step=3, modality=0)
    reference.modulate_bucket_(b, offs, _k(kv), _k(1.0), noise=False, noise_std="raw",
                               seed=seed, step=3, modality=0)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def _check_noisy(a, b, sigmas, dtype):
    for x, y, sg in zip(a, b, sigmas):
        if x.numel() == 0:
            continue
        if dtype in (torch.float32, torch.float64):
            err = (x.double() - y.double()).abs()
            tol = 1e-6 * y.double().abs() + 1e-6 * float(sg)
            assert bool((err <= tol).all()), float((err - tol).max())
        else:  # at most one rounding of the gradient's dtype apart
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(x.float(), y.float(), rtol=eps, atol=1e-6 * float(sg) + 1e-30)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise_std", ["raw", "scaled"])
def test_noisy_modulation_parity(small, seed, dtype, noise_std):
    g = torch.Generator().manual_seed(seed)
    base = [0, 1, 3, 2 ** 33 + 1][seed % 4]
    a = _grads(dtype)
    b = [t.clone() for t in a]
    offs = stream_offsets(a, base)
    rseed = int(torch.randint(0, 2 ** 62, (1,), generator=g)) * 4 + seed % 4  # full 64-bit range
    step = [0, 7, 2 ** 32 - 1, 2 ** 32 + 3][seed % 4]
    kv = _k(-0.8 if noise_std == "scaled" else 0.6)
    sig = [reference.tensor_sigma(t, kv, noise_std) for t in a]
    small.modulate_bucket_(a, offs, kv, _k(1.0), noise=True, noise_std=noise_std, seed=rseed,
                           step=step, modality=2)
    reference.modulate_bucket_(b, offs, kv, _k(1.0), noise=True, noise_std=noise_std, seed=rseed,
                               step=step, modality=2)
    _check_noisy(a, b, sig, dtype)


@pytest.mark.parametrize("seed_v", [0, 1, 2 ** 31, 2 ** 32 + 5, 2 ** 63, 2 ** 64 - 1, -3])
def test_noise_equals_reference_philox(small, seed_v):
    """Zero gradients: sigma = 1e-8, output = float32(1e-8 * n): the noise itself, compared."""
    ts = [torch.zeros(s, device=DEVICE) for s in [(1,), (6,), (70,), (33,)]]
    offs = [5, 6, 2 ** 32 + 2, 2 ** 40 + 3]
    small.modulate_bucket_(ts, offs, _k(1.0), _k(1.0), noise=True, noise_std="raw", seed=seed_v,
                           step=2 ** 32 + 9, modality=3)
    for t, o in zip(ts, offs):
        n = philox_normal(seed_v, 2 ** 32 + 9, 3, o, t.numel(), DEVICE)
        ref = torch.tensor(1e-8, dtype=torch.float32, device=DEVICE) * n
        torch.testing.assert_close(t, ref, rtol=1e-6, atol=1e-6 * 1e-8)
        assert bool((t != 0).all())


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_sigma_parity(small, seed, dtype):
    sizes = [(1,), (2,), (63,), (64,), (65,), (300,), (5, 41)]
    ts = _grads(dtype, sizes)
    ts += [(torch.randn(257) * 1e-3 + 1000.0).to(dtype).to(DEVICE)]  # mean >> std
    ts += [(torch.randn(130) * 1e-30).to(dtype).to(DEVICE)]           # tiny (and subnormal halves)
    for noise_std, kv in (("raw", 0.5), ("scaled", -1.7)):
        got = small.sigmas(ts, _k(kv), noise_std=noise_std)
        ref = torch.stack([reference.tensor_sigma(t, _k(kv), noise_std) for t in ts])
        torch.testing.assert_close(got, ref.to(got.device), rtol=1e-6, atol=0)
    assert float(got[0]) == pytest.approx(1e-8, rel=1e-6)  # one element: std 0, sigma 1e-8


def test_noise_statistics(be, seed):
    """k = 0: the output is sigma * n; n/sigma must look standard normal (mean, std, KS)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    n = 1 << 16
    g = torch.randn(n, device=DEVICE) * 2.5
    t = [g[:1000].clone(), g.clone()]
    sig = be.sigmas(t, _k(0.0))
    be.modulate_bucket_(t, [0, 1000], _k(0.0), _k(1.0), noise=True, noise_std="raw",
                        seed=seed, step=seed % 1000, modality=seed % 4)
    z = (t[1] / sig[1]).double().cpu()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.std()) - 1.0) < 5 / math.sqrt(2 * n)
    assert scipy_stats.kstest(z.numpy(), "norm").pvalue > 1e-5
    # neighbouring tensors draw disjoint parts of the stream: no correlation
    c = torch.corrcoef(torch.stack([t[0].double().cpu(), t[1][:1000].double().cpu()]))[0, 1]
    assert abs(float(c)) < 0.2


def test_determinism(small, seed):
    for noise in (False, True):
        outs = []
        for _ in range(2):
            torch.manual_seed(seed)
            a = _grads(torch.float32)
            small.modulate_bucket_(a, stream_offsets(a, 0), _k(0.7), _k(1.0), noise=noise,
                                   noise_std="raw", seed=seed, step=1, modality=1)
            outs.append(a)
        for x, y in zip(*outs):
            assert torch.equal(x, y)
    zs = [_logits(33, 19, torch.float32, "contig"), _logits(33, 19, torch.float16, "sliced")]
    y = torch.randint(0, 19, (33,)).to(DEVICE)
    s1, k1 = small.scores_and_coefficients(zs, y, "mlb", 0.5)
    s2, k2 = small.scores_and_coefficients(zs, y, "mlb", 0.5)
    assert torch.equal(s1, s2) and torch.equal(k1, k2)


def test_gate_zero_leaves_gradients_untouched(small, seed):
    a = _grads(torch.float32)
    b = [t.clone() for t in a]
    small.modulate_bucket_(a, stream_offsets(a, 0), _k(1.0), _k(0.0), noise=True, noise_std="raw",
                           seed=seed, step=0, modality=0)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_non_finite_gradient_gets_no_noise(small, seed):
    a = _grads(torch.float32, [(70,), (9,), (5,)])
    a[0][13] = float("nan")
    a[2][1] = float("inf")
    b = [t.clone() for t in a]
    offs = stream_offsets(a, 0)
    small.modulate_bucket_(a, offs, _k(0.5), _k(1.0), noise=True, noise_std="raw", seed=seed,
                           step=0, modality=0)
    reference.modulate_bucket_(b, offs, _k(0.5), _k(1.0), noise=True, noise_std="raw", seed=seed,
                               step=0, modality=0)
    assert torch.equal(a[0].isnan(), b[0].isnan()) and int(a[0].isnan().sum()) == 1
    assert torch.equal(a[0].nan_to_num(), b[0].nan_to_num())  # no noise: exactly k * g
    assert torch.equal(a[2], b[2])
    _check_noisy([a[1]], [b[1]], [reference.tensor_sigma(b[1], _k(0.5), "raw")], torch.float32)
    assert not torch.equal(a[1], (b[1] * 0))


def test_meta_cache_reused_until_storages_change(seed):
    from mmmod.backends.triton import TritonBackend
    be = TritonBackend()
    be.block, be.block_c = 64, 8
    a = _grads(torch.float32, [(10,), (100,)])
    for step in range(3):
        be.modulate_bucket_(a, [0, 10], _k(0.9), _k(1.0), noise=True, noise_std="raw", seed=1,
                            step=step, modality=0)
    assert be.meta_cache.builds == 1
    a = [t.clone() for t in a]  # new storages (as after zero_grad(set_to_none=True))
    be.modulate_bucket_(a, [0, 10], _k(0.9), _k(1.0), noise=False, noise_std="raw", seed=1,
                        step=0, modality=0)
    assert be.meta_cache.builds == 2


def test_flat_gradient_buffer(small, seed):
    from mmmod.backends.triton.table import flat_view, make_flat_grads
    params = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in [(3, 5), (70,), (1,)]]
    buf = make_flat_grads(params)
    buf.copy_(torch.randn(buf.numel()))
    ts = [p.grad for p in params]
    flat = flat_view(ts)
    assert flat is not None and flat.data_ptr() == buf.data_ptr() and flat.numel() == 86
    assert flat_view([ts[1], ts[0]]) is None and flat_view([torch.randn(3), torch.randn(3)]) is None
    ref = [t.clone() for t in ts]
    small.modulate_bucket_(ts, stream_offsets(ts, 0), _k(0.37), _k(1.0), noise=False, noise_std="raw",
                           seed=0, step=0, modality=0)
    reference.modulate_bucket_(ref, stream_offsets(ref, 0), _k(0.37), _k(1.0), noise=False,
                               noise_std="raw", seed=0, step=0, modality=0)
    for x, y in zip(ts, ref):
        assert torch.equal(x, y)
    ref = [t.clone() for t in ts]
    small.modulate_bucket_(ts, stream_offsets(ts, 4), _k(0.37), _k(1.0), noise=True, noise_std="raw",
                           seed=seed, step=5, modality=1)
    reference.modulate_bucket_(ref, stream_offsets(ref, 4), _k(0.37), _k(1.0), noise=True,
                               noise_std="raw", seed=seed, step=5, modality=1)
    _check_noisy(ts, ref, [reference.tensor_sigma(t, _k(0.37), "raw") for t in ref], torch.float32)


def test_default_blocks_tensor_bigger_than_one_block(be, seed):
    a = [torch.randn(9000, device=DEVICE), torch.randn(4097, device=DEVICE).bfloat16()]
    for t in a:
        b = t.clone()
        be.modulate_bucket_([t], [3], _k(0.25), _k(1.0), noise=True, noise_std="raw", seed=seed,
                            step=2, modality=1)
        reference.modulate_bucket_([b], [3], _k(0.25), _k(1.0), noise=True, noise_std="raw",
                                   seed=seed, step=2, modality=1)
        _check_noisy([t], [b], [reference.tensor_sigma(b, _k(0.25), "raw")], t.dtype)


def test_backend_status_and_supports():
    from mmmod.backends.triton import TritonBackend
    b = TritonBackend()
    assert b.available() == (True, "")
    assert b.supports(torch.device("cuda"))
    import os
    assert b.supports(torch.device("cpu")) == (os.environ.get("TRITON_INTERPRET") == "1")


def test_seed_and_step_are_not_specialisation_keys():
    import inspect
    import re
    from mmmod.backends.triton import TritonBackend
    mod = TritonBackend().modules.modulate
    f = mod._modulate_noise_kernel
    dns = getattr(f, "do_not_specialize", None)
    if dns is not None:  # compiled JITFunction (GPU): parameter names or indices
        names = {f.arg_names[i] if isinstance(i, int) else i for i in dns}
        assert {"seed", "step"} <= names
    else:  # interpreter: the decorator is not kept; check the source
        src = inspect.getsource(mod)
        m = re.search(r"do_not_specialize=\[([^\]]*)\]\)\s*\ndef _modulate_noise_kernel", src)
        assert m and '"seed"' in m.group(1) and '"step"' in m.group(1)


# ---------------------------------------------------------------- metadata cache lifetime
def _cache_get(cache, sizes, base=0):
    ts = [torch.empty(s) for s in sizes]
    return ts, cache.get(ts, stream_offsets(ts, base), 64, 8)


def test_meta_cache_lru_bounded_by_entries_and_bytes():
    from mmmod.backends.triton.table import MetaCache
    cache = MetaCache(size=3, max_bytes=1 << 20)
    keep = [_cache_get(cache, [(10,), (100,)]) for _ in range(5)]  # 5 distinct storages
    assert len(cache) == 3 and cache.builds == 5
    ts0, m0 = keep[0]
    assert cache.get(ts0, stream_offsets(ts0, 0), 64, 8) is not m0  # evicted: rebuilt
    ts4, m4 = keep[4]
    assert cache.get(ts4, stream_offsets(ts4, 0), 64, 8) is m4      # most recent: kept
    # byte bound: every table here has the same size (same numels and offsets)
    nbytes = m4.nbytes
    assert nbytes == m4.buffer.numel() * 8
    cache = MetaCache(size=100, max_bytes=2 * nbytes + nbytes // 2)
    held = [_cache_get(cache, [(10,), (100,)]) for _ in range(4)]
    assert len(cache) == 2 and cache.nbytes == 2 * nbytes <= cache.max_bytes
    assert cache.get(held[-1][0], stream_offsets(held[-1][0], 0), 64, 8) is held[-1][1]
    # one table larger than the whole bound is still returned (and is the only entry)
    cache = MetaCache(size=100, max_bytes=8)
    ts, m = _cache_get(cache, [(1000,)])
    assert len(cache) == 1 and m.n_stats_chunks == 16


def test_meta_cache_pins_entries_used_under_graph_capture():
    from mmmod.backends.triton.table import MetaCache
    cache = MetaCache(size=2)
    capturing = {"on": False}
    cache.capturing = lambda device: capturing["on"]
    ts_a, a = _cache_get(cache, [(7,)])          # built eagerly ...
    capturing["on"] = True
    assert cache.get(ts_a, [0], 64, 8) is a      # ... then used while capturing: pinned
    ts_b, b = _cache_get(cache, [(9,)])          # built while capturing: pinned
    capturing["on"] = False
    assert a.pinned and b.pinned and cache.pinned_entries == 2 and cache.nbytes == 0
    churn = [_cache_get(cache, [(3,)]) for _ in range(6)]  # eviction pressure
    assert len(cache) == 4  # 2 pinned + the 2-entry LRU
    assert cache.get(ts_a, [0], 64, 8) is a and cache.get(ts_b, [0], 64, 8) is b
    cache.clear()
    assert len(cache) == 2 and cache.get(ts_a, [0], 64, 8) is a
    cache.clear(force=True)  # the owner's promise: no graph that used them replays again
    assert len(cache) == 0 and cache.get(ts_a, [0], 64, 8) is not a
    assert not churn[0][1].pinned


def test_meta_cache_records_the_using_stream(monkeypatch):
    """A table used on a stream other than its allocation stream is record_stream-ed there."""
    from mmmod.backends.triton.table import MetaCache
    recorded = []
    monkeypatch.setattr(torch.Tensor, "record_stream",
                        lambda self, s: recorded.append((self.data_ptr(), s)))
    cache = MetaCache()
    ts, m = _cache_get(cache, [(5,), (6,)])
    assert recorded == []                        # same stream (None off CUDA): nothing to do
    cache.stream = lambda device: "side stream"
    assert cache.get(ts, stream_offsets(ts, 0), 64, 8) is m
    assert recorded == [(m.buffer.data_ptr(), "side stream")]


def test_cpu_step_tensor_for_a_gpu_bucket_is_read_on_the_host():
    from mmmod.backends.triton import TritonBackend
    cuda = torch.device("cuda")  # only compared with, never touched
    assert TritonBackend._step_args(torch.tensor(2 ** 32 + 7), cuda) == (7, None)
    assert TritonBackend._step_args(torch.tensor(-3, dtype=torch.int16), cuda) == (2 ** 32 - 3,
                                                                                  None)
    assert TritonBackend._step_args(2 ** 33 + 1, cuda) == (1, None)
    step = torch.tensor(4)
    assert TritonBackend._step_args(step, torch.device("cpu")) == (0, step)  # read by the kernel
    with pytest.raises(ValueError, match="0-d integer tensor"):
        TritonBackend._step_args(torch.tensor([1]), cuda)


def test_table_layout_constants_are_the_kernels():
    """The host table builder and the kernels read the same words (kernels/utils.py holds them
    as tl.constexpr, mmmod/backends/triton/table.py as ints)."""
    from mmmod.backends.triton import TritonBackend, table
    utils = TritonBackend().modules.utils
    for name in ("META_FIELDS", "F_PTR", "F_NUMEL", "F_OFFSET", "F_SCHUNK", "F_NCHUNK"):
        assert getattr(utils, name).value == getattr(table, name), name


def test_every_launcher_builds_its_tables_in_its_backends_cache(seed):
    """Modulation, moments, the proximal correction and the fused update all take their tables
    from the one cache their backend object owns (no cache shared between backends)."""
    from mmmod.backends.triton import TritonBackend
    be, other = TritonBackend(), TritonBackend()
    ts = _grads(torch.float32, [(10,), (100,)])
    be.modulate_bucket_(ts, [0, 10], _k(0.9), _k(1.0), noise=True, noise_std="raw", seed=1,
                        step=0, modality=0)
    assert be.meta_cache.builds == 1
    be.bucket_moments([t.clone() for t in ts])
    assert be.meta_cache.builds == 2
    snaps = [t.clone() for t in ts]
    be.proximal_(ts, [t + 1 for t in ts], snaps, torch.tensor(0.5, device=DEVICE))
    assert be.meta_cache.builds == 5  # gradients, parameters, snapshots
    p = [torch.zeros_like(t) for t in ts]
    be.fused_update("sgd", DEVICE)(p, ts, [], [False, False], [0, 10], _k(1.0), None, None,
                                   lr=0.1, weight_decay=0.0, momentum=0.0, dampening=0.0,
                                   nesterov=False, maximize=False, seed=1, step=0, modality=0)
    assert be.meta_cache.builds == 6 and len(be.meta_cache) == 6
    assert other._cache is None or other.meta_cache.builds == 0
