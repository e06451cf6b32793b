"""``mmmod::_bucket_moments``: float64 ``(count, mean, M2)`` rows of a bucket's tensors, the
per-shard statistics sharded OGM-GE gathers across ranks (mmmod/optim/sharding.py), on every
live backend (tests/_backends.py): the plain-torch reference, the CPU extension, Triton (the
interpreter on CPU), CUDA (``-m gpu``).

Bounds, against an oracle that sums in exact arithmetic (``math.fsum``) over the values read as
float64. Every supported dtype converts to float64 exactly, so the only error is the kernels'
float64 summation and the bounds are the same for float32, float16, bfloat16 and float64:

- count: exact;
- mean: ``|mean - mean*| <= 128 eps64 mean(|x|)`` (a float64 sum of at most ~1,000 terms per
  accumulator before a fixed tree: chunks of 16 K elements in 16 lanes on the CPU, 4 K-element
  blocks on Triton, 8-element tiles merged on CUDA);
- M2: ``|M2 - M2*| <= 256 eps64 M2*`` (on the CPU each chunk's sums of ``x - c`` and
  ``(x - c)^2`` about a shift ``c`` near its mean, falling back to the two-pass deviations from
  the chunk's mean where ``c`` is too far from it to keep that bound; elsewhere two-pass);
  exactly 0 below two elements.

And the std merged from uneven shards (FSDP2's ``torch.chunk`` rows, empty shards included):
within ``128 eps64`` (relative) of the correctly rounded std; observed <= 31 eps64 over 1,200
random tensors of up to 1.7e5 elements. ``reference.modulate.tensor_std`` (torch's
``double().std()``) is itself up to ~380 eps64 from that value at 1e5 elements, so against it
the bound is its own distance plus ours.
"""
import math

import pytest
import torch

from mmmod import _ops, backends, reference
from mmmod.reference import moments
from mmmod.optim.sharding import ShardPlan, Shard, merged_std

from _backends import LIVE_BACKENDS, device_for

EPS = 2.0 ** -52
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# odd sizes around every backend's chunking: CPU 16 K (kChunkCpu), Triton 4 K (block), CUDA 64 K
SIZES = (0, 1, 2, 3, 17, 4095, 4097, 16383, 16385, 2 * 16384 + 5, 65536 + 7)


def _impl(name):
    return backends._load(name)


def _bucket(dtype, device, seed, sizes=SIZES):
    """Random tensors of odd sizes plus two non-contiguous views; each with its own scale and an
    offset of up to 3 standard deviations (gradients are not centred)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(sizes):
        scale = 10.0 ** float(torch.randint(-6, 2, (), generator=g))
        off = 3 * float(torch.rand((), generator=g))
        out.append(((torch.randn(n, generator=g) + off) * scale).to(dtype))
    out.append((torch.randn(37, 29, generator=g) * 0.02 + 0.01).to(dtype).t())  # transposed
    out.append(torch.randn(2 * 999, generator=g).to(dtype)[::2])                # strided
    return [t.to(device) for t in out]


def _oracle(t):
    """(count, mean, M2) with exactly rounded sums of the float64 values."""
    v = t.detach().double().reshape(-1).cpu().tolist()
    n = len(v)
    if n == 0:
        return 0.0, 0.0, 0.0, 0.0
    mean = math.fsum(v) / n
    return float(n), mean, math.fsum((x - mean) ** 2 for x in v), math.fsum(abs(x) for x in v) / n


def _assert_moments(rows, tensors, where):
    assert rows.dtype == torch.float64 and rows.shape == (len(tensors), 3), where
    got = rows.cpu().tolist()
    for i, t in enumerate(tensors):
        n, mean, m2, mabs = _oracle(t)
        gn, gmean, gm2 = got[i]
        assert gn == n, (where, i)
        assert abs(gmean - mean) <= 128 * EPS * mabs, (where, i, gmean, mean)
        if n < 2:
            assert gm2 == 0.0, (where, i, gm2)
        else:
            assert abs(gm2 - m2) <= 256 * EPS * m2, (where, i, gm2, m2)


# ---- every backend against the float64 oracle -------------------------------------------------
@pytest.mark.parametrize("backend", LIVE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_backend_matches_the_float64_oracle(backend, dtype, seed):
    ts = _bucket(dtype, device_for(backend), seed)
    rows = _impl(backend).bucket_moments(ts)
    assert rows.device.type == device_for(backend).type
    _assert_moments(rows, ts, (backend, dtype))


@pytest.mark.parametrize("backend", LIVE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunks_that_start_far_from_their_mean_keep_the_bound(backend, dtype, seed):
    """The CPU's one-pass sums take their shift from a chunk's first 16 values; where those lie
    far from the chunk's mean against its spread, the one-pass M2 would lose ~10 digits, and the
    chunk must be redone in two passes (a kernel without that fallback fails here)."""
    g = torch.Generator().manual_seed(seed)
    chunk = 16384
    outs = []
    for n in (chunk + 77, 3 * chunk + 5):
        t = torch.randn(n, generator=g, dtype=torch.float64) * 1e-3 + 0.25
        for s in range(0, n, chunk):
            m = min(16, n - s)
            t[s:s + m] = 1e3 + torch.rand(m, generator=g, dtype=torch.float64)
        outs.append(t.to(dtype))
    outs.append(torch.cat([torch.full((16,), -7e2, dtype=dtype), torch.randn(900, generator=g).to(dtype)]))
    ts = [t.to(device_for(backend)) for t in outs]
    _assert_moments(_impl(backend).bucket_moments(ts), ts, (backend, dtype))


@pytest.mark.parametrize("backend", LIVE_BACKENDS)
def test_a_tensor_s_row_does_not_depend_on_its_bucket(backend, seed):
    """Chunks never span tensors, so a tensor's row has the same bits alone or in any bucket
    (sharding groups shards by dtype and device, which changes who shares a call)."""
    ts = _bucket(torch.float32, device_for(backend), seed, sizes=(5, 4097, 16385, 0, 70001))
    impl = _impl(backend)
    together = impl.bucket_moments(ts)
    for i, t in enumerate(ts):
        assert torch.equal(impl.bucket_moments([t])[0], together[i]), i
    assert torch.equal(impl.bucket_moments(ts[::-1]), together.flip(0))


@pytest.mark.parametrize("backend", LIVE_BACKENDS)
def test_empty_bucket_and_empty_tensors(backend):
    impl = _impl(backend)
    out = impl.bucket_moments([])
    assert out.shape == (0, 3) and out.dtype == torch.float64
    d = device_for(backend)
    out = impl.bucket_moments([torch.empty(0, device=d), torch.empty(3, 0, device=d)])
    assert torch.equal(out.cpu(), torch.zeros(2, 3, dtype=torch.float64))


@pytest.mark.parametrize("backend", LIVE_BACKENDS)
def test_non_finite_values_give_non_finite_moments(backend):
    """NaN or inf anywhere in a tensor: its merged std is not finite, so it gets no noise
    (reference.noise_sigma -> 0), as an unsharded tensor's own statistics decide."""
    d = device_for(backend)
    x = torch.randn(20000, device=d)
    bad = []
    for v in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[12345] = v
        bad.append(y)
    rows = _impl(backend).bucket_moments(bad + [x])
    assert torch.isfinite(rows[3]).all()
    std = merged_std(rows.cpu()[None])
    assert not torch.isfinite(std[:3]).any() and torch.isfinite(std[3])
    sigma = reference.noise_sigma(std, torch.tensor(1.0), "raw")
    assert torch.equal(sigma[:3], torch.zeros(3))


@pytest.mark.parametrize("backend", LIVE_BACKENDS)
def test_bad_input_is_named_before_anything_runs(backend):
    impl = _impl(backend)
    d = device_for(backend)
    with pytest.raises(TypeError, match=r"_bucket_moments: tensor 1 is .*expected float32"):
        impl.bucket_moments([torch.randn(3, device=d), torch.arange(3, device=d)])
    with pytest.raises(ValueError, match=r"one dtype and device; tensor 2 is"):
        impl.bucket_moments([torch.randn(3, device=d), torch.randn(2, device=d),
                             torch.randn(3, device=d, dtype=torch.float64)])


# ---- the same statistics as each backend's own modulation --------------------------------------
def _std_of(rows):
    n, m2 = rows[:, 0], rows[:, 2]
    return torch.where(n >= 2, (m2 / (n - 1).clamp_min(1)).sqrt(), torch.zeros_like(m2))


@pytest.mark.skipif("cpu" not in LIVE_BACKENDS, reason="C++ extension not built")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_rows_are_modulate_s_own_statistics(dtype, seed):
    """The CPU op runs modulate_'s statistics pass (bucket_moments, chunk-order merge): the std
    made of its rows is _bucket_std's, bit for bit."""
    ts = _bucket(dtype, "cpu", seed)
    rows = torch.ops.mmmod._bucket_moments(ts).tolist()
    # the C++ kernel's sqrt(m2 / (n - 1)), correctly rounded as Python's math.sqrt (torch's
    # vectorised float64 path was seen one ulp off, e.g. for n = 2 at seed 6)
    std = torch.tensor([math.sqrt(m2 / (n - 1.0)) if n >= 2 else 0.0 for n, _, m2 in rows],
                       dtype=torch.float64)
    assert torch.equal(std, torch.ops.mmmod._bucket_std([t.contiguous() for t in ts]))


@pytest.mark.skipif("triton" not in LIVE_BACKENDS, reason="triton not live here")
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_rows_are_the_sigma_kernel_s_statistics(dtype, seed):
    """_moments_kernel and _sigma_kernel share one combine (_tensor_moments): the sigma made of
    the rows (reference.noise_sigma) is the one the Triton modulation computes, bit for bit."""
    impl = _impl("triton")
    ts = [t.contiguous() for t in _bucket(dtype, device_for("triton"), seed) if t.numel()]
    k, gate = torch.tensor(-0.7, device=ts[0].device), torch.tensor(1.0, device=ts[0].device)
    rows = impl.bucket_moments(ts)
    want = impl.sigmas(ts, k, noise_std="scaled", gate=gate)
    assert torch.equal(reference.noise_sigma(_std_of(rows), k, "scaled"), want)


# ---- the CPU kernel: thread counts and kernel tables ---------------------------------------------
def _cpu_tables():
    if "cpu" not in LIVE_BACKENDS:
        return []
    import mmmod._C
    info = mmmod._C.cpu_kernels()
    return ((["avx512"] if info.get("avx512_supported") else [])
            + (["avx2"] if info["avx2_supported"] else []) + ["scalar"])


@pytest.mark.skipif("cpu" not in LIVE_BACKENDS, reason="C++ extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_rows_do_not_depend_on_the_thread_count(dtype, seed):
    ts = _bucket(dtype, "cpu", seed) + [torch.randn(5 * 16384 + 3)]
    ts[-1] = ts[-1].to(dtype)
    before = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 3, 8):
            torch.set_num_threads(n)
            runs.append(torch.ops.mmmod._bucket_moments(ts))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(r, runs[0]) for r in runs[1:])
    _assert_moments(runs[0], ts, dtype)


@pytest.mark.skipif("cpu" not in LIVE_BACKENDS, reason="C++ extension not built")
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_cpu_kernel_table_gives_the_same_bits(dtype, monkeypatch, seed):
    """The statistics lanes are the same additions in the same order in every table
    (cpu_kernels.h), so scalar, AVX2 and AVX-512 agree bit for bit; each meets the oracle."""
    import mmmod._C
    ts = _bucket(dtype, "cpu", seed)
    monkeypatch.delenv("MMMOD_CPU_SCALAR", raising=False)
    rows = {}
    for name in _cpu_tables():
        monkeypatch.setenv("MMMOD_CPU_KERNELS", name)
        assert mmmod._C.cpu_kernels()["active"] == name
        rows[name] = torch.ops.mmmod._bucket_moments(ts)
        _assert_moments(rows[name], ts, name)
    first = next(iter(rows.values()))
    assert all(torch.equal(r, first) for r in rows.values()), list(rows)
    monkeypatch.setenv("MMMOD_CPU_KERNELS", "bogus")
    with pytest.raises(ValueError, match="MMMOD_CPU_KERNELS=bogus"):
        torch.ops.mmmod._bucket_moments(ts)


# ---- the op's definition: fake, opcheck, the reference default -------------------------------------
def test_opcheck_and_fake():
    from torch.library import opcheck
    g = torch.Generator().manual_seed(3)
    ts = [torch.randn(7, generator=g), torch.empty(0), torch.randn(5, 4, generator=g).t()]
    opcheck(torch.ops.mmmod._bucket_moments.default, (ts,))
    with torch.device("meta"):
        out = torch.ops.mmmod._bucket_moments([torch.empty(70000), torch.empty(3, 5)])
    assert out.shape == (2, 3) and out.dtype == torch.float64 and out.device.type == "meta"
    with pytest.raises(TypeError, match="tensor 0 is torch.int32"):
        _ops.FAKES["_bucket_moments"]([torch.empty(3, dtype=torch.int32, device="meta")])


def test_reference_default_is_the_op_without_the_extension():
    """The op's default (CompositeExplicitAutograd) is the plain-torch reference: what runs on a
    device without kernels (and what backend='torch' returns)."""
    ts = _bucket(torch.float16, "cpu", 11)
    ref = moments.bucket_moments(ts)
    _assert_moments(ref, ts, "reference")
    assert torch.equal(_impl("torch").bucket_moments(ts), ref)


# ---- shards: the merged std is the whole tensor's -----------------------------------------------
def _exact_std(t):
    n, _, m2, _ = _oracle(t)
    return math.sqrt(m2 / (n - 1))


@pytest.mark.parametrize("backend", LIVE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_std_merged_from_uneven_shards_is_the_whole_tensor_s(backend, dtype, seed):
    """Random tensors sharded as FSDP2 does (``torch.chunk`` of the rows over 2..8 ranks, the
    missing ranks' shards empty), each shard's row from the backend, the table merged in rank
    order as every rank does: within 128 eps64 of the correctly rounded std, and no further from
    ``tensor_std`` than ``tensor_std`` is from it plus that."""
    g = torch.Generator().manual_seed(seed)
    impl, d = _impl(backend), device_for(backend)
    cases = 12 if backend == "triton" else 40
    for _ in range(cases):
        rows = int(torch.randint(1, 1500, (), generator=g))
        inner = [int(x) for x in torch.randint(1, 9, (int(torch.randint(0, 3, (), generator=g)),),
                                               generator=g)]
        world = int(torch.randint(2, 9, (), generator=g))
        off = 3 * float(torch.rand((), generator=g))
        whole = ((torch.randn(rows, *inner, generator=g) + off) * 0.01).to(dtype).to(d)
        if whole.numel() < 2:
            continue
        shards = list(whole.chunk(world))
        shards += [whole.new_empty(0, *inner)] * (world - len(shards))
        table = torch.stack([impl.bucket_moments([s]) for s in shards]).cpu()  # [W, 1, 3]
        std = float(merged_std(table)[0])
        exact = _exact_std(whole)
        ours = abs(std - exact) / exact
        assert ours <= 128 * EPS, (whole.shape, world, ours / EPS)
        theirs = abs(float(reference.modulate.tensor_std(whole)) - exact) / exact
        assert abs(std - float(reference.modulate.tensor_std(whole))) / exact <= theirs + 128 * EPS


# ---- ShardPlan.global_stds: one op call per (device, dtype) bucket --------------------------------
@pytest.fixture
def one_rank_group():
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_global_stds_buckets_by_dtype_and_keeps_every_entry_s_row(one_rank_group, monkeypatch,
                                                                  seed):
    """Entries of mixed dtypes, a missing gradient and an empty shard, over two modalities: one
    ``_bucket_moments`` call per dtype, and each entry's std is that of its own row (the rows
    are put back in table order), equal to the whole tensor's within the bound above."""
    g = torch.Generator().manual_seed(seed)
    grads = [[torch.randn(300, generator=g), torch.randn(40, 3, generator=g).half(), None,
              torch.empty(0), torch.randn(17, generator=g).bfloat16()],
             [torch.randn(5, 5, generator=g).bfloat16(), torch.randn(1, generator=g)]]
    shards = [[Shard(one_rank_group, 0, 1 if x is None else x.numel(),
                     1 if x is None else x.numel()) for x in row] for row in grads]
    plan = ShardPlan(shards, [[0] * len(row) for row in grads])
    calls = []
    real = backends.kernel

    def counting_kernel(op, *args, **kwargs):  # the resolver is the one route to a kernel
        fn = real(op, *args, **kwargs)
        if op != "_bucket_moments":
            return fn

        def counting(tensors):
            calls.append([t.dtype for t in tensors])
            return fn(tensors)
        return counting

    monkeypatch.setattr(backends, "kernel", counting_kernel)
    stds = plan.global_stds(grads)
    monkeypatch.undo()
    assert sorted(map(str, calls)) == sorted(map(str, [[torch.float32] * 3, [torch.float16],
                                                       [torch.bfloat16] * 2]))
    for m, row in enumerate(grads):
        for i, x in enumerate(row):
            if x is None:
                assert stds[m][i] is None
                continue
            own = _std_of(torch.ops.mmmod._bucket_moments([x]))[0]
            assert stds[m][i].dtype == torch.float64 and torch.equal(stds[m][i], own), (m, i)
            if x.numel() >= 2:
                assert abs(float(own) - _exact_std(x)) <= 128 * EPS * _exact_std(x)
            else:
                assert float(own) == 0.0


# ---- CUDA (-m gpu) -------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_op_matches_the_oracle_and_repeats_its_bits(dtype, seed):
    ts = _bucket(dtype, "cuda", seed)
    a = torch.ops.mmmod._bucket_moments(ts)
    b = torch.ops.mmmod._bucket_moments(ts)
    assert a.device.type == "cuda" and torch.equal(a, b)
    _assert_moments(a, ts, dtype)
    # the CUDA extension (when loaded): the std kernel's own merge, bit for bit
    if backends.status("cuda")[0]:
        assert torch.equal(_std_of(a), torch.ops.mmmod._bucket_std([t.contiguous() for t in ts]))
