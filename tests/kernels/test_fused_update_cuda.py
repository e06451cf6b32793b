"""The CUDA kernels of the fused modulated update (csrc/cuda/fused_update.cu, ops
``torch.ops.mmmod.fused_sgd_`` / ``fused_adam_`` on CUDA tensors; docs/fused.md).

On a GPU (marker ``gpu``; run by scripts/gpu_check.sh's ``pytest -m gpu``, collected and skipped
elsewhere), three sides agree over several steps: the CUDA ops, the plain-torch reference
(``mmmod.optim.fused.reference_sgd_`` / ``reference_adam_`` run on the same CUDA tensors, drawing
the CUDA kernels' Philox normals, whose float32 roundings docs/semantics.md section 5 leaves to
each backend), and "modulate on CUDA, then torch's own step" (``ModulatedOptimizer(...,
backend="cuda")`` unfused: torch's foreach SGD / Adam on CUDA). The kernel reproduces torch's
foreach arithmetic op for op (FMA where torch's CUDA kernels contract ``a + s * b``), so every
comparison is expected to be bitwise; the bounds below are stated in normwise ulps of the dtype
(max |a - b| / (eps * max |a|)) and leave room for what cannot be checked without a GPU: whether
torch's build contracts exactly those operations. One known difference: torch's single-tensor
``t / python_float`` on CUDA multiplies by the reciprocal, its foreach division (which the kernel
follows) divides, so Adam's reference side may differ in the last bit of
``sqrt(v) / bias_correction2_sqrt``. Also on the GPU: the 16-byte vector path equals the scalar
path bit for bit, results repeat run to run, no host sync, bad input is refused by name before
anything is written.

Without a GPU (needs nvcc only): the kernels' chunk code is ``__host__ __device__``, so it is
compiled for the host into a small library (``_HARNESS`` below, loaded with ctypes) and run on
CPU tensors, thread after thread, against the reference on the CPU drawing the same normals:
the table walk, chunking, Philox stream positions (every offset mod 4, offsets beyond 2^32),
empty tensors, the vector / scalar split, flags and hyperparameters are checked there; only the
arithmetic's rounding forms differ from torch's CPU step (bounds below).
"""
import ctypes
import struct
import subprocess
from pathlib import Path

import pytest
import torch

import mmmod
import mmmod._ops
from mmmod import backends
from mmmod.optim import fused as FU
from mmmod.reference import fused as RF
from mmmod.reference.philox import seed_int64 as _seed_int64
from mmmod.reference import philox

import _toolchain

LIVE, WHY = backends.status("cuda")
KERNELS = LIVE and mmmod._ops.has_kernel("fused_sgd_", "CUDA") and \
    mmmod._ops.has_kernel("fused_adam_", "CUDA")
_NO_GPU = (f"needs a GPU and the CUDA extension with the fused kernels "
           f"(backend 'cuda': {WHY or 'binary without fused_sgd_/fused_adam_'})")


def on_gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not KERNELS, reason=_NO_GPU)(test))


ROOT = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
CHUNK = 16384  # MMMOD_FUSED_CHUNK (csrc/cuda/fused_update_api.h)
# normwise ulps of the dtype (module docstring): expected 0 everywhere
OP_ULPS = {torch.float32: 2, torch.float64: 2, torch.float16: 2, torch.bfloat16: 2}  # 3 steps
STEP_ULPS = {torch.float32: 4, torch.float64: 4, torch.float16: 4, torch.bfloat16: 4}  # 20 steps


def _ulps(x, y, dtype):
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    if x.numel() == 0:
        return 0.0
    return float((x - y).abs().max() / (torch.finfo(dtype).eps * x.abs().max().clamp_min(1e-30)))


def _close(x, y, dtype, bound):
    assert x.dtype == y.dtype == dtype and x.shape == y.shape
    assert torch.isfinite(x).all() and torch.isfinite(y).all()
    u = _ulps(x, y, dtype)
    assert u <= bound, f"{u:.3f} normwise ulps of {dtype} (bound {bound})"


def _cuda_noise(seed, step, modality, offset, n, device):
    """The CUDA kernels' Philox normals (the same philox_normal4 as noise_kernel)."""
    out = torch.empty(n, dtype=torch.float32, device="cuda")
    torch.ops.mmmod._philox_normal_(out, _seed_int64(seed), step, modality, offset)
    return out.to(device)


@pytest.fixture
def cuda_normals(monkeypatch):
    monkeypatch.setattr(RF, "philox_normal", _cuda_noise)


def _bucket(sizes, dtype, seed=0, device="cuda"):
    """Parameters and gradients of the given sizes (random, reproducible)."""
    g = torch.Generator().manual_seed(seed)
    p = [torch.randn(n, generator=g).to(dtype).to(device) for n in sizes]
    gr = [torch.randn(n, generator=g).to(dtype).to(device) for n in sizes]
    return p, gr


# odd sizes, an empty tensor, a tensor over two chunks; stream offsets not multiples of 4, and one
# bucket at offsets beyond 2^32 (the 64-bit Philox counter)
SIZES = [13, 0, 1, CHUNK + 7, 4099]
OFFSET_BASES = [3, (1 << 34) + 1]


def _offsets(sizes, base):
    out, run = [], base
    for n in sizes:
        out.append(run)
        run += n
    return out


SGD_CASES = [dict(momentum=0.9, dampening=0.0, nesterov=False, maximize=False, weight_decay=1e-2),
             dict(momentum=0.9, dampening=0.0, nesterov=True, maximize=True, weight_decay=1e-2),
             dict(momentum=0.8, dampening=0.3, nesterov=False, maximize=False, weight_decay=0.0),
             dict(momentum=0.0, dampening=0.0, nesterov=False, maximize=True, weight_decay=1e-3)]
ADAM_CASES = [dict(decoupled=True, maximize=False, weight_decay=1e-2, beta1=0.9),
              dict(decoupled=False, maximize=True, weight_decay=1e-2, beta1=0.9),
              dict(decoupled=True, maximize=False, weight_decay=0.0, beta1=0.3)]  # lerp's 2nd formula


def _run_sgd(impl, p0, grads, offsets, k, sigma, u, case, steps=3):
    p = [x.clone() for x in p0]
    buf = [torch.empty_like(x) for x in p0]
    for t in range(steps):
        args = (p, [g * (t + 1) for g in grads], buf if case["momentum"] else [], [t > 0] * len(p),
                offsets, k, sigma, u)
        hyper = dict(lr=0.1, weight_decay=case["weight_decay"], momentum=case["momentum"],
                     dampening=case["dampening"], nesterov=case["nesterov"],
                     maximize=case["maximize"])
        if impl == "ref":
            FU.reference_sgd_(*args, **hyper, seed=5, step=t, modality=1)
        else:
            torch.ops.mmmod.fused_sgd_(*args, *hyper.values(), 5, t, 1)
    return p + (buf if case["momentum"] else [])


def _run_adam(impl, p0, grads, offsets, k, sigma, u, case, dtype, steps=3):
    p = [x.clone() for x in p0]
    a, v = [torch.zeros_like(x) for x in p0], [torch.zeros_like(x) for x in p0]
    for t in range(1, steps + 1):
        args = (p, [g * t for g in grads], a, v, [float(t)] * len(p), offsets, k, sigma, u)
        hyper = dict(lr=1e-2, beta1=case["beta1"], beta2=0.999,
                     eps=1e-4 if dtype == torch.float16 else 1e-8,  # 1e-8 is 0 in fp16
                     weight_decay=case["weight_decay"], decoupled=case["decoupled"],
                     maximize=case["maximize"])
        if impl == "ref":
            FU.reference_adam_(*args, **hyper, seed=5, step=t, modality=1)
        else:
            torch.ops.mmmod.fused_adam_(*args, *hyper.values(), 5, t, 1)
    return p + a + v


def _scalars(noise, update, n):
    k = torch.tensor(0.6, device="cuda")
    sigma = torch.linspace(0.01, 0.05, n, device="cuda") if noise else None
    u = torch.tensor(0.7, device="cuda") if update else None
    return k, sigma, u


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise", [True, False])
@pytest.mark.parametrize("base", OFFSET_BASES)
def test_sgd_op_equals_reference(cuda_normals, dtype, noise, base):
    p0, grads = _bucket(SIZES, dtype)
    offs = _offsets(SIZES, base)
    for update in (False, True):
        k, sigma, u = _scalars(noise, update, len(SIZES))
        for case in SGD_CASES:
            want = _run_sgd("ref", p0, grads, offs, k, sigma, u, case)
            got = _run_sgd("op", p0, grads, offs, k, sigma, u, case)
            for x, y in zip(want, got):
                _close(x, y, dtype, OP_ULPS[dtype])
    for x, g0 in zip(grads, _bucket(SIZES, dtype)[1]):
        assert torch.equal(x, g0)  # the gradient is only read


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise", [True, False])
@pytest.mark.parametrize("base", OFFSET_BASES)
def test_adam_op_equals_reference(cuda_normals, dtype, noise, base):
    p0, grads = _bucket(SIZES, dtype, seed=1)
    offs = _offsets(SIZES, base)
    for update in (False, True):
        k, sigma, u = _scalars(noise, update, len(SIZES))
        for case in ADAM_CASES:
            want = _run_adam("ref", p0, grads, offs, k, sigma, u, case, dtype)
            got = _run_adam("op", p0, grads, offs, k, sigma, u, case, dtype)
            for x, y in zip(want, got):
                _close(x, y, dtype, OP_ULPS[dtype])


def _misaligned_like(xs):
    """Copies of xs whose storage starts one element past a 16-byte boundary (the kernels' scalar
    path), beside 16-byte aligned copies (the vector path)."""
    out = []
    for x in xs:
        store = torch.empty(x.numel() + 16, dtype=x.dtype, device=x.device)
        y = store[1:1 + x.numel()]
        y.copy_(x)
        assert y.data_ptr() % 16 != 0
        out.append(y)
    return out


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_vector_path_equals_scalar_path(dtype):
    """The same data through 16-byte vector accesses (aligned storage, stream offsets on Philox
    groups) and through scalar accesses (storage one element off): the same bits."""
    sizes = [CHUNK + 8, 4100, 12]
    offs = _offsets(sizes, 8)
    p0, grads = _bucket(sizes, dtype, seed=2)
    assert all(x.data_ptr() % 16 == 0 for x in p0 + grads)
    k, sigma, u = _scalars(True, True, len(sizes))
    for case in SGD_CASES[:2]:
        a = _run_sgd("op", p0, grads, offs, k, sigma, u, case)
        b = _run_sgd("op", _misaligned_like(p0), _misaligned_like(grads), offs, k, sigma, u, case)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    for case in ADAM_CASES[:2]:
        a = _run_adam("op", p0, grads, offs, k, sigma, u, case, dtype)
        b = _run_adam("op", _misaligned_like(p0), _misaligned_like(grads), offs, k, sigma, u, case,
                      dtype)
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@on_gpu
def test_run_to_run_identical_and_empty_buckets():
    p0, grads = _bucket(SIZES, torch.float32, seed=3)
    offs = _offsets(SIZES, 3)
    k, sigma, u = _scalars(True, False, len(SIZES))
    a = _run_adam("op", p0, grads, offs, k, sigma, u, ADAM_CASES[0], torch.float32)
    b = _run_adam("op", p0, grads, offs, k, sigma, u, ADAM_CASES[0], torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # an empty bucket and a bucket of empty tensors: nothing to launch, nothing written
    torch.ops.mmmod.fused_sgd_([], [], [], [], [], k, None, None, 0.1, 0.0, 0.9, 0.0, False,
                               False, 0, 0, 0)
    e = [torch.empty(0, 3, device="cuda")]
    torch.ops.mmmod.fused_adam_(e, e, e, e, [1.0], [0], k, sigma[:1], None, 0.1, 0.9, 0.999,
                                1e-8, 0.0, True, False, 0, 0, 0)


@on_gpu
def test_no_host_sync():
    p0, grads = _bucket([CHUNK + 3, 7], torch.float32, seed=4)
    k, sigma, u = _scalars(True, True, 2)
    bufs = [torch.empty_like(x) for x in p0]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.ops.mmmod.fused_sgd_(p0, grads, bufs, [False, False], [0, CHUNK + 3], k, sigma, u,
                                   0.1, 1e-4, 0.9, 0.0, False, False, 1, 2, 0)
        torch.ops.mmmod.fused_adam_(p0, grads, bufs, [torch.zeros_like(x) for x in p0],
                                    [1.0, 1.0], [0, CHUNK + 3], k, sigma, u, 0.1, 0.9, 0.999, 1e-8,
                                    1e-2, True, False, 1, 2, 0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@on_gpu
def test_bad_input_refused_by_name_before_any_write():
    p = [torch.ones(5, device="cuda"), torch.ones(3, device="cuda")]
    before = [x.clone() for x in p]
    g = [torch.ones(5, device="cuda"), torch.ones(3, device="cuda")]
    bufs = [torch.zeros(5, device="cuda"), torch.zeros(3, device="cuda")]
    k = torch.tensor(1.0, device="cuda")

    def sgd(params=p, grads=g, buffers=bufs, ready=(True, True), offsets=(0, 5), kk=k,
            sigma=None, u=None):
        torch.ops.mmmod.fused_sgd_(params, grads, buffers, list(ready), list(offsets), kk, sigma,
                                   u, 0.1, 0.0, 0.9, 0.0, False, False, 0, 0, 0)

    cases = [
        (dict(grads=[g[0], torch.ones(4, device="cuda")]), "grads 1 must be a contiguous"),
        (dict(grads=[g[0], torch.ones(3)]), "grads 1 must be a contiguous"),
        (dict(grads=[g[0], torch.ones(3, device="cuda", dtype=torch.float64)]), "grads 1"),
        (dict(buffers=[bufs[0], torch.zeros(6, device="cuda")[::2]]),
         "momentum_buffers 1 must be a contiguous"),
        (dict(params=[p[0], torch.ones(3, 2, device="cuda").t()]), "param 1 must be a contiguous"),
        (dict(ready=(True,)), "buffer_ready"),
        (dict(offsets=(0,)), "offsets"),
        (dict(offsets=(0, -1)), "offset 1"),
        (dict(kk=torch.tensor(1.0)), "k must be a one-element float32 tensor on cuda"),
        (dict(kk=torch.tensor([1.0, 2.0], device="cuda")), "k must be"),
        (dict(sigma=torch.ones(3, device="cuda")), "sigma must be"),
        (dict(sigma=torch.ones(2, device="cuda", dtype=torch.float64)), "sigma must be"),
        (dict(u=torch.tensor(1.0)), "update_scale must be"),
    ]
    for kw, msg in cases:
        with pytest.raises((ValueError, TypeError), match=msg):
            sgd(**kw)
    with pytest.raises(TypeError, match="param 0 has dtype"):
        torch.ops.mmmod.fused_sgd_([torch.ones(2, device="cuda", dtype=torch.int32)],
                                   [torch.ones(2, device="cuda", dtype=torch.int32)], [], [], [0],
                                   k, None, None, 0.1, 0.0, 0.0, 0.0, False, False, 0, 0, 0)
    with pytest.raises(ValueError, match="step 1 is 0"):
        torch.ops.mmmod.fused_adam_(p, g, bufs, [torch.zeros_like(x) for x in p], [1.0, 0.0],
                                    [0, 5], k, None, None, 0.1, 0.9, 0.999, 1e-8, 0.0, True,
                                    False, 0, 0, 0)
    with pytest.raises(ValueError, match="exp_avg_sqs 0 must be a contiguous"):
        torch.ops.mmmod.fused_adam_(p, g, bufs, [torch.zeros(4, device="cuda"), bufs[1]],
                                    [1.0, 1.0], [0, 5], k, None, None, 0.1, 0.9, 0.999, 1e-8, 0.0,
                                    True, False, 0, 0, 0)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(before, p))
    assert all(torch.equal(b, torch.zeros_like(b)) for b in bufs)


# ---- the optimizer: ModulatedOptimizer(backend="cuda", fused=True) ------------------------------
class _Net(torch.nn.Module):
    """Modality a: a conv weight, a 131 x 130 matrix (two chunks, not a multiple of 4), an empty
    parameter and a bias; modality v: a conv weight and a bias; the head is outside both."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        P = torch.nn.Parameter
        self.a = torch.nn.ParameterList([P(torch.randn(4, 3, 3, 3)), P(torch.randn(131, 130) * 0.1),
                                         P(torch.empty(0, 5)), P(torch.randn(7))])
        self.v = torch.nn.ParameterList([P(torch.randn(5, 3, 3, 3)), P(torch.randn(5))])
        self.h = torch.nn.Linear(4, 3)
        self.to(device="cuda", dtype=dtype)


def _inner(kind, params, dtype, **kw):
    if kind == "sgd":
        kw = {**dict(lr=0.1, momentum=0.9, weight_decay=1e-2), **kw}
        return torch.optim.SGD(params, **kw)
    eps = 1e-4 if dtype == torch.float16 else 1e-8
    cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    return cls(params, lr=0.05, weight_decay=1e-2, eps=eps, **kw)


def _train(kind, mode, dtype, *, method="ogm_ge", apply_to="grad", inner_kw=None, steps=20,
           monkeypatch=None):
    """mode: "unfused" (modulate on CUDA, then torch's own step), "fused" (the CUDA kernels),
    "reference" (the fused path with the plain-torch reference as the kernel)."""
    if mode == "reference":
        with monkeypatch.context() as m:
            m.setattr(type(backends.get("cuda", "cuda")), "fused_update",
                      lambda self, kind_, device: (
                          FU.reference_sgd_ if kind_ == "sgd" else FU.reference_adam_))
            return _train(kind, "fused", dtype, method=method, apply_to=apply_to,
                          inner_kw=inner_kw, steps=steps)
    net = _Net(dtype)
    inner = _inner(kind, net.parameters(), dtype, **(inner_kw or {}))
    opt = mmmod.ModulatedOptimizer(inner, {"a": net.a, "v": net.v}, method=method, alpha=0.8,
                                   backend="cuda", fused=mode != "unfused", apply_to=apply_to,
                                   param_filter=lambda n, p: True)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in net.parameters():
            p.grad = torch.randn(p.shape, generator=g).to(dtype).cuda()
        opt.observe([torch.randn(8, 3, generator=g).cuda(), torch.randn(8, 3, generator=g).cuda()],
                    torch.randint(0, 3, (8,), generator=g).cuda())
        opt.step()
    params = list(net.parameters())
    state = [{key: v for key, v in inner.state.get(p, {}).items() if isinstance(v, torch.Tensor)}
             for p in params]
    return params, state


def _assert_runs_close(a, b, dtype, bound):
    (pa, sa), (pb, sb) = a, b
    for x, y in zip(pa, pb):
        _close(x.detach(), y.detach(), dtype, bound)
    for x, y in zip(sa, sb):
        assert sorted(x) == sorted(y)  # torch's own state keys, parameter by parameter
        for key in x:
            if key == "step":
                assert torch.equal(x[key], y[key])
            else:
                _close(x[key], y[key], dtype, bound)


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_fused_equals_unfused_and_reference_20_steps(cuda_normals, monkeypatch, dtype, kind):
    fused = _train(kind, "fused", dtype)
    unfused = _train(kind, "unfused", dtype)
    _assert_runs_close(unfused, fused, dtype, STEP_ULPS[dtype])
    ref = _train(kind, "reference", dtype, monkeypatch=monkeypatch)
    _assert_runs_close(ref, fused, dtype, STEP_ULPS[dtype])


@pytest.mark.parametrize("opts", [dict(nesterov=True), dict(dampening=0.3), dict(maximize=True),
                                  dict(momentum=0.0), dict(momentum=0.0, weight_decay=0.0)])
@on_gpu
def test_fused_sgd_options(opts):
    for dtype in (torch.float32, torch.bfloat16):
        _assert_runs_close(_train("sgd", "unfused", dtype, inner_kw=opts),
                           _train("sgd", "fused", dtype, inner_kw=opts), dtype, STEP_ULPS[dtype])


@on_gpu
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("method", ["ogm", "mlb"])
def test_fused_noise_free_methods(kind, method):
    _assert_runs_close(_train(kind, "unfused", torch.float32, method=method),
                       _train(kind, "fused", torch.float32, method=method), torch.float32,
                       STEP_ULPS[torch.float32])


@on_gpu
@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("method", ["ogm_ge", "ogm"])
def test_fused_apply_to_update(kind, method):
    for dtype in (torch.float32, torch.float16):
        _assert_runs_close(_train(kind, "unfused", dtype, method=method, apply_to="update"),
                           _train(kind, "fused", dtype, method=method, apply_to="update"), dtype,
                           STEP_ULPS[dtype])


# ---- without a GPU: the kernels' chunk code compiled for the host ---------------------------------
_HARNESS = r'''
// The fused-update kernels' chunk code (csrc/cuda/fused_update.cu, __host__ __device__) run on the host.
#include "cuda/fused_update.cu"

template <typename T, bool NOISE, bool ADAM, typename S>
static void run(const int64_t* table, const float* k, const float* sigma, const float* u,
                const S& s, uint64_t seed, uint32_t step, uint32_t modality, int nthreads) {
  const FusedTable tb = FusedTable::view(table, table[0], table[1]);
  for (int64_t ci = 0; ci < table[1]; ++ci) {      // block after block ...
    for (int tid = 0; tid < nthreads; ++tid) {     // ... thread after thread
      if constexpr (ADAM) {
        adam_chunk<T, NOISE>(tb, ci, tid, nthreads, adam_consts<T>(s, k, u), sigma, seed, step,
                             modality);
      } else {
        sgd_chunk<T, NOISE>(tb, ci, tid, nthreads, sgd_consts<T>(s, k, u), sigma, seed, step,
                            modality);
      }
    }
  }
}

template <bool ADAM, typename S>
static int dispatch(const int64_t* table, int dtype, const float* k, const float* sigma,
                    const float* u, const S& s, uint64_t seed, uint32_t step, uint32_t modality,
                    int nthreads) {
#define FU_CASE(CODE, T)                                                                  \
  case CODE:                                                                              \
    if (sigma) run<T, true, ADAM>(table, k, sigma, u, s, seed, step, modality, nthreads); \
    else run<T, false, ADAM>(table, k, sigma, u, s, seed, step, modality, nthreads);      \
    return 0;
  switch (dtype) {
    FU_CASE(MMMOD_F32, float)
    FU_CASE(MMMOD_F16, __half)
    FU_CASE(MMMOD_BF16, __nv_bfloat16)
    FU_CASE(MMMOD_F64, double)
    default: return 1;
  }
#undef FU_CASE
}

extern "C" int host_fused_sgd(const int64_t* table, int dtype, const float* k, const float* sigma,
                              const float* u, MmmodSgdScalars s, uint64_t seed, uint32_t step,
                              uint32_t modality, int nthreads) {
  return dispatch<false>(table, dtype, k, sigma, u, s, seed, step, modality, nthreads);
}

extern "C" int host_fused_adam(const int64_t* table, int dtype, const float* k, const float* sigma,
                               const float* u, MmmodAdamScalars s, uint64_t seed, uint32_t step,
                               uint32_t modality, int nthreads) {
  return dispatch<true>(table, dtype, k, sigma, u, s, seed, step, modality, nthreads);
}

// out[i] = the normal of stream element offset + i, as the chunk code draws it
extern "C" void host_normals(float* out, int64_t n, uint64_t seed, uint32_t step,
                             uint32_t modality, uint64_t offset) {
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t e = offset + static_cast<uint64_t>(i);
    out[i] = mmmod::f32x4_get(mmmod::philox_normal4(seed, step, modality, e >> 2),
                              static_cast<int>(e & 3));
  }
}

extern "C" int64_t host_sizes(int which) {
  return which == 0 ? sizeof(MmmodSgdScalars) : which == 1 ? sizeof(MmmodAdamScalars)
                                                           : sizeof(FusedEntry);
}
'''


class _SgdScalars(ctypes.Structure):  # MmmodSgdScalars
    _fields_ = [(n, ctypes.c_double) for n in ("neg_lr", "weight_decay", "momentum",
                                               "one_minus_dampening")] + \
               [(n, ctypes.c_int32) for n in ("maximize", "decay", "use_momentum", "nesterov")]


class _AdamScalars(ctypes.Structure):  # MmmodAdamScalars
    _fields_ = [(n, ctypes.c_double) for n in ("weight_decay", "one_minus_beta1", "beta2",
                                               "one_minus_beta2", "eps", "decay_mul")] + \
               [(n, ctypes.c_int32) for n in ("maximize", "decay", "decoupled", "pad")]


_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}  # cuda_api.h


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    nvcc = _toolchain.nvcc()
    if nvcc is None:
        pytest.skip("needs nvcc to compile the fused kernels' chunk code for the host")
    d = tmp_path_factory.mktemp("fused_host")
    (d / "harness.cu").write_text(_HARNESS)
    lib = d / "libfused_host.so"
    # -ffp-contract=off: the host compiler must not fuse the chunk code's products and sums
    out = subprocess.run([nvcc, "-shared", "-std=c++17", "-O2", "-arch=sm_80", "-Xcompiler", "-fPIC",
                          "-Xcompiler", "-ffp-contract=off", "-I" + str(ROOT / "csrc"),
                          str(d / "harness.cu"), "-o", str(lib)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    h = ctypes.CDLL(str(lib))
    h.host_sizes.restype = ctypes.c_int64
    h.mmmod_fused_table_words.restype = ctypes.c_int64
    assert h.host_sizes(0) == ctypes.sizeof(_SgdScalars)
    assert h.host_sizes(1) == ctypes.sizeof(_AdamScalars)
    assert h.host_sizes(2) == 88  # benchmarks/byte_model.py FUSED_CUDA_TENSOR_ENTRY
    return h


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _u64(x):
    return ctypes.c_uint64(int(x) & 0xFFFFFFFFFFFFFFFF)


def _host_table(h, params, grads, s1, s2, offsets, flags, neg_steps, bc2s):
    """The table fused_update_cuda.cpp uploads (multi_tensor.h's layout with fused_update_api.h's
    pointers and extra words), on the CPU."""
    def bits(x):
        return struct.unpack("<q", struct.pack("<d", float(x)))[0]
    rows, chunks = [], []
    for t, (p, g) in enumerate(zip(params, grads)):
        first, count = len(chunks) // 2, -(-p.numel() // CHUNK)
        rows += [p.data_ptr(), g.data_ptr(), 0 if s1 is None else s1[t].data_ptr(),
                 0 if s2 is None else s2[t].data_ptr(), p.numel(), int(offsets[t]), int(flags[t]),
                 bits(neg_steps[t]), bits(bc2s[t]), first, count]
        chunks += [w for c in range(0, p.numel(), CHUNK) for w in (t, c)]
    words = [len(params), len(chunks) // 2] + rows + chunks
    assert len(words) == h.mmmod_fused_table_words(ctypes.c_int64(len(params)),
                                                   ctypes.c_int64(len(chunks) // 2))
    return torch.tensor(words, dtype=torch.int64)


def _host_sgd(h, nthreads=256):
    """reference_sgd_'s signature, run by the host-compiled chunk code."""
    def run(params, grads, bufs, ready, offsets, k, sigma, u, *, lr, weight_decay, momentum,
            dampening, nesterov, maximize, seed, step, modality):
        n = len(params)
        mom = momentum != 0
        table = _host_table(h, params, grads, bufs if mom else None, None, offsets,
                            [bool(r) and mom for r in ready] if mom else [0] * n, [0.0] * n,
                            [0.0] * n)
        s = _SgdScalars(-lr, weight_decay, momentum, 1 - dampening, int(maximize),
                        int(weight_decay != 0), int(mom), int(nesterov))
        kk = k.float().reshape(1).contiguous()
        uu = None if u is None else u.float().reshape(1).contiguous()
        assert h.host_fused_sgd(_ptr(table), _CODES[params[0].dtype], _ptr(kk), _ptr(sigma),
                                _ptr(uu), s, _u64(_seed_int64(seed)),
                                ctypes.c_uint32(step & 0xFFFFFFFF), ctypes.c_uint32(modality),
                                nthreads) == 0
    return run


def _host_adam(h, nthreads=256):
    def run(params, grads, exp_avgs, exp_avg_sqs, steps, offsets, k, sigma, u, *, lr, beta1,
            beta2, eps, weight_decay, decoupled, maximize, seed, step, modality):
        n = len(params)
        # _multi_tensor_adam's Python float arithmetic, as fused_update_cuda.cpp computes it
        negs = [(lr / (1 - beta1 ** float(t))) * -1 for t in steps]
        bc2s = [(1 - beta2 ** float(t)) ** 0.5 for t in steps]
        table = _host_table(h, params, grads, exp_avgs, exp_avg_sqs, offsets, [0] * n, negs, bc2s)
        s = _AdamScalars(weight_decay, 1 - beta1, beta2, 1 - beta2, eps, 1 - lr * weight_decay,
                         int(maximize), int(weight_decay != 0), int(decoupled), 0)
        kk = k.float().reshape(1).contiguous()
        uu = None if u is None else u.float().reshape(1).contiguous()
        assert h.host_fused_adam(_ptr(table), _CODES[params[0].dtype], _ptr(kk), _ptr(sigma),
                                 _ptr(uu), s, _u64(_seed_int64(seed)),
                                 ctypes.c_uint32(step & 0xFFFFFFFF), ctypes.c_uint32(modality),
                                 nthreads) == 0
    return run


@pytest.fixture
def host_normals(host, monkeypatch):
    """The reference draws the host chunk code's normals (philox.h on the host)."""
    def normals(seed, step, modality, offset, n, device):
        out = torch.empty(n, dtype=torch.float32)
        host.host_normals(_ptr(out), ctypes.c_int64(n), _u64(_seed_int64(seed)),
                          ctypes.c_uint32(int(step) & 0xFFFFFFFF), ctypes.c_uint32(modality),
                          ctypes.c_uint64(offset))
        return out.to(device)
    monkeypatch.setattr(RF, "philox_normal", normals)
    return normals


@pytest.mark.parametrize("base", [0, 1, 2, 3, (1 << 34) + 1])
def test_host_chunk_code_draws_each_elements_stream_position(host, base):
    """k = 0, sigma = 1, p = 0, lr = -1: the update writes the normal of each element's stream
    position into p (x = n exactly, p = fma(1, x, 0)): the chunk code's Philox groups, chunk
    leads and tensor offsets are the reference's stream (docs/semantics.md section 5)."""
    sizes = [13, 0, 1, CHUNK + 7, 4099, 2 * CHUNK]
    offs = _offsets(sizes, base)
    p = [torch.zeros(n) for n in sizes]
    g = [torch.zeros(n) for n in sizes]
    _host_sgd(host)(p, g, [], [False] * len(p), offs, torch.tensor(0.0), torch.ones(len(p)), None,
                    lr=-1.0, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False,
                    maximize=False, seed=7, step=3, modality=1)
    for x, off in zip(p, offs):
        z = philox.philox_normal(7, 3, 1, off, x.numel())
        assert ((x - z).abs() <= 1e-6 * z.abs() + 1e-7).all()  # test_ext_cuda's Philox bound
        mine = torch.empty(x.numel())
        host.host_normals(_ptr(mine), ctypes.c_int64(x.numel()), _u64(7), ctypes.c_uint32(3),
                          ctypes.c_uint32(1), ctypes.c_uint64(off))
        assert torch.equal(x, mine)


def _torch_cpu_rounds_madd_once():
    """torch's AVX2 / AVX-512 CPU kernels round a * b + c once, as its CUDA kernels do."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX")


# the host-run kernel against the CPU reference (same normals), 3 steps, normwise ulps of the
# dtype: SGD in float32 / float64 bitwise (torch's vectorised CPU add-with-alpha is an FMA, as on
# CUDA); Adam differs in addcmul's and addcdiv's rounding forms (CPU: fma(c x, x, v) and
# s m / d + p; CUDA: fma(c, x x, v) and fma(s, m / d, p)) and torch's CPU sqrt (not correctly
# rounded); fp16 / bf16 in torch's CPU reduced-precision add-with-alpha (docs/fused.md); observed
# at most 0.93 (Adam), 1.42 (fp16 SGD)
HOST_ULPS = 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise", [True, False])
def test_host_chunk_code_equals_reference(host, host_normals, dtype, noise):
    p0, grads = _bucket(SIZES, dtype, device="cpu")
    g_before = [x.clone() for x in grads]
    offs = _offsets(SIZES, 3)
    k = torch.tensor(0.6)
    sigma = torch.linspace(0.01, 0.05, len(SIZES)) if noise else None
    sgd_exact = dtype in (torch.float32, torch.float64) and _torch_cpu_rounds_madd_once()
    for u in (None, torch.tensor(0.7)):
        for case in SGD_CASES:
            outs = []
            for impl in (FU.reference_sgd_, _host_sgd(host)):
                p = [x.clone() for x in p0]
                # NaN buffers: a buffer's first step must not read it (torch: clone(grad))
                buf = [torch.full_like(x, float("nan")) for x in p0]
                for t in range(3):
                    impl(p, [x * (t + 1) for x in grads], buf if case["momentum"] else [],
                         [t > 0] * len(p), offs, k, sigma, u, lr=0.1, **case, seed=5, step=t,
                         modality=1)
                outs.append(p + (buf if case["momentum"] else []))
            for x, y in zip(*outs):
                if sgd_exact:
                    assert torch.equal(x, y), (case, u)
                else:
                    _close(x, y, dtype, HOST_ULPS)
        for case in ADAM_CASES:
            outs = []
            for impl in (FU.reference_adam_, _host_adam(host)):
                p = [x.clone() for x in p0]
                a, v = [torch.zeros_like(x) for x in p0], [torch.zeros_like(x) for x in p0]
                for t in range(1, 4):
                    impl(p, [x * t for x in grads], a, v, [float(t)] * len(p), offs, k, sigma, u,
                         lr=1e-2, beta1=case["beta1"], beta2=0.999,
                         eps=1e-4 if dtype == torch.float16 else 1e-8,
                         weight_decay=case["weight_decay"], decoupled=case["decoupled"],
                         maximize=case["maximize"], seed=5, step=t, modality=1)
                outs.append(p + a + v)
            for x, y in zip(*outs):
                _close(x, y, dtype, HOST_ULPS)
    assert all(torch.equal(a, b) for a, b in zip(grads, g_before))  # the gradient is only read


@pytest.mark.parametrize("dtype", DTYPES)
def test_host_vector_path_equals_scalar_path_and_any_thread_count(host, dtype):
    """Aligned storage (vector groups) vs storage one element off (scalar path), and 256 vs 7
    "threads" per block: the same bits."""
    sizes = [CHUNK + 8, 4100, 12, 0, 5]
    offs = _offsets(sizes, 8)
    p0, grads = _bucket(sizes, dtype, seed=2, device="cpu")
    k, u = torch.tensor(0.6), torch.tensor(0.7)
    sigma = torch.linspace(0.01, 0.05, len(sizes))

    def misaligned(xs):
        out = []
        for x in xs:
            y = torch.empty(x.numel() + 16, dtype=x.dtype)[1:1 + x.numel()]
            y.copy_(x)
            out.append(y)
        return out

    for kind, case in (("sgd", SGD_CASES[1]), ("adam", ADAM_CASES[1])):
        results = []
        for layout, nthreads in (("aligned", 256), ("misaligned", 256), ("aligned", 7)):
            p = [x.clone() for x in p0] if layout == "aligned" else misaligned(p0)
            g = grads if layout == "aligned" else misaligned(grads)
            if layout == "aligned":
                assert all(x.data_ptr() % 16 == 0 for x in p + g if x.numel())
            s1 = [torch.zeros_like(x) for x in p]
            s2 = [torch.zeros_like(x) for x in p]
            for t in range(1, 3):
                if kind == "sgd":
                    _host_sgd(host, nthreads)(p, g, s1, [t > 1] * len(p), offs, k, sigma, u,
                                              lr=0.1, **case, seed=1, step=t, modality=0)
                else:
                    _host_adam(host, nthreads)(p, g, s1, s2, [float(t)] * len(p), offs, k, sigma,
                                               u, lr=1e-2, beta1=case["beta1"], beta2=0.999,
                                               eps=1e-3, weight_decay=case["weight_decay"],
                                               decoupled=case["decoupled"],
                                               maximize=case["maximize"], seed=1, step=t,
                                               modality=0)
            results.append(p + s1 + s2)
        for other in results[1:]:
            assert all(torch.equal(x, y) for x, y in zip(results[0], other)), kind
