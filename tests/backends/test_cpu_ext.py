"""The compiled ``cpu`` backend (the CPU kernels of torch.ops.mmmod) against the reference: the
cases specific to these kernels (chunk boundaries, thread counts, seeds and steps past 2^32,
the ops' own errors, opcheck). The scores / coefficients / modulation parity every fused backend
shares is tests/optim/test_parity.py.

Fresh seeds per run (the ``seed`` fixture). Tolerances:
- scores: rtol 1e-5 / atol 1e-6 (the extension accumulates in float64, the reference in fp32);
- coefficients: bit-identical (the op evaluates tanh with at::tanh, the reference's kernel);
- OGM / MLB (no noise): bit-identical for fp32, fp16, bf16, fp64;
- noise: the extension's normals equal the reference Philox within 1e-6 relative with an absolute
  floor of 1e-7 (only the log/sin/cos implementations differ: observed max ~3.2e-7 relative);
  OGM-GE outputs within 1e-6 |sigma n| plus one unit in the last place of the gradient's dtype.
"""
import math

import pytest
import torch

from mmmod import _ext, backends, reference
from mmmod.reference import philox
from mmmod.reference.native_rules import NativeRule

LIVE, WHY = backends.status("cpu")
pytestmark = pytest.mark.skipif(not LIVE, reason=f"C++ extension (backend 'cpu') not available: {WHY}")

#: elements per chunk of the CPU kernels, as compiled (1 only to collect when every test skips)
CHUNK = _ext.load("cpu")[0].build_info()["chunk"] if LIVE else 1
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7,
       torch.float64: 2.0 ** -52}


@pytest.fixture
def cpu():
    return backends.get("cpu", "cpu")


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def ops():
    return torch.ops.mmmod


def bucket(sizes, dtype, gen=None):
    return [torch.randn(n, generator=gen).mul_(0.01 + torch.rand(()).item()).to(dtype) for n in sizes]


def run_both(cpu, sizes, dtype, *, noise, noise_std="raw", k=0.37, gate=1.0, seed=0, step=0,
             modality=0, offsets=None, tensors=None):
    ts = tensors if tensors is not None else bucket(sizes, dtype)
    if offsets is None:
        offsets, run = [], 0
        for t in ts:
            offsets.append(run)
            run += t.numel()
    a = [t.clone() for t in ts]
    b = [t.clone() for t in ts]
    kk, gg = torch.tensor(k, dtype=torch.float32), torch.tensor(gate, dtype=torch.float32)
    cpu.modulate_bucket_(a, offsets, kk, gg, noise=noise, noise_std=noise_std, seed=seed, step=step,
                         modality=modality)
    reference.modulate_bucket_(b, offsets, kk, gg, noise=noise, noise_std=noise_std, seed=seed,
                               step=step, modality=modality)
    return ts, a, b, offsets


# ---- scores -------------------------------------------------------------------------------
def test_scores_non_contiguous_and_int32_labels(cpu, seed):
    logits = [torch.randn(5, 20).t(), (torch.randn(20, 3, 5) * 4)[:, 1, :],
              torch.randn(20, 10, dtype=torch.float64)[:, ::2]]
    labels = torch.randint(0, 5, (20,), dtype=torch.int32)
    assert not any(z.is_contiguous() for z in logits)
    want = reference.scores(logits, labels)
    torch.testing.assert_close(cpu.scores(logits, labels), want, rtol=1e-5, atol=1e-6)


def test_scores_out_of_range_labels_give_nan(cpu, seed):
    logits = [torch.randn(8, 4), torch.randn(8, 6), torch.randn(8, 6)]
    labels = torch.randint(0, 4, (8,))
    labels[3] = 5  # valid for C = 6 only
    got = cpu.scores(logits, labels)
    assert torch.isnan(got[0]) and torch.isfinite(got[1:]).all()
    torch.testing.assert_close(got, reference.scores(logits, labels), rtol=1e-5, atol=1e-6,
                               equal_nan=True)
    labels[0] = -1
    assert torch.isnan(cpu.scores(logits, labels)).all()


def test_scores_non_finite_logits_follow_reference(cpu):
    z = torch.tensor([[0.0, float("inf"), 1.0], [float("-inf")] * 3, [1.0, float("nan"), 0.0],
                      [2.0, 1.0, float("-inf")]])
    y = torch.tensor([0, 1, 0, 0])
    for rows in ([0], [1], [2], [3], [0, 3]):
        got = cpu.scores([z[rows], z[rows]], y[rows])
        torch.testing.assert_close(got, reference.scores([z[rows], z[rows]], y[rows]),
                                   equal_nan=True)


def test_scores_empty_batch(cpu):
    got = cpu.scores([torch.randn(0, 3), torch.randn(0, 3)], torch.zeros(0, dtype=torch.long))
    assert torch.equal(got, torch.zeros(2))


# ---- coefficients ---------------------------------------------------------------------------
@pytest.mark.parametrize("M", [2, 3, 4])
@pytest.mark.parametrize("method", ["ogm", "ogm_ge", "mlb", "none"])
def test_coefficients_match_reference(cpu, seed, M, method):
    for trial in range(50):
        s = torch.rand(M) * 64
        if trial % 7 == 0:
            s[1] = s[0]  # the M = 2 tie damps modality 0
        alpha = [0.1, 0.5, 0.8, 2.0][trial % 4]
        beta_max = [2.0, 10.0][trial % 2]
        got = cpu.coefficients(s, method, alpha, beta_max)
        want = reference.coefficients(s, method, alpha, beta_max)
        assert got.dtype == torch.float32
        assert torch.equal(got, want), (s, got, want)


def test_coefficients_nan_and_errors(cpu):
    s = torch.tensor([1.0, float("nan"), 3.0])
    for method in ("ogm", "mlb"):
        assert torch.isnan(cpu.coefficients(s, method, 0.5, 2.0)).all()
    assert torch.equal(cpu.coefficients(s, "none", 0.5, 2.0), torch.ones(3))
    with pytest.raises(ValueError):
        cpu.coefficients(torch.ones(1), "ogm", 0.5, 2.0)
    with pytest.raises(ValueError):
        cpu.coefficients(torch.ones(2), "bogus", 0.5, 2.0)
    with pytest.raises(ValueError, match="unknown native rule code 9"):
        ops().coefficients(torch.ones(2), 9, 0.5, 2.0)
    with pytest.raises(RuntimeError):  # the op takes the rule's int code (NativeRule), not a name
        ops().coefficients(torch.ones(2), "ogm", 0.5, 2.0)


# ---- modulation without noise: bit-identical ------------------------------------------------
SIZES = [[0], [1], [3, 0, 17], [CHUNK + 5, 1, 2 * CHUNK - 3], [4 * CHUNK + 1, 999]]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("sizes", SIZES)
def test_scaling_is_bit_identical(cpu, seed, dtype, sizes):
    for k in (0.336, 1.0, 1.7, 0.0):
        _, a, b, _ = run_both(cpu, sizes, dtype, noise=False, k=k)
        for x, y in zip(a, b):
            assert torch.equal(x, y)


# ---- noise ----------------------------------------------------------------------------------
def assert_noise_close(got, want):
    tol = 1e-6 * want.abs() + 1e-7
    bad = (got - want).abs() > tol
    assert not bad.any(), (got[bad][:5], want[bad][:5])


@pytest.mark.parametrize("offset", [0, 1, 2, 3, 5, (1 << 32) * 4 + 3])
@pytest.mark.parametrize("n", [1, 2, 7, CHUNK + 3, 3 * CHUNK + 1])
def test_philox_normal_matches_reference(seed, offset, n):
    s64 = (seed * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)
    for sd, step, modality in ((seed, 0, 0), (s64, 2 ** 32 + 5, 3)):
        out = torch.empty(n)
        ops()._philox_normal_(out, philox.seed_int64(sd), step & 0xFFFFFFFF, modality, offset)
        assert_noise_close(out, philox.philox_normal(sd, step, modality, offset, n))


def test_noise_statistics(seed):
    n = 1 << 20
    z = torch.empty(n)
    ops()._philox_normal_(z, seed, 3, 1, 0)
    z = z.double()
    assert abs(z.mean().item()) < 6 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 6 * math.sqrt(0.5 / n) + 1e-4
    assert abs(((z - z.mean()) ** 3).mean().item()) < 0.02
    assert abs((z ** 4).mean().item() - 3) < 0.05
    scipy_stats = pytest.importorskip("scipy.stats")
    assert scipy_stats.kstest(z[: 1 << 16].numpy(), "norm").pvalue > 1e-6
    # different steps / modalities give independent streams
    w = torch.empty(n)
    ops()._philox_normal_(w, seed, 4, 1, 0)
    v = torch.empty(n)
    ops()._philox_normal_(v, seed, 3, 0, 0)
    for other in (w, v):
        assert abs(torch.corrcoef(torch.stack([z, other.double()]))[0, 1].item()) < 6 / math.sqrt(n)


def test_gate_zero_and_non_finite_are_bit_identical(cpu, seed):
    for dtype in DTYPES:
        _, a, b, _ = run_both(cpu, [5, CHUNK + 1], dtype, noise=True, gate=0.0, k=0.4, seed=seed)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        ts = bucket([9, 2 * CHUNK], dtype)
        ts[0][3] = float("nan")
        ts[1][7] = float("inf")
        _, a, b, _ = run_both(cpu, None, dtype, noise=True, k=0.4, seed=seed, tensors=ts)
        for x, y in zip(a, b):
            assert torch.equal(x.isnan(), y.isnan())
            assert torch.equal(x.nan_to_num(), y.nan_to_num())


def test_one_element_and_constant_tensors(cpu, seed):
    # std of one element is 0 -> sigma 1e-8; a constant tensor has std 0 too (zeros: the
    # 1e-8 noise is not absorbed by rounding, so it is visible)
    for ts in ([torch.tensor([0.0])], [torch.zeros(CHUNK + 9)]):
        _, a, b, _ = run_both(cpu, None, torch.float32, noise=True, k=1.0, seed=seed, tensors=ts)
        assert_noise_close(a[0] / 1e-8, b[0] / 1e-8)
        assert (a[0] != 0).all()


def test_large_seed_and_step_wrap(cpu, seed):
    for sd, step in (((1 << 64) - 1 - seed, 2 ** 32 + 11), (-1 - seed, 7), (1 << 63, 2 ** 40)):
        ts, a, b, _ = run_both(cpu, [1000], torch.float32, noise=True, k=0.9, seed=sd, step=step,
                               modality=2)
        sigma = reference.modulate.tensor_sigma(ts[0], torch.tensor(0.9), "raw")
        assert ((a[0] - b[0]).abs() <= 1e-6 * sigma * 6 + 2 ** -23 * b[0].abs()).all()


# ---- determinism across thread counts ---------------------------------------------------------
def test_thread_count_does_not_change_bits(cpu, seed, threads):
    ts = bucket([7 * CHUNK + 3, 5, 3 * CHUNK], torch.float32)
    logits = [torch.randn(1000, 17), torch.randn(1000, 17)]
    labels = torch.randint(0, 17, (1000,))
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        a = [t.clone() for t in ts]
        cpu.modulate_bucket_(a, [0, 7 * CHUNK + 3, 7 * CHUNK + 8], torch.tensor(0.5),
                             torch.tensor(1.0), noise=True, noise_std="raw", seed=seed, step=1,
                             modality=0)
        results.append((a, ops()._bucket_std(ts), cpu.scores(logits, labels)))
    (a1, s1, c1), (a2, s2, c2) = results
    assert all(torch.equal(x, y) for x, y in zip(a1, a2))
    assert torch.equal(s1, s2) and torch.equal(c1, c2)


def test_bucket_std_matches_torch(seed):
    for dtype in DTYPES + [torch.float64]:
        ts = bucket([1, 2, 3 * CHUNK + 7], dtype)
        ts[2] += 1000.0  # a large mean: the merge must not cancel
        got = ops()._bucket_std(ts)
        want = torch.stack([reference.modulate.tensor_std(t) for t in ts])
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


# ---- dispatcher checks ------------------------------------------------------------------------
def test_opcheck_every_op(seed):
    from torch.library import opcheck
    logits = [torch.randn(6, 4), torch.randn(6, 4, dtype=torch.float64)]
    labels = torch.randint(0, 4, (6,))
    opcheck(ops().scores.default, (logits, labels))
    opcheck(ops().coefficients.default, (torch.rand(3) + 0.1, int(NativeRule.OGM), 0.8, 2.0))
    opcheck(ops().coefficients.default, (torch.rand(2) + 0.1, int(NativeRule.MLB), 0.5, 10.0))
    ts = [torch.randn(5), torch.randn(3, 4)]
    opcheck(ops().modulate_.default,
            (ts, [0, 5], torch.tensor(0.5), torch.tensor(1.0), True, False, seed, 3, 1))
    opcheck(ops().modulate_.default,
            (ts, [0, 5], torch.tensor(0.5), torch.tensor(1.0), False, False, seed, 3, 1))
    opcheck(ops()._bucket_std.default, ([torch.randn(7), torch.randn(2, 2)],))
    opcheck(ops()._philox_normal_.default, (torch.empty(11), seed, 2, 0, 3))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16])
@pytest.mark.parametrize("step", [0, 9, -1, 2 ** 32 + 11])
def test_capturable_overload_reads_a_cpu_step_tensor(seed, dtype, step):
    """modulate_.capturable with a CPU step counter is bit-identical to modulate_ with its value
    mod 2^32 (the CUDA op reads the same low 32 bits on the device)."""
    if not (torch.iinfo(dtype).min <= step <= torch.iinfo(dtype).max):
        pytest.skip(f"{step} does not fit {dtype}")
    ts = bucket([5, CHUNK + 3, 0], torch.float32)
    offs = [0, 5, CHUNK + 8]
    k, g = torch.tensor(0.6), torch.tensor(1.0)
    a = [t.clone() for t in ts]
    b = [t.clone() for t in ts]
    c = [t.clone() for t in ts]
    ops().modulate_(a, offs, k, g, True, False, seed, step & 0xFFFFFFFF, 1)
    ops().modulate_.capturable(b, offs, k, g, True, False, seed, 12345, 1, None,
                               torch.tensor(step, dtype=dtype))
    ops().modulate_.capturable(c, offs, k, g, True, False, seed, step & 0xFFFFFFFF, 1)
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a, b, c))
    assert not torch.equal(a[1], ts[1])


def test_capturable_overload_errors_and_opcheck(seed):
    from torch.library import opcheck
    k, g = torch.tensor(1.0), torch.tensor(1.0)
    x = torch.randn(4)
    before = x.clone()
    with pytest.raises(ValueError, match="no device table"):
        ops().modulate_.capturable([x], [0], k, g, True, False, 0, 0, 0,
                                   torch.zeros(10, dtype=torch.long), None)
    with pytest.raises(ValueError, match="0-d"):
        ops().modulate_.capturable([x], [0], k, g, True, False, 0, 0, 0, None,
                                   torch.zeros(1, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        ops().modulate_.capturable([x], [0], k, g, True, False, 0, 0, 0, None, torch.tensor(1.0))
    assert torch.equal(x, before)  # refused before anything was written
    opcheck(ops().modulate_.capturable,
            ([torch.randn(5), torch.randn(3, 4)], [0, 5], torch.tensor(0.5), torch.tensor(1.0),
             True, False, seed, 0, 1, None, torch.tensor(3)))


def test_op_input_errors():
    k, g = torch.tensor(1.0), torch.tensor(1.0)
    with pytest.raises(ValueError, match="contiguous"):
        ops().modulate_([torch.randn(4, 4).t()], [0], k, g, False, False, 0, 0, 0)
    with pytest.raises(ValueError, match="one device and dtype"):
        ops().modulate_([torch.randn(4), torch.randn(4).half()], [0, 4], k, g, False, False, 0, 0, 0)
    with pytest.raises(ValueError, match="offsets"):
        ops().modulate_([torch.randn(4)], [0, 4], k, g, False, False, 0, 0, 0)
    with pytest.raises(ValueError, match="float32"):
        ops().modulate_([torch.randn(4)], [0], k.double(), g, False, False, 0, 0, 0)
    with pytest.raises(ValueError, match="batch size"):
        ops().scores([torch.randn(3, 2)], torch.zeros(4, dtype=torch.long))


def test_torch_compile_fullgraph(seed):
    def step(z0, z1, y, g, gate):
        s = ops().scores([z0, z1], y)
        k = ops().coefficients(s, int(NativeRule.OGM), 0.8, 2.0)
        ops().modulate_([g], [0], k[0], gate, True, False, seed, 1, 0)
        return k

    z0, z1, y = torch.randn(8, 3), torch.randn(8, 3), torch.randint(0, 3, (8,))
    g, gate = torch.randn(100), torch.tensor(1.0)
    g2 = g.clone()
    k1 = torch.compile(step, fullgraph=True)(z0, z1, y, g, gate)
    k2 = step(z0, z1, y, g2, gate)
    assert torch.equal(k1, k2) and torch.equal(g, g2)
