"""MMPareto's combine ops (``mmmod::_pair_moments``, ``mmmod::combine_``; docs/semantics.md
section 11) beyond the generic op tests of tests/ops/test_op_infos.py: the moments bit-identical to
the reference where its float64 sums are exact, independent of the CPU thread count, the
combine bit-identical, and a whole MMPareto step on each live backend bit-identical to the
reference backend's."""
import pytest
import torch

from mmmod import backends
from mmmod.reference import combine, ops as ref
from _backends import LIVE_BACKENDS, device_for

import _mmpareto_models as tm


def _pairs(dtype, seed, shapes=((37,), (3, 50), (0,), (40000,))):
    """Small integers: every product and partial sum is an integer below 2^53, so the float64
    moments are exact in any summation order."""
    g = torch.Generator().manual_seed(seed)
    fused = [torch.randint(-4, 5, s, generator=g).to(dtype) for s in shapes]
    summed = [torch.randint(-8, 9, s, generator=g).to(dtype) for s in shapes]
    return fused, summed


@pytest.mark.parametrize("backend", LIVE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_moments_are_the_references_bits_where_it_is_exact(backend, dtype):
    dev = device_for(backend)
    fused, summed = _pairs(dtype, 0)
    fused, summed = [t.to(dev) for t in fused], [t.to(dev) for t in summed]
    scale = torch.tensor([0.25], dtype=torch.float64, device=dev)
    run = backends.kernel("_pair_moments", backend, dev)
    for s in (None, scale):
        got, want = run(fused, summed, s), ref.pair_moments(fused, summed, s)
        assert got.dtype == torch.float64 and got.shape == (4, 3)
        assert torch.equal(got.cpu(), want.cpu()), (got, want)
    assert torch.equal(got[2].cpu(), torch.zeros(3, dtype=torch.float64))  # the empty tensor


@pytest.mark.skipif(not backends.status("cpu")[0], reason="the CPU extension is not built")
def test_cpu_moments_do_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(3)
    fused = [torch.randn(600003, generator=g), torch.randn(70, 9, generator=g)]
    summed = [torch.randn(600003, generator=g), torch.randn(70, 9, generator=g)]
    run = backends.kernel("_pair_moments", "cpu", "cpu")
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(run(fused, summed, None))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    torch.testing.assert_close(outs[0], ref.pair_moments(fused, summed), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", LIVE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_combine_is_the_references_bits(backend, dtype):
    dev = device_for(backend)
    g = torch.Generator().manual_seed(5)
    shapes = ((37,), (3, 50), (0,), (20000,))
    fused = [torch.randn(s, generator=g).to(dtype).to(dev) for s in shapes]
    summed = [torch.randn(s, generator=g).to(dtype).to(dev) for s in shapes]
    for scale in (None, torch.tensor([2.0 ** -10], dtype=torch.float64, device=dev)):
        for sign in (1, -1):  # equal weights / the min-norm branch
            moments = ref.pair_moments(fused, [sign * t for t in summed], scale)
            got, want = [t.clone() for t in summed], [t.clone() for t in summed]
            w = backends.kernel("combine_", backend, dev)(got, fused, moments, [4], 1.5, scale)
            w_ref = combine.weights_and_combine_(fused, want, moments, 1.5, scale)[None]
            assert torch.equal(w.cpu(), w_ref.cpu()), (w, w_ref)
            assert all(torch.equal(a, b) for a, b in zip(got, want))
            assert not torch.equal(got[0], summed[0])  # it wrote
        assert (w_ref != 0.5).all()


@pytest.mark.parametrize("backend", [b for b in LIVE_BACKENDS if b != "torch"])
def test_a_training_run_on_the_fused_kernels_is_the_reference_runs(backend):
    """Four steps with conflicting gradients (the min-norm branch): parameters and logged
    weights of ``backend`` equal those of ``backend="torch"`` up to the moments' summation
    order (a few float64 ulps; the combine itself is the reference's bits)."""
    runs = {}
    for b in ("torch", backend):
        torch.manual_seed(0)
        model = tm.AVNet()
        opt = tm.make_opt(model, tm.NAMES2, backend=b)
        for xs, y in tm.data(tm.NAMES2, 4, 1):
            tm.mmmod_step(model, opt, xs, y, tm.NAMES2)
        runs[b] = ([p.detach().clone() for p in model.parameters()],
                   opt._method_state["weights"].clone())
    (pt, wt), (pb, wb) = runs["torch"], runs[backend]
    for a, c in zip(pt, pb):
        torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(wb, wt, rtol=1e-9, atol=1e-12)
    assert (wt[0] != 0.5).any()  # the min-norm branch ran


def _cpu_tables():
    import mmmod._C
    info = mmmod._C.cpu_kernels()
    return ((["avx512"] if info.get("avx512_supported") else [])
            + (["avx2"] if info["avx2_supported"] else []) + ["scalar"])


@pytest.mark.skipif(not backends.status("cpu")[0], reason="the CPU extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_every_cpu_kernel_table_gives_the_same_moments(dtype, monkeypatch):
    """The moments' lanes are the same fused multiply-adds in the same order in every kernel
    table (cpu_kernels.h: pair_lanes_*; std::fma in the portable one), so scalar, AVX2 and
    AVX-512 agree bit for bit on random values, with and without a fused scale, on sizes with
    and without a tail past the 16 lanes and across chunks; each is the reference within float64
    rounding."""
    import mmmod._C
    g = torch.Generator().manual_seed(11)
    shapes = ((1,), (15,), (16,), (37, 3), (0,), (2 * 16384 + 21,))
    fused = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    summed = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    run = backends.kernel("_pair_moments", "cpu", "cpu")
    monkeypatch.delenv("MMMOD_CPU_SCALAR", raising=False)
    for scale in (None, torch.tensor([2.0 ** -7], dtype=torch.float64)):
        rows = {}
        for name in _cpu_tables():
            monkeypatch.setenv("MMMOD_CPU_KERNELS", name)
            assert mmmod._C.cpu_kernels()["active"] == name
            rows[name] = run(fused, summed, scale)
        first = next(iter(rows.values()))
        assert all(torch.equal(r, first) for r in rows.values()), list(rows)
        torch.testing.assert_close(first, ref.pair_moments(fused, summed, scale), rtol=1e-12,
                                   atol=1e-300)
    monkeypatch.setenv("MMMOD_CPU_KERNELS", "bogus")
    with pytest.raises(ValueError, match="MMMOD_CPU_KERNELS=bogus"):
        run(fused, summed, None)


@pytest.mark.skipif(not backends.status("cpu")[0], reason="the CPU extension is not built")
def test_cpu_moments_take_non_contiguous_pairs():
    g = torch.Generator().manual_seed(12)
    fused = [torch.randn(40, 33, generator=g).t(), torch.randn(70, generator=g)[::3]]
    summed = [torch.randn(33, 40, generator=g), torch.randn(48, generator=g)[1::2]]
    got = backends.kernel("_pair_moments", "cpu", "cpu")(fused, summed, None)
    want = ref.pair_moments([t.contiguous() for t in fused], [t.contiguous() for t in summed])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", LIVE_BACKENDS)
def test_combine_takes_every_modality_in_one_call(backend):
    """``groups`` splits one call's tensors into modalities: each modality's weights and writes
    are those of a call with its tensors alone (one modality conflicting, one not)."""
    dev = device_for(backend)
    g = torch.Generator().manual_seed(6)
    shapes = ((37,), (3, 50), (20000,), (8, 8), (0,))
    fused = [torch.randn(s, generator=g).to(dev) for s in shapes]
    summed = [torch.randn(s, generator=g).to(dev) for s in shapes]
    summed[:3] = [-3 * t for t in summed[:3]]
    groups = [3, 2]
    run = backends.kernel("combine_", backend, dev)
    moments = ref.pair_moments(fused, summed)
    got = [t.clone() for t in summed]
    w = run(got, fused, moments, groups, 1.5, None)
    assert w.shape == (2, 2) and w.dtype == torch.float64
    start = 0
    for m, n in enumerate(groups):
        alone = [t.clone() for t in summed[start:start + n]]
        w_alone = run(alone, fused[start:start + n], moments[start:start + n], [n], 1.5, None)
        assert torch.equal(w[m], w_alone[0])
        assert all(torch.equal(a, b) for a, b in zip(got[start:start + n], alone))
        start += n
    assert not torch.equal(w[0], w[1])  # the two modalities differ: the split matters


@pytest.mark.parametrize("backend", LIVE_BACKENDS)
@pytest.mark.parametrize("groups, match", [([1, 1], "add up to 2 tensors"),
                                           ([3, 0], "each at least 1"), ([], "each at least 1")])
def test_combine_refuses_bad_groups_before_writing(backend, groups, match):
    dev = device_for(backend)
    fused = [torch.randn(5, device=dev), torch.randn(4, device=dev), torch.randn(3, device=dev)]
    summed = [torch.randn(5, device=dev), torch.randn(4, device=dev), torch.randn(3, device=dev)]
    before = [t.clone() for t in summed]
    moments = ref.pair_moments(fused, summed)
    with pytest.raises(ValueError, match=match):
        backends.kernel("combine_", backend, dev)(summed, fused, moments, groups, 1.5, None)
    assert all(torch.equal(a, b) for a, b in zip(summed, before))


@pytest.mark.parametrize("backend", LIVE_BACKENDS)
def test_combine_without_moments_takes_its_own_first_pass(backend):
    """``moments=None``: the kernel runs the backend's own ``_pair_moments`` first; the same
    bits as the two calls."""
    dev = device_for(backend)
    g = torch.Generator().manual_seed(8)
    shapes = ((37,), (3, 50), (20000,), (0,))
    fused = [torch.randn(s, generator=g).to(dev) for s in shapes]
    summed = [torch.randn(s, generator=g).to(dev) for s in shapes]
    summed[0] = -summed[0]
    scale = torch.tensor([2.0 ** -3], dtype=torch.float64, device=dev)
    moments = backends.kernel("_pair_moments", backend, dev)(fused, summed, scale)
    run = backends.kernel("combine_", backend, dev)
    one, two = [t.clone() for t in summed], [t.clone() for t in summed]
    w_one = run(one, fused, None, [1, 3], 1.5, scale)
    w_two = run(two, fused, moments, [1, 3], 1.5, scale)
    assert torch.equal(w_one, w_two)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    assert not torch.equal(one[2], summed[2])
