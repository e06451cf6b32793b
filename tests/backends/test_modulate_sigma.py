"""``mmmod::modulate_sigma_``: the noisy rescale with each tensor's sigma given (no statistics
pass), what sharded OGM-GE runs with the std gathered across a tensor's shards
(``functional.modulate_(stds=)``), on every live backend.

What is compared, with which tolerance, and why:

- ``reference.noise_sigma`` vs an independent numpy float64 -> float32 formula: bit-identical
  (IEEE float64 ops, one rounding to float32).
- a backend's ``modulate_sigma_`` vs its own ``modulate_`` (sigma from its own statistics):
  bit-identical, every dtype (the same normals, sigma and roundings).
- shards (offsets into the whole tensor, the whole tensor's sigma) vs the whole tensor:
  bit-identical, every dtype (each element sees the same sigma and the same normal).
- a fused backend vs the reference given-std path: ``1e-6 |sigma n|`` + 1 ulp of the dtype, as
  tests/optim/test_parity.py (the fused normals' log/sin/cos differ from torch's by ulps); the torch
  backend: bit-identical.
- a non-finite sigma, a NaN coefficient (gate 0): bit-identical to ``k g`` / untouched (the noise
  term is exactly 0).
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.library import opcheck

from mmmod import _ext, backends, functional, reference
from mmmod.reference import philox

from _backends import LIVE_BACKENDS, device_for

ROOT = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7,
       torch.float64: 2.0 ** -23}  # float64 gradients are modulated in float32
_CPU_EXT = _ext.load("cpu")[0]
CPU_CHUNK = _CPU_EXT.build_info()["chunk"] if _CPU_EXT is not None else 1 << 14
# empty, one element, odd sizes, a tensor over several kernel chunks (CPU chunks, Triton noise
# chunks of 1024 elements, CUDA chunks of 65536 on a GPU), offsets not multiples of 4
SIZES = {
    "odd": [7, 0, 1, 33, 5 * 3],
    "chunks": [CPU_CHUNK + 5, 3, 2 * 1024 + 1],
}


def _impl(backend):
    return backends.get(backend, device_for(backend))


def _tensors(sizes, dtype, device, gen, scale=0.01):
    return [(torch.randn(n, generator=gen) * scale + scale / 3).to(dtype).to(device)
            for n in sizes]


def _clone(ts):
    return [t.clone() for t in ts]


def _own_sigma(backend, ts, k, noise_std):
    """The sigma this backend's own ``modulate_`` statistics find (before the gate)."""
    live = [t for t in ts if t.numel() > 0]
    if backend == "triton":  # the statistics + sigma kernels, gate 1 (exact)
        own = _impl(backend).sigmas(live, k, noise_std=noise_std)
        out = torch.zeros(len(ts), dtype=torch.float32, device=k.device)
        idx = [i for i, t in enumerate(ts) if t.numel() > 0]
        out[torch.tensor(idx, device=k.device)] = own
        return out
    return reference.noise_sigma(_own_std(backend, ts), k, noise_std)


def _own_std(backend, ts):
    """float64 std of each tensor as this backend's statistics pass computes it."""
    if backend == "torch":
        return torch.stack([reference.tensor_std(t) for t in ts])
    return torch.ops.mmmod._bucket_std(ts)


def _offsets(ts, start=0):
    return functional.stream_offsets(ts, start)


def _assert_noise_close(got, want, sigma_n, dtype):
    got, want = got.reshape(-1).float().cpu(), want.reshape(-1).float().cpu()
    ulp = EPS[dtype] * want.abs() + torch.finfo(dtype).tiny * EPS[dtype]
    bad = (got - want).abs() > 1e-6 * sigma_n.cpu() + ulp
    assert not bad.any(), (got[bad][:5], want[bad][:5])


def test_noise_sigma_is_float32_of_std_plus_eps_non_finite_zero():
    """The one helper that turns a given std into sigma, against an independent numpy formula:
    float32(std + 1e-8) (scaled: float32(|k| std + 1e-8)), 0 where not finite (NaN, inf, and a
    finite float64 std beyond float32's range)."""
    std = torch.tensor([0.0, 1e-12, 0.5, 3.0, 1.7e-3, 1e30, 1e39, float("inf"), float("nan"),
                        2.0 ** -30, 123456.789], dtype=torch.float64)
    for kv in (0.7, -1.3, 1.0, 1e-3):
        k = torch.tensor(kv, dtype=torch.float32)
        for noise_std in ("raw", "scaled"):
            got = reference.noise_sigma(std, k, noise_std)
            s = std.numpy().copy()
            if noise_std == "scaled":
                s = s * abs(np.float64(np.float32(kv)))
            with np.errstate(over="ignore", invalid="ignore"):
                want = (s + 1e-8).astype(np.float32)
            want[~np.isfinite(want)] = 0
            assert got.dtype == torch.float32
            assert np.array_equal(got.numpy().view(np.int32), want.view(np.int32)), (kv, noise_std)
            # a stack gives the bits of separate 0-d calls (the reference's per-tensor path)
            one = torch.stack([reference.noise_sigma(x, k, noise_std) for x in std])
            assert torch.equal(one, got)


@pytest.mark.parametrize("backend", LIVE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise_std", ["raw", "scaled"])
@pytest.mark.parametrize("sizes", list(SIZES))
def test_matches_own_modulate_bitwise(backend, seed, dtype, noise_std, sizes):
    """Given the sigma its own statistics would find, a backend writes what its modulate_
    writes: bit for bit, so sharded and unsharded OGM-GE agree on every backend."""
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(seed)
    ts = _tensors(SIZES[sizes], dtype, dev, gen)
    offs = _offsets(ts, 6)
    k = torch.tensor(0.83, device=dev)
    gate = torch.tensor(1.0, device=dev)
    impl = _impl(backend)
    a, b = _clone(ts), _clone(ts)
    impl.modulate_bucket_(a, offs, k, gate, noise=True, noise_std=noise_std, seed=seed,
                          step=seed % 101, modality=1)
    sigma = _own_sigma(backend, ts, k, noise_std)
    impl.modulate_sigma_bucket_(b, offs, k, gate, sigma, seed=seed, step=seed % 101, modality=1)
    for x, y, g in zip(a, b, ts):
        assert torch.equal(x, y), (backend, dtype, g.numel())
        if g.numel() > 0:
            assert not torch.equal(x, g)  # the noise was applied (the check above can fail)


@pytest.mark.parametrize("backend", LIVE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("noise_std", ["raw", "scaled"])
def test_matches_reference_given_std_path(backend, seed, dtype, noise_std):
    """Against the plain-torch definition with the same given stds (shard-like: stds that are
    not the tensors' own): sigma bit-identical (one helper), the output within the parity
    tolerance (the torch backend: bit-identical)."""
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(seed)
    ts = _tensors(SIZES["odd"] + SIZES["chunks"], dtype, dev, gen)
    offs = _offsets(ts, 3)
    stds = [(torch.rand((), generator=gen, dtype=torch.float64) * 0.05).to(dev) for _ in ts]
    k = torch.tensor(1.37, device=dev)
    gate = torch.tensor(1.0, device=dev)
    want = _clone(ts)
    reference.modulate_bucket_(want, offs, k, gate, noise=True, noise_std=noise_std, seed=seed,
                               step=9, modality=2, stds=stds)
    sigma = reference.noise_sigma(torch.stack(stds), k, noise_std)
    got = _clone(ts)
    _impl(backend).modulate_sigma_bucket_(got, offs, k, gate, sigma, seed=seed, step=9,
                                          modality=2)
    for i, (x, y, g, off) in enumerate(zip(got, want, ts, offs)):
        if backend == "torch":
            assert torch.equal(x, y)
        elif g.numel():
            z = philox.philox_normal(seed, 9, 2, off, g.numel())
            _assert_noise_close(x, y, (sigma[i].cpu() * z).abs(), dtype)


@pytest.mark.parametrize("backend", LIVE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_shards_with_the_whole_sigma_equal_the_whole_tensor(backend, seed, dtype):
    """FSDP2's Shard(0) split of a bucket over 2 and 3 ranks (uneven shards, a 1-row tensor
    whose second shard is empty): each shard modulated with the whole tensor's sigma at the
    stream offset of its first element writes exactly its rows of the unsharded result."""
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 3, 3), (1, 7), (3, 1025), (2,)]
    whole = [t.view(s) for t, s in zip(_tensors([int(np.prod(s)) for s in shapes], dtype, dev,
                                                gen), shapes)]
    offs = _offsets(whole, 11)
    k = torch.tensor(0.6, device=dev)
    gate = torch.tensor(1.0, device=dev)
    impl = _impl(backend)
    sigma = _own_sigma(backend, whole, k, "raw")
    want = _clone(whole)
    impl.modulate_bucket_(want, offs, k, gate, noise=True, noise_std="raw", seed=seed, step=2,
                          modality=0)
    for world in (2, 3):
        got = []
        for r in range(world):  # rank r's local shards (torch.chunk: FSDP2's uneven split)
            shards = []
            shard_offs = []
            for t, off in zip(whole, offs):
                pieces = torch.chunk(t, world, 0)
                first = sum(p.shape[0] for p in pieces[:r])
                row = t[0].numel()
                shards.append(pieces[r].clone() if r < len(pieces) else t[:0].clone())
                shard_offs.append(off + first * row)
            impl.modulate_sigma_bucket_(shards, shard_offs, k, gate, sigma, seed=seed, step=2,
                                        modality=0)
            got.append(shards)
        for i, w in enumerate(want):
            assert torch.equal(torch.cat([got[r][i] for r in range(world)]), w), (world, i)


@pytest.mark.parametrize("backend", [b for b in LIVE_BACKENDS if b != "triton"])
@pytest.mark.parametrize("noise_std", ["raw", "scaled"])
def test_functional_stds_equal_to_own_give_modulate(backend, seed, noise_std):
    """Through ``functional.modulate_``: three modalities, None entries, a non-contiguous
    gradient, two dtypes in one modality; stds equal to each tensor's own std (as this
    backend's statistics compute it) write what the call without stds writes. (Triton has no
    float64 std to give: its case is covered above through its sigma kernel.)"""
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen).mul(0.02).to(dev)

    grads = [[r(4, 6).t(), None, r(CPU_CHUNK + 9)], [r(9).half(), r(3, 3)],
             [r(2, 2), r(3).bfloat16(), r(1)]]
    stds = []
    for gs in grads:
        row = []
        for g in gs:
            row.append(None if g is None else _own_std(backend, [g.contiguous()])[0])
        stds.append(row)
    k = torch.tensor([0.4, 1.0, 1.7], device=dev)
    a = [[None if g is None else g.clone() for g in gs] for gs in grads]
    b = [[None if g is None else g.clone() for g in gs] for gs in grads]
    kw = dict(noise=True, noise_std=noise_std, seed=seed, step=4, backend=backend)
    functional.modulate_(a, k, **kw)
    functional.modulate_(b, k, stds=stds, **kw)
    for xs, ys, gs in zip(a, b, grads):
        for x, y, g in zip(xs, ys, gs):
            if g is None:
                assert x is None and y is None
                continue
            assert torch.equal(x, y) and y.stride() == g.stride()
            assert not torch.equal(y, g)


@pytest.mark.parametrize("backend", LIVE_BACKENDS)
def test_nan_coefficient_leaves_every_bit(backend, seed):
    """A NaN coefficient skips the step on the device (k 1, gate 0): every gradient, given
    stds or not, keeps its bits."""
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(seed)
    grads = [[torch.randn(33, generator=gen).to(dev), torch.randn(5, 2, generator=gen).to(dev)],
             [torch.randn(7, generator=gen).half().to(dev)]]
    stds = [[torch.tensor(0.3, dtype=torch.float64, device=dev), None],
            [torch.tensor(2.0, dtype=torch.float64, device=dev)]]
    before = [[g.clone() for g in gs] for gs in grads]
    functional.modulate_(grads, torch.tensor([float("nan"), 0.5], device=dev), noise=True,
                         backend=backend, stds=stds, seed=seed, step=1)
    for gs, bs in zip(grads, before):
        for g, b in zip(gs, bs):
            assert torch.equal(g, b)


@pytest.mark.parametrize("backend", LIVE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_zero_and_non_finite_sigma_add_no_noise(backend, seed, dtype):
    """gate 0 with k 1 leaves the bits; a NaN or infinite sigma (and a NaN std given to
    functional.modulate_) means no noise: exactly k g, while the finite tensors get noise."""
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(seed)
    ts = _tensors([40, 13, 9], dtype, dev, gen)
    offs = _offsets(ts)
    impl = _impl(backend)
    one = torch.tensor(1.0, device=dev)
    x = _clone(ts)
    impl.modulate_sigma_bucket_(x, offs, one, torch.tensor(0.0, device=dev),
                                torch.tensor([0.5, 2.0, 1.0], device=dev), seed=seed, step=3,
                                modality=0)
    assert all(torch.equal(a, b) for a, b in zip(x, ts))
    k = torch.tensor(0.5, device=dev)
    x = _clone(ts)
    impl.modulate_sigma_bucket_(x, offs, k, one,
                                torch.tensor([float("nan"), 0.3, float("inf")], device=dev),
                                seed=seed, step=3, modality=0)
    for i in (0, 2):
        assert torch.equal(x[i], (ts[i].float() * 0.5).to(dtype))
    assert not torch.equal(x[1], (ts[1].float() * 0.5).to(dtype))
    grads = [[t.clone() for t in ts], [ts[0].clone()]]
    stds = [[torch.tensor(float("nan"), dtype=torch.float64, device=dev), None, None], [None]]
    functional.modulate_(grads, torch.tensor([0.5, 1.0], device=dev), noise=True, stds=stds,
                         backend=backend, seed=seed)
    assert torch.equal(grads[0][0], (ts[0].float() * 0.5).to(dtype))


@pytest.mark.parametrize("backend", LIVE_BACKENDS)
def test_step_counter_tensor_equals_int_step(backend, seed):
    """A 0-d integer step counter (on the CPU here) draws the int step's noise."""
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(seed)
    ts = _tensors([70, 5], torch.float32, dev, gen)
    offs = _offsets(ts, 2)
    k, gate = torch.tensor(0.9, device=dev), torch.tensor(1.0, device=dev)
    sigma = torch.tensor([0.01, 0.2], device=dev)
    a, b = _clone(ts), _clone(ts)
    impl = _impl(backend)
    impl.modulate_sigma_bucket_(a, offs, k, gate, sigma, seed=seed, step=2 ** 32 + 17, modality=3)
    impl.modulate_sigma_bucket_(b, offs, k, gate, sigma, seed=seed,
                                step=torch.tensor(2 ** 32 + 17), modality=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = _clone(ts)
    impl.modulate_sigma_bucket_(c, offs, k, gate, sigma, seed=seed, step=18, modality=3)
    assert not torch.equal(c[0], a[0])


def _bad_sigmas(n, dev):
    return [
        (torch.ones(n + 1, device=dev), ValueError, "shape"),
        (torch.ones(n - 1, device=dev), ValueError, "shape"),
        (torch.ones(1, n, device=dev), ValueError, "shape"),
        (torch.ones(n, dtype=torch.float64, device=dev), TypeError, "float32"),
        (torch.ones(n, dtype=torch.float16, device=dev), TypeError, "float32"),
        (torch.ones(n, device="meta"), ValueError, "meta"),
    ]


@pytest.mark.parametrize("backend", LIVE_BACKENDS)
def test_bad_sigma_refused_before_any_write(backend):
    dev = device_for(backend)
    ts = [torch.randn(9, device=dev), torch.randn(3, device=dev)]
    before = _clone(ts)
    k, gate = torch.tensor(0.5, device=dev), torch.tensor(1.0, device=dev)
    impl = _impl(backend)
    for sigma, err, what in _bad_sigmas(2, dev):
        with pytest.raises(err, match=r"sigma.*" + what):
            impl.modulate_sigma_bucket_(ts, [0, 9], k, gate, sigma, seed=0, step=0, modality=0)
        assert all(torch.equal(a, b) for a, b in zip(ts, before)), (sigma.shape, sigma.dtype)
    with pytest.raises(ValueError, match="offsets"):
        impl.modulate_sigma_bucket_(ts, [0], k, gate, torch.ones(2, device=dev), seed=0, step=0,
                                    modality=0)
    assert all(torch.equal(a, b) for a, b in zip(ts, before))


def test_op_refuses_bad_sigma_before_any_write():
    """The op itself (the CPU kernel where the extension is loaded, else the reference)."""
    ts = [torch.randn(9), torch.randn(3)]
    before = _clone(ts)
    k, gate = torch.tensor(0.5), torch.tensor(1.0)
    for sigma, err, what in _bad_sigmas(2, "cpu"):
        with pytest.raises(err, match=r"sigma.*" + what):
            torch.ops.mmmod.modulate_sigma_(ts, [0, 9], k, gate, sigma, 0, 0, 0)
        assert all(torch.equal(a, b) for a, b in zip(ts, before))


@pytest.mark.parametrize("backend", LIVE_BACKENDS)
def test_functional_refuses_bad_stds_before_any_write(backend):
    dev = device_for(backend)
    grads = [[torch.randn(9, device=dev)], [torch.randn(4, device=dev), torch.randn(3, device=dev)]]
    before = [[g.clone() for g in gs] for gs in grads]
    ok = torch.tensor(0.1, dtype=torch.float64, device=dev)
    k = torch.tensor([0.5, 1.5], device=dev)
    for bad, err, what in [(torch.ones(2, dtype=torch.float64, device=dev), ValueError, "shape"),
                           (torch.tensor(1, device=dev), ValueError, "int64"),
                           (0.1, TypeError, "float"),
                           ([ok], ValueError, "one std")]:
        stds = [[ok], [ok, bad]] if not isinstance(bad, list) else [[ok], bad]
        with pytest.raises(err, match=what):
            functional.modulate_(grads, k, noise=True, stds=stds, backend=backend)
        for gs, bs in zip(grads, before):
            assert all(torch.equal(g, b) for g, b in zip(gs, bs))


def test_opcheck_fake_and_reference_schema():
    """opcheck (schema, fake, autograd registration, AOT dispatch) with an int step and with a
    step counter, on the kernel this process dispatches to, plus the fake on meta tensors."""
    gen = torch.Generator().manual_seed(0)
    ts = [torch.randn(5, generator=gen), torch.randn(3, 4, generator=gen), torch.randn(0)]
    k, gate = torch.tensor(0.7), torch.tensor(1.0)
    sigma = torch.tensor([0.1, 0.02, 0.3])
    opcheck(torch.ops.mmmod.modulate_sigma_.default, (_clone(ts), [0, 5, 17], k, gate, sigma,
                                                      -5, 3, 1))
    opcheck(torch.ops.mmmod.modulate_sigma_.default, (_clone(ts), [0, 5, 17], k, gate, sigma,
                                                      7, 0, 1), {"step_tensor": torch.tensor(3)})
    with torch.device("meta"):
        mt = [torch.empty(5), torch.empty(2)]
        torch.ops.mmmod.modulate_sigma_(mt, [0, 5], torch.empty(()), torch.empty(()),
                                        torch.empty(2), 0, 0, 0)
        with pytest.raises(ValueError, match="shape"):
            torch.ops.mmmod.modulate_sigma_(mt, [0, 5], torch.empty(()), torch.empty(()),
                                            torch.empty(3), 0, 0, 0)


def test_reference_default_without_the_extension():
    """MMMOD_DISABLE_EXTENSION=1: the op's default is the reference (its bits), opcheck passes."""
    code = """
import torch, mmmod
from torch.library import opcheck
from mmmod import backends, reference
assert not backends.status('cpu')[0]
g = torch.Generator().manual_seed(0)
ts = [torch.randn(5, generator=g), torch.randn(3, 4, generator=g)]
k, gate = torch.tensor(0.7), torch.tensor(1.0)
std = torch.stack([reference.tensor_std(t) for t in ts]) * 0.5
sigma = reference.noise_sigma(std, k, 'scaled')
a, b = [t.clone() for t in ts], [t.clone() for t in ts]
torch.ops.mmmod.modulate_sigma_(a, [0, 5], k, gate, sigma, -5, 3, 1)
reference.modulate_bucket_(b, [0, 5], k, gate, noise=True, noise_std='scaled', seed=-5, step=3,
                           modality=1, stds=list(std))
assert all(torch.equal(x, z) for x, z in zip(a, b))
opcheck(torch.ops.mmmod.modulate_sigma_.default, ([t.clone() for t in ts], [0, 5], k, gate, sigma, 7, 3, 1))
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "MMMOD_DISABLE_EXTENSION": "1"}, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


# ---- the CPU kernel: every table, any thread count ------------------------------------------
CPU_LIVE = backends.status("cpu")[0]
CPU_TABLES = []
if CPU_LIVE:
    import mmmod._C
    _info = mmmod._C.cpu_kernels()
    CPU_TABLES = ((["avx512"] if _info.get("avx512_supported") else [])
                  + (["avx2"] if _info["avx2_supported"] else []) + ["scalar"])


@pytest.mark.skipif(not CPU_LIVE, reason="C++ extension (backend 'cpu') not available")
@pytest.mark.parametrize("table", CPU_TABLES)
def test_cpu_every_table_and_thread_count(seed, table, monkeypatch):
    """Each kernel table: modulate_sigma_ == modulate_ bit for bit (the same noise blocks), and
    1 or 2 threads give the same bits (chunks are claimed dynamically)."""
    monkeypatch.delenv("MMMOD_CPU_SCALAR", raising=False)
    monkeypatch.setenv("MMMOD_CPU_KERNELS", table)
    gen = torch.Generator().manual_seed(seed)
    ts = _tensors([3 * CPU_CHUNK + 7, 1, CPU_CHUNK, 517], torch.float32, "cpu", gen)
    offs = _offsets(ts, 1)
    k, gate = torch.tensor(0.45), torch.tensor(1.0)
    ops = torch.ops.mmmod
    want = _clone(ts)
    ops.modulate_(want, offs, k, gate, True, False, seed, 5, 2)
    sigma = reference.noise_sigma(ops._bucket_std(ts), k, "raw")
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            got = _clone(ts)
            ops.modulate_sigma_(got, offs, k, gate, sigma, seed, 5, 2)
            assert all(torch.equal(x, y) for x, y in zip(got, want)), nt
    finally:
        torch.set_num_threads(threads)
