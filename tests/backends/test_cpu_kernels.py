"""The CPU extension's kernel tables: AVX-512 and AVX2 (vectorised Philox + polynomial Box-Muller,
16-lane statistics, at::vec score rows) against each other, the portable scalar one and the
reference, and the bit-level invariants the chunked/threaded/windowed passes promise.

MMMOD_CPU_KERNELS=scalar|avx2|avx512 caps the table (MMMOD_CPU_SCALAR=1 forces scalar); every
table the CPU supports is tested. Tolerances as in test_cpu_ext.py: normals within 1e-6 relative
(+1e-7 absolute) of the reference and of the scalar table (libm vs polynomials); the AVX-512
normals bit-identical to the AVX2 ones (the same operations on wider registers); statistics,
scaling and the modulation arithmetic bit-identical between all tables (same accumulation order,
separately rounded products, by construction).
"""
import os

import pytest
import torch

from mmmod import backends, reference
from mmmod.functional import stream_offsets
from mmmod.reference import philox

LIVE, WHY = backends.status("cpu")
pytestmark = pytest.mark.skipif(not LIVE, reason=f"C++ extension (backend 'cpu') not available: {WHY}")

CHUNK = 1 << 14  # kChunkCpu in csrc/cpu/chunks.h
BLOCK = 4 * 128  # normals per noise block (kBlockGroups in csrc/cpu/cpu_kernels.h)
ENV = ("MMMOD_CPU_SCALAR", "MMMOD_CPU_KERNELS")


def ops():
    return torch.ops.mmmod


def kernels():
    import mmmod._C
    return mmmod._C.cpu_kernels()


AVX2 = LIVE and kernels()["avx2_supported"]
AVX512 = LIVE and kernels().get("avx512_supported", False)
# every table this CPU can run, the best first
TABLES = (["avx512"] if AVX512 else []) + (["avx2"] if AVX2 else []) + ["scalar"]
BEST = TABLES[0]
needs_avx2 = pytest.mark.skipif(not AVX2, reason="CPU without AVX2 + FMA: only the scalar table")
needs_avx512 = pytest.mark.skipif(not AVX512, reason="CPU/OS without AVX-512 (f/bw/dq/vl, zmm state)")


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=TABLES)
def table(request, monkeypatch):
    """Runs the test once on every table this CPU supports."""
    monkeypatch.delenv("MMMOD_CPU_SCALAR", raising=False)
    monkeypatch.setenv("MMMOD_CPU_KERNELS", request.param)
    assert kernels()["active"] == request.param
    return request.param


def with_table(name, fn):
    """fn() with the ops capped at table `name` ("auto": the best the CPU has)."""
    old = {v: os.environ.pop(v, None) for v in ENV}
    try:
        os.environ["MMMOD_CPU_KERNELS"] = name
        assert name == "auto" or kernels()["active"] == name
        return fn()
    finally:
        for v, x in old.items():
            os.environ.pop(v, None)
            if x is not None:
                os.environ[v] = x


def normals(n, seed, step, modality, offset):
    out = torch.empty(n)
    ops()._philox_normal_(out, seed, step, modality, offset)
    return out


def assert_noise_close(got, want):
    tol = 1e-6 * want.abs() + 1e-7
    bad = (got - want).abs() > tol
    assert not bad.any(), (bad.nonzero()[:5].flatten(), got[bad][:5], want[bad][:5])


def modulate(ts, offsets, k=0.6, gate=1.0, seed=0, step=0, modality=0, scaled=False, noise=True):
    out = [t.clone() for t in ts]
    ops().modulate_(out, offsets, torch.tensor(k), torch.tensor(gate), noise, scaled, seed, step,
                    modality)
    return out


# ---- which table ----------------------------------------------------------------------------
def test_env_vars_select_table(monkeypatch):
    monkeypatch.delenv("MMMOD_CPU_KERNELS", raising=False)
    monkeypatch.setenv("MMMOD_CPU_SCALAR", "1")
    assert kernels()["active"] == "scalar"
    monkeypatch.setenv("MMMOD_CPU_KERNELS", "avx512")  # MMMOD_CPU_SCALAR=1 still wins
    assert kernels()["active"] == "scalar"
    monkeypatch.setenv("MMMOD_CPU_SCALAR", "0")
    assert kernels()["active"] == BEST
    monkeypatch.delenv("MMMOD_CPU_SCALAR")
    for cap, want in (("auto", BEST), ("", BEST), ("scalar", "scalar"),
                      ("avx2", "avx2" if AVX2 else "scalar"), ("avx512", BEST)):
        monkeypatch.setenv("MMMOD_CPU_KERNELS", cap)
        assert kernels()["active"] == want, cap
    monkeypatch.delenv("MMMOD_CPU_KERNELS")
    assert kernels()["active"] == BEST
    assert not (AVX512 and not AVX2)  # the AVX-512 check includes the AVX2 one


def test_unknown_table_name_is_refused_before_writing(monkeypatch):
    monkeypatch.delenv("MMMOD_CPU_SCALAR", raising=False)
    monkeypatch.setenv("MMMOD_CPU_KERNELS", "avx1024")
    g = torch.randn(100)
    before = g.clone()
    with pytest.raises(ValueError, match="MMMOD_CPU_KERNELS=avx1024.*scalar, avx2 or avx512"):
        ops().modulate_([g], [0], torch.tensor(0.5), torch.tensor(1.0), True, False, 0, 0, 0)
    assert torch.equal(g, before)
    with pytest.raises(ValueError, match="MMMOD_CPU_KERNELS"):
        normals(8, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="MMMOD_CPU_KERNELS"):
        ops()._bucket_std([g])
    with pytest.raises(ValueError, match="MMMOD_CPU_KERNELS"):
        ops().scores([torch.randn(4, 3)], torch.tensor([0, 1, 2, 0]))
    # reporting never raises: it names the table the variable's absence would give
    assert kernels()["active"] == BEST


# ---- noise: both tables against the reference, every alignment ----------------------------------
@pytest.mark.parametrize("offset", [0, 1, 2, 3, 5, 6, 7, 9, 13, 31, 33, 4 * BLOCK - 1])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 8, 9, 31, 33, 63, 65, BLOCK - 3, BLOCK + 5, 3 * BLOCK + 29])
def test_normals_any_alignment(table, seed, offset, n):
    want = philox.philox_normal(seed, 11, 1, offset, n)
    assert_noise_close(normals(n, seed, 11, 1, offset), want)


def test_normals_counter_carry_and_large_words(table, seed):
    # group counters crossing 2^32 (the low word wraps, the high word is carried) and full 64-bit
    # seeds/steps/modalities: the vector lanes add 64-bit counters
    s64 = (seed * 0x9E3779B97F4A7C15 + 12345) & ((1 << 64) - 1)
    signed = s64 - (1 << 64) if s64 >= (1 << 63) else s64
    for offset in (4 * (2 ** 32) - 37, 4 * (2 ** 33) - 5, 4 * (2 ** 40) + 3):
        got = normals(200, signed, 0xFFFFFFFF, 0xFFFFFFFF, offset)
        assert_noise_close(got, philox.philox_normal(s64, 0xFFFFFFFF, 0xFFFFFFFF, offset, 200))


def test_normals_do_not_depend_on_block_or_chunk_boundaries(table, seed):
    # the same stream positions through different block/chunk alignments: bit-identical (every
    # group goes through the same code, partial batches on padded lanes)
    long = normals(3 * CHUNK + 100, seed, 4, 2, 0)
    for start in (1, 3, 4, 7, 8, 29, BLOCK - 1, BLOCK + 3, CHUNK - 5, CHUNK + 1):
        for n in (1, 5, 30, 1000, CHUNK + 11):
            if start + n <= long.numel():
                assert torch.equal(normals(n, seed, 4, 2, start), long[start:start + n]), (start, n)


@pytest.mark.parametrize("name", [t for t in TABLES if t != "scalar"] or
                         [pytest.param("avx2", marks=needs_avx2)])
def test_simd_and_scalar_normals_agree(seed, name):
    n = 1 << 18
    for offset in (0, 3, 4 * (2 ** 32) - 10):
        a = with_table(name, lambda: normals(n, seed, 5, 1, offset))
        b = with_table("scalar", lambda: normals(n, seed, 5, 1, offset))
        assert_noise_close(a, b)
        rel = ((a - b).abs() / b.abs().clamp_min(1e-3)).max().item()
        assert rel < 1e-6, rel


@needs_avx512
def test_avx512_normals_bit_identical_to_avx2(seed):
    # the same operations on 16 lanes instead of 8: every normal equal bit for bit, including
    # partial batches (masked stores), every alignment, and counters carrying into the high word
    s64 = (seed * 0x9E3779B97F4A7C15 + 777) & ((1 << 64) - 1)
    signed = s64 - (1 << 64) if s64 >= (1 << 63) else s64
    for n in (1, 3, 4, 5, 63, 64, 65, 127, 128, 129, 255, 257, BLOCK - 1, BLOCK + 1, 3 * BLOCK + 29,
              CHUNK + 11, 1 << 18):
        for offset in (0, 1, 2, 3, 7, 61, 4 * (2 ** 32) - 37):
            for s, t, m in ((seed, 5, 1), (signed, 0xFFFFFFFF, 0xFFFFFFFF)):
                a = with_table("avx512", lambda: normals(n, s, t, m, offset))
                b = with_table("avx2", lambda: normals(n, s, t, m, offset))
                assert torch.equal(a, b), (n, offset, s, t, m)


@pytest.mark.parametrize("name", TABLES)
def test_noise_moments_every_table(seed, name):
    n = 1 << 20
    z = with_table(name, lambda: normals(n, seed, 2, 0, 1)).double()
    assert abs(z.mean().item()) < 6 / n ** 0.5
    assert abs(z.std().item() - 1) < 6 * (0.5 / n) ** 0.5 + 1e-4


# ---- modulation ------------------------------------------------------------------------------
SIZES = [[1], [3], [7], [8], [9], [0, 5, 0, 2], [17, 1, 33], [BLOCK - 1, 6, BLOCK + 3],
         [CHUNK + 5, 3, 2 * CHUNK - 3]]


@pytest.mark.parametrize("start", [0, 1, 6])
@pytest.mark.parametrize("sizes", SIZES)
def test_modulate_odd_offsets_match_reference(table, seed, sizes, start):
    ts = [torch.randn(n) * 0.3 for n in sizes]
    offs = stream_offsets(ts, start)
    got = modulate(ts, offs, seed=seed, step=3, modality=1)
    want = [t.clone() for t in ts]
    reference.modulate_bucket_(want, offs, torch.tensor(0.6), torch.tensor(1.0), noise=True,
                               noise_std="raw", seed=seed, step=3, modality=1)
    for t, x, y, off in zip(ts, got, want, offs):
        if t.numel() == 0:
            assert x.numel() == 0
            continue
        sigma = reference.modulate.tensor_sigma(t, torch.tensor(0.6), "raw")
        z = philox.philox_normal(seed, 3, 1, off, t.numel())
        tol = 1e-6 * (sigma * z).abs() + 2.0 ** -23 * y.abs() + 1e-30
        assert ((x - y).abs() <= tol).all()


@pytest.mark.parametrize("name", [t for t in TABLES if t != "scalar"] or
                         [pytest.param("avx2", marks=needs_avx2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_modulate_tables_agree_all_dtypes(seed, dtype, name):
    eps = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7,
           torch.float64: 2.0 ** -52}[dtype]
    ts = [(torch.randn(n) * 0.1).to(dtype) for n in (5, CHUNK + 7, 333)]
    offs = stream_offsets(ts, 3)
    a = with_table(name, lambda: modulate(ts, offs, k=0.45, seed=seed, step=9))
    b = with_table("scalar", lambda: modulate(ts, offs, k=0.45, seed=seed, step=9))
    for t, x, y in zip(ts, a, b):
        sigma = float(t.double().std())
        tol = 2e-6 * sigma * 6 + 2 * eps * y.double().abs() + 1e-30
        assert ((x.double() - y.double()).abs() <= tol).all()


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_modulate_avx512_bit_identical_to_avx2(seed, dtype):
    ts = [(torch.randn(n) * 0.1).to(dtype) for n in (1, 5, 17, 63, BLOCK + 9, CHUNK + 7, 2 * CHUNK - 3)]
    for start in (0, 1, 6):
        offs = stream_offsets(ts, start)
        a = with_table("avx512", lambda: modulate(ts, offs, k=0.45, seed=seed, step=9, modality=1))
        b = with_table("avx2", lambda: modulate(ts, offs, k=0.45, seed=seed, step=9, modality=1))
        assert all(torch.equal(x, y) for x, y in zip(a, b)), start


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_scale_bit_identical_every_table_and_to_torch(dtype):
    # OGM / MLB (no noise): x <- float32(x k), in every table equal to torch's own multiply
    ts = [(torch.randn(n) * 3).to(dtype) for n in (0, 1, 7, 15, 16, 17, 31, 33, 63, 64, 65, 1000,
                                                   CHUNK - 1, CHUNK + 5, 2 * CHUNK + 77)]
    offs = stream_offsets(ts, 0)
    k = 0.7310585975646973  # not a power of two: every product rounds
    want = [(t.float() * torch.tensor(k, dtype=torch.float32)).to(dtype) for t in ts]
    for name in TABLES:
        got = with_table(name, lambda: modulate(ts, offs, k=k, noise=False))
        for x, y in zip(got, want):
            assert torch.equal(x, y), (name, x.numel())


def test_scale_split_over_threads_is_exact(threads, table):
    # the noise-free pass splits the bucket's elements into one contiguous share per thread,
    # across tensor boundaries and in the middle of tensors: every split gives torch's bits
    ts = [torch.randn(n) for n in (70001, 3, 65537, 1, 131071, 17)]
    offs = stream_offsets(ts, 0)
    k = 0.3183098861837907
    want = [t * torch.tensor(k, dtype=torch.float32) for t in ts]
    for nt in (1, 2, 3, 5):
        torch.set_num_threads(nt)
        got = modulate(ts, offs, k=k, noise=False)
        assert all(torch.equal(x, y) for x, y in zip(got, want)), nt


@pytest.mark.parametrize("noise", [False, True])
def test_vector_tails_do_not_write_past_a_tensor(table, seed, noise):
    # tensors that are views into one buffer, with guard values between them: the vector loops'
    # tails (masked or scalar) must stop at each tensor's last element
    sizes = [1, 3, 15, 17, 33, 63, 65, BLOCK + 13, 1000]
    buf = torch.full((sum(sizes) + 2 * len(sizes) + 2,), 12345.0)
    views, pos = [], 1
    for n in sizes:
        views.append(buf[pos:pos + n])
        views[-1].copy_(torch.randn(n))
        pos += n + 2
    guard = torch.ones_like(buf, dtype=torch.bool)
    for v in views:
        guard[v.storage_offset():v.storage_offset() + v.numel()] = False
    offs = stream_offsets(views, 1)
    ops().modulate_(views, offs, torch.tensor(0.5), torch.tensor(1.0), noise, False, seed, 1, 0)
    assert (buf[guard] == 12345.0).all()


def test_statistics_bit_identical_between_tables(seed):
    # the 16-lane accumulation order is the same in every table: float64 stds equal exactly
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        ts = [(torch.randn(n) * 3 + 2).to(dtype) for n in (1, 2, 15, 16, 17, 1000, 3 * CHUNK + 7)]
        results = [with_table(name, lambda: ops()._bucket_std(ts)) for name in TABLES]
        for name, r in zip(TABLES[1:], results[1:]):
            assert torch.equal(results[0], r), (dtype, name)
        want = torch.stack([reference.modulate.tensor_std(t) for t in ts])
        torch.testing.assert_close(results[0], want, rtol=1e-10, atol=0)


def test_statistics_large_mean_and_non_finite(table):
    t = torch.randn(3 * CHUNK + 5, dtype=torch.float64).float() * 1e-3 + 1e4
    got = ops()._bucket_std([t])
    torch.testing.assert_close(got, reference.modulate.tensor_std(t)[None], rtol=1e-9, atol=0)
    for bad in (float("nan"), float("inf")):
        u = torch.randn(2 * CHUNK)
        u[CHUNK + 3] = bad
        assert not torch.isfinite(ops()._bucket_std([u])).all()


def test_thread_count_and_window_do_not_change_bits(seed, threads, monkeypatch, table):
    # chunks are claimed dynamically by the threads, windows pipeline the statistics with the
    # modulation: none of it may change a bit
    ts = [torch.randn(n) * 0.2 for n in (5 * CHUNK + 3, 7, 2 * CHUNK, 1, CHUNK - 1, 3 * CHUNK + 9)]
    offs = stream_offsets(ts, 5)
    results = []
    for nt, window in ((1, None), (2, None), (2, "1"), (2, "0"), (1, str(3 * CHUNK)), (2, str(CHUNK))):
        torch.set_num_threads(nt)
        if window is None:
            monkeypatch.delenv("MMMOD_CPU_WINDOW", raising=False)
        else:
            monkeypatch.setenv("MMMOD_CPU_WINDOW", window)
        results.append((modulate(ts, offs, k=0.7, seed=seed, step=2, modality=1, scaled=True),
                        ops()._bucket_std(ts), normals(2 * CHUNK + 3, seed, 1, 0, 7)))
    first = results[0]
    for other in results[1:]:
        assert all(torch.equal(x, y) for x, y in zip(first[0], other[0]))
        assert torch.equal(first[1], other[1]) and torch.equal(first[2], other[2])


def test_modulate_noise_equals_philox_normal_bits(table, seed):
    # the fused pass and philox_normal_ run the same generator: with k = 0 and a one-sigma
    # gradient the output is float32(sigma * n) for exactly the normals philox_normal_ gives
    g = torch.zeros(2 * CHUNK + 37)
    g[::2] = 1.0
    offs = [13]
    out = modulate([g], offs, k=0.0, seed=seed, step=6, modality=0)[0]
    sigma = torch.tensor(float(g.double().std()) + 1e-8, dtype=torch.float32)
    z = normals(g.numel(), seed, 6, 0, 13)
    assert torch.equal(out, (0.0 * g) + sigma * z)


# ---- scores ----------------------------------------------------------------------------------
@pytest.mark.parametrize("C", [1, 5, 8, 9, 31, 309, 1000])
def test_scores_vectorised_rows(table, seed, C):
    B = 257
    logits = [torch.randn(B, C) * 4, (torch.randn(B, C) * 2).half(), torch.randn(C, B).t()]
    labels = torch.randint(0, C, (B,))
    got = ops().scores(logits, labels)
    torch.testing.assert_close(got, reference.scores(logits, labels), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [t for t in TABLES if t != "scalar"] or
                         [pytest.param("avx2", marks=needs_avx2)])
def test_scores_tables_agree_and_non_finite(seed, name):
    z = torch.randn(64, 1000) * 3
    z[3, 17] = float("inf")
    z[5, :] = float("-inf")
    z[7, 999] = float("nan")
    y = torch.randint(0, 1000, (64,))
    for rows in ([0, 1, 2], [3], [5], [7], list(range(64))):
        a = with_table(name, lambda: ops().scores([z[rows]], y[rows]))
        b = with_table("scalar", lambda: ops().scores([z[rows]], y[rows]))
        want = reference.scores([z[rows]], y[rows])
        torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
