"""InfoReg's fused proximal op (``torch.ops.mmmod.proximal_``, docs/semantics.md section 10)
against the plain-torch reference (``proximal_`` of mmmod/methods/inforeg.py).

Implementations: the CPU kernel (csrc/cpu/proximal_cpu.cpp, when the extension is built), the Triton
kernels (kernels/proximal_kernel.py; under the interpreter without a GPU) and the CUDA kernels
(csrc/cuda/proximal.cu, gpu-marked: first GPU, CUDA build).

Tolerances:

| quantity | fp32 | fp16 | bf16 | fp64 |
|---|---|---|---|---|
| corrected gradient, beta != 0 | bit-identical | bit-identical | bit-identical | bit-identical |
| corrected gradient, beta == 0 | bit-identical to the input (no store) | same | same | same |
| Fisher increment vs reference | rel 1e-5 | rel 1e-5 | rel 1e-5 | rel 1e-5 |
| Fisher increment vs float64 oracle | rel 1e-12 | rel 1e-12 | rel 1e-12 | rel 1e-12 |

The gradient is float32 arithmetic with every operation rounded (no FMA) in every
implementation, so it matches the reference bit for bit. The kernels sum the exact float64
squares of the stored values (fixed chunk order) where the reference takes a float32 mean:
they agree with a float64 oracle to float64 rounding, with the reference to its float32 mean's
error (< 1e-5 relative for these sizes).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from mmmod import _ext, _ops, backends, methods
from mmmod.methods.inforeg import snapshot_key
from mmmod.reference.proximal import proximal_

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# odd sizes, two CPU chunks (2^14) and a partial third, a Triton chunk (4096) + 1, empty tensors
# of >= 2 dims and 1-D, 0-d, and 3-D for the Fisher
SHAPES = [(37, 29), (7,), (5, 3, 2), (0, 4), (0,), (), (2 * 16384 + 77,), (4097, 1), (1, 1)]


def _cpu_live():
    return _ext.load("cpu")[0] is not None and _ops.has_kernel("proximal_", "CPU")


def _triton_live():
    return backends.status("triton")[0] and (torch.cuda.is_available()
                                             or os.environ.get("TRITON_INTERPRET") == "1")


def _triton_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


IMPLS = []
if _cpu_live():
    IMPLS.append(pytest.param("cpu", id="cpu"))
if _triton_live():
    IMPLS.append(pytest.param("triton", id="triton"))
IMPLS.append(pytest.param("cuda", id="cuda", marks=[
    pytest.mark.gpu,
    pytest.mark.skipif(not backends.status("cuda")[0],
                       reason=f"CUDA extension not available: {backends.status('cuda')[1]}")]))


def run_impl(impl, grads, params, snapshots, beta):
    if impl == "triton":
        return backends.get("triton", beta.device).proximal_(grads, params, snapshots, beta)
    return torch.ops.mmmod.proximal_(grads, params, snapshots, beta)


def device_of(impl):
    return {"cpu": torch.device("cpu"), "cuda": torch.device("cuda"),
            "triton": _triton_device()}[impl]


def make(shapes, dtype, device, gen, noncontiguous=False):
    """(grads, params, snapshots); with noncontiguous, the 2-D+ tensors are transposed views
    (every operand, each from its own storage) and one 1-D tensor a strided view."""
    def one(shape):
        if noncontiguous and len(shape) >= 2:
            t = torch.randn(tuple(reversed(shape)), generator=gen).to(dtype).transpose(0, -1)
        elif noncontiguous and len(shape) == 1 and shape[0] > 0:
            t = torch.randn(2 * shape[0], generator=gen).to(dtype)[::2]
        else:
            t = torch.randn(shape, generator=gen).to(dtype)
        return t.to(device)
    return ([one(s) for s in shapes], [one(s) for s in shapes], [one(s) for s in shapes])


def bits(t):
    """The tensor's bit pattern (-0.0 and NaN payloads compare as they are stored)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def oracle_fisher(grads):
    total = 0.0
    for g in grads:
        if g.dim() >= 2 and g.numel() > 0:
            total += float(g.double().square().sum()) / g.numel()
    return total


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("noncontiguous", [False, True], ids=["contiguous", "noncontiguous"])
def test_parity_with_reference(impl, dtype, noncontiguous, seed):
    dev = device_of(impl)
    gen = torch.Generator().manual_seed(seed)
    grads, params, snaps = make(SHAPES, dtype, dev, gen, noncontiguous)
    if noncontiguous:
        assert any(not g.is_contiguous() for g in grads)
    want = [g.detach().clone() for g in grads]
    beta = torch.tensor(0.95 * 1.7, device=dev)
    inc_ref = proximal_(want, params, snaps, beta)
    inc = run_impl(impl, grads, params, snaps, beta)
    for i, (g, w) in enumerate(zip(grads, want)):
        assert g.dtype == dtype and g.shape == w.shape
        assert torch.equal(g, w), (i, (g.float() - w.float()).abs().max())
    assert inc.dtype == torch.float64 and inc.dim() == 0 and inc.device == dev
    assert float(inc) == pytest.approx(oracle_fisher(grads), rel=1e-12)
    assert float(inc) == pytest.approx(float(inc_ref), rel=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_beta_zero_leaves_gradients_bit_identical(impl, dtype, seed):
    """Nothing is stored when beta is 0: -0.0 keeps its sign, float64 keeps its bits (the
    reference's float32 round trip would change both), non-finite weights are not read."""
    dev = device_of(impl)
    gen = torch.Generator().manual_seed(seed)
    grads, params, snaps = make([(33, 17), (4099,), (3,)], dtype, dev, gen)
    grads[0].view(-1)[:5] = -0.0
    params[1][:3] = float("inf")
    snaps[1][:3] = float("inf")
    snaps[2][0] = float("nan")
    before = [g.clone() for g in grads]
    inc = run_impl(impl, grads, params, snaps, torch.zeros((), device=dev))
    for g, b in zip(grads, before):
        assert torch.equal(bits(g), bits(b))
    assert float(inc) == pytest.approx(oracle_fisher(before), rel=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_bucket_and_only_1d(impl):
    dev = device_of(impl)
    beta = torch.tensor(0.5, device=dev)
    out = run_impl(impl, [], [], [], beta)
    assert out.dtype == torch.float64 and float(out) == 0.0
    g = [torch.ones(5, device=dev), torch.empty(0, 3, device=dev)]
    p = [torch.full((5,), 3.0, device=dev), torch.empty(0, 3, device=dev)]
    p0 = [torch.ones(5, device=dev), torch.empty(0, 3, device=dev)]
    out = run_impl(impl, g, p, p0, beta)
    assert float(out) == 0.0  # a 1-D tensor and an empty one: no Fisher term
    assert torch.equal(g[0].cpu(), torch.full((5,), 2.0))


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input_is_refused_before_anything_is_written(impl):
    dev = device_of(impl)
    beta = torch.tensor(1.0, device=dev)
    g = [torch.ones(4, 3, device=dev), torch.ones(5, device=dev)]
    p = [torch.zeros(4, 3, device=dev), torch.zeros(5, device=dev)]
    cases = [
        (g, p, [torch.zeros(4, 3, device=dev)], beta, ValueError, "snapshots"),
        (g, p, [torch.zeros(4, 3, device=dev), torch.zeros(6, device=dev)], beta, ValueError,
         "shape"),
        (g, p, [torch.zeros(4, 3, device=dev), torch.zeros(5, dtype=torch.float64, device=dev)],
         beta, TypeError, "dtype"),
        (g, p, [torch.zeros(4, 3, device=dev), torch.zeros(5, device=dev)],
         torch.ones(2, device=dev), ValueError, "beta"),
    ]
    for grads, params, snaps, b, exc, word in cases:
        with pytest.raises(exc, match=word):
            run_impl(impl, grads, params, snaps, b)
        assert torch.equal(g[0].cpu(), torch.ones(4, 3)) and torch.equal(g[1].cpu(), torch.ones(5))


@pytest.mark.skipif(not _cpu_live(), reason="the CPU extension is not built")
def test_cpu_fisher_is_bit_identical_across_thread_counts(seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(300, 301), (9, 16384 * 3 + 5), (65, 1)]
    grads, params, snaps = make(shapes, torch.float32, "cpu", gen)
    beta = torch.tensor(0.3)
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            gs = [g.clone() for g in grads]
            out.append((torch.ops.mmmod.proximal_(gs, params, snaps, beta), gs))
    finally:
        torch.set_num_threads(threads)
    for inc, gs in out[1:]:
        assert float(inc) == float(out[0][0])  # bit-identical, not close
        assert all(torch.equal(a, b) for a, b in zip(gs, out[0][1]))


def test_fake_gives_a_0d_float64(seed):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        g = [torch.empty(3, 4)]
        out = torch.ops.mmmod.proximal_(g, [torch.empty(3, 4)], [torch.empty(3, 4)],
                                        torch.empty(()))
    assert out.shape == () and out.dtype == torch.float64


def _inforeg_state(params, beta, dev, gen):
    m = methods.get("inforeg")
    state = m.init_state(len(params), device=dev)
    state["beta"].copy_(torch.tensor(beta))
    for i, ps in enumerate(params):
        for j, p in enumerate(ps):
            state[snapshot_key(i, j)] = (p + torch.randn(p.shape, generator=gen).to(dev)).to(p.dtype)
    return m, state


@pytest.mark.parametrize("backend", ["torch", None, "auto"]
                         + (["cpu"] if _cpu_live() else [])
                         + (["triton"] if _triton_live() else []))
def test_inforeg_correct_grads_dispatch_with_none_grads(backend, seed):
    """InfoReg.correct_grads_ through each backend's implementation: tensors without a
    gradient are skipped, the other corrections and the Fisher accumulator agree with the
    reference path."""
    dev = _triton_device() if backend == "triton" else torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    params = [[torch.randn(s, generator=gen).to(dev) for s in ((9, 5), (9,), (4, 3, 3))],
              [torch.randn(s, generator=gen).to(dev) for s in ((7, 2), (2,))]]
    grads = [[torch.randn(p.shape, generator=gen).to(dev) for p in ps] for ps in params]
    grads[0][1] = None
    grads[1][1] = None
    m, state = _inforeg_state(params, [1.3, 0.0], dev, gen)
    ref_grads = [[None if g is None else g.clone() for g in gs] for gs in grads]
    ref_state = {k: v.clone() for k, v in state.items()}
    m.correct_grads_(params, ref_grads, ref_state, backend="torch")
    m.correct_grads_(params, grads, state, backend=backend)
    for gs, rs in zip(grads, ref_grads):
        for g, r in zip(gs, rs):
            assert (g is None) == (r is None)
            if g is not None:
                assert torch.equal(g, r)
    torch.testing.assert_close(state["fisher"], ref_state["fisher"], rtol=1e-5, atol=0)
    assert float(state["fisher"][1]) > 0  # the beta = 0 modality still records its Fisher


AOT_PROBE = r"""
import json, os, sys, tempfile
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmmod-prox-aot-")
from tools import aot
launches = [l for l in aot.backend_launches() if ":_proximal" in l["kernel"]]
seen, out = set(), []
for launch in launches:
    key = aot.variant_key(launch)
    if key in seen:
        continue
    seen.add(key)
    for cc in aot.TARGETS:
        r = aot.compile_launch(launch, cc)
        r.pop("ptx", None); r.pop("ptxas_log", None)
        r.update(kernel=launch["kernel"].split(":")[1], cc=cc, label=aot.constexpr_label(launch))
        out.append(r)
print(json.dumps(out, default=str))
"""


@pytest.mark.skipif(not backends.status("triton")[0], reason="triton is not importable")
def test_proximal_kernels_compile_ahead_of_time_without_spills(tmp_path):
    """Every proximal launch tools/aot.py records compiles for sm_80/90/100/120 (the real
    compiler, not the interpreter), with no register spills, every float32 operation rounded
    (no contractible mul/add: FMA contraction is off), no approximate division, and 64-bit
    block offsets into the gradients."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", AOT_PROBE], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = [r["error"][-2000:] for r in rows if "error" in r]
    assert not errors, "\n\n".join(errors)
    kernels = {(r["kernel"], r["cc"]) for r in rows}
    assert kernels == {(k, cc) for k in ("_proximal_kernel", "_proximal_finish_kernel")
                       for cc in (80, 90, 100, 120)}
    labels = {r["label"] for r in rows if r["kernel"] == "_proximal_kernel"}
    for dt in ("fp32", "fp16", "bf16", "fp64"):
        assert any(f"DT={dt} ALIGNED=True" in lab for lab in labels), (dt, labels)
    assert any("ALIGNED=False" in lab for lab in labels)
    for r in rows:
        where = (r["kernel"], r["cc"], r["label"])
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, where
        assert 0 < r["registers"] <= 255, where
        assert r["ptx_counts"]["contractible_f32"] == 0, where
        assert r["ptx_counts"]["fma_f32"] == 0, where
        assert r["ptx_counts"]["div_approx"] == 0, where
        if r["kernel"] == "_proximal_kernel":
            t = r["ttir_counts"]
            assert t["block_addptr_i32"] == 0 and t["block_addptr_i64"] > 0, where


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["cuda", "triton"])
def test_gpu_no_host_sync_and_run_to_run_identity(impl, seed):
    if impl == "cuda" and not backends.status("cuda")[0]:
        pytest.skip(backends.status("cuda")[1])
    if impl == "triton" and not backends.status("triton")[0]:
        pytest.skip(backends.status("triton")[1])
    gen = torch.Generator().manual_seed(seed)
    grads, params, snaps = make([(1000, 300), (70001,), (3, 3)], torch.float32, "cuda", gen)
    beta = torch.tensor(0.7, device="cuda")
    run_impl(impl, [g.clone() for g in grads], params, snaps, beta)  # warm-up (tables, compile)
    outs = []
    for _ in range(2):
        gs = [g.clone() for g in grads]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            inc = run_impl(impl, gs, params, snaps, beta)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        outs.append((inc, gs))
    assert float(outs[0][0]) == float(outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))
