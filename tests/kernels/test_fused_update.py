"""fused=True (mmmod/optim/fused.py, docs/fused.md): the fused modulated update against
"modulate, then torch's own step" (the unfused ModulatedOptimizer), and the fused ops' device
kernels against their plain-torch reference."""
import copy

import pytest
import torch

import mmmod
import mmmod._ops
from mmmod import backends
from mmmod.optim import fused as FU
from mmmod.reference import fused as RF
from mmmod.reference.philox import seed_int64 as _seed_int64

CPU_LIVE = backends.status("cpu")[0] and mmmod._ops.has_kernel("fused_sgd_", "CPU")
BACKENDS = ["torch"] + (["cpu"] if CPU_LIVE else [])
# largest difference, fused vs unfused after 20 steps, in float32 ulps of the tensor's largest
# magnitude (docs/fused.md): bitwise for SGD and Adam on every backend (the CPU kernel takes its
# square roots from torch and rounds a * b + c as torch's dispatched kernels do)
ADAM_CPU_ULPS = 0


def _model(dtype):
    torch.manual_seed(0)
    m = torch.nn.ModuleDict({"a": torch.nn.Conv2d(3, 4, 3), "v": torch.nn.Conv2d(3, 5, 3),
                             "h": torch.nn.Linear(4, 3)})
    return m.to(dtype)


def _inner(kind, params, **kw):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, **kw)
    if kind == "adam":
        return torch.optim.Adam(params, lr=0.05, weight_decay=1e-2, **kw)
    return torch.optim.AdamW(params, lr=0.05, weight_decay=1e-2, **kw)


def _train(kind, fused, backend, dtype=torch.float32, steps=20, method="ogm_ge", inner_kw=None,
           apply_to="grad", sched=False, resume_at=None):
    m = _model(dtype)
    inner = _inner(kind, m.parameters(), **(inner_kw or {}))
    mk = lambda f: mmmod.ModulatedOptimizer(  # noqa: E731
        inner, {"a": m["a"], "v": m["v"]}, method=method, alpha=0.8, backend=backend, fused=f,
        apply_to=apply_to)
    opt = mk(fused)
    lr_s = torch.optim.lr_scheduler.StepLR(inner, 5, 0.5) if sched else None
    g = torch.Generator().manual_seed(1)
    for s in range(steps):
        if resume_at == s:  # checkpoint, then continue with the other path
            sd = copy.deepcopy(opt.state_dict())
            opt = mk(not fused)
            opt.load_state_dict(sd)
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.observe([torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)],
                    torch.randint(0, 3, (8,), generator=g))
        opt.step()
        if lr_s is not None:
            lr_s.step()
    return [p.detach().clone() for p in m.parameters()], inner


def _ulps(a, b):
    """max |a - b| in float32 ulps of max |a| (normwise)."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / (torch.finfo(torch.float32).eps * a.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("method", ["ogm_ge", "ogm", "mlb"])
def test_fused_equals_unfused_fp32(backend, kind, method):
    a, _ = _train(kind, False, backend, method=method)
    b, _ = _train(kind, True, backend, method=method)
    bound = 0 if backend == "torch" or kind == "sgd" else ADAM_CPU_ULPS
    for x, y in zip(a, b):
        assert torch.equal(x, y) if bound == 0 else _ulps(x, y) <= bound


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [dict(nesterov=True), dict(dampening=0.3),
                                  dict(maximize=True), dict(momentum=0.0)])
def test_sgd_options_bitwise(backend, opts):
    kw = dict(opts)
    a, _ = _train("sgd", False, backend, inner_kw=kw) if "momentum" not in kw else (None, None)
    if a is None:  # momentum=0 overrides the default in _inner
        m0 = dict(kw)
        a, _ = _train_sgd_plain(False, backend, m0)
        b, _ = _train_sgd_plain(True, backend, m0)
    else:
        b, _ = _train("sgd", True, backend, inner_kw=kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def _train_sgd_plain(fused, backend, kw):
    m = _model(torch.float32)
    inner = torch.optim.SGD(m.parameters(), lr=0.1, **kw)
    opt = mmmod.ModulatedOptimizer(inner, {"a": m["a"], "v": m["v"]}, method="ogm_ge",
                                   backend=backend, fused=fused)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.observe([torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)],
                    torch.randint(0, 3, (8,), generator=g))
        opt.step()
    return [p.detach().clone() for p in m.parameters()], inner


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_update_mode_scheduler_resume(backend, kind):
    bound = 0 if kind == "sgd" or backend == "torch" else ADAM_CPU_ULPS
    for kw in (dict(apply_to="update"), dict(sched=True), dict(resume_at=7)):
        a, ia = _train(kind, False, backend, **kw)
        b, ib = _train(kind, True, backend, **kw)
        for x, y in zip(a, b):
            assert torch.equal(x, y) if bound == 0 else _ulps(x, y) <= bound, kw
        # the state is torch's own: the same keys for every parameter, fused or not
        assert [sorted(s) for s in ia.state.values()] == [sorted(s) for s in ib.state.values()]


def _cpu_noise(seed, step, modality, offset, n, device):
    """The cpu backend's Philox normals (its own log/cos/sin/sqrt roundings; docs/semantics.md
    section 5 lets backends differ there by float32 roundings)."""
    out = torch.empty(n, dtype=torch.float32)
    torch.ops.mmmod._philox_normal_(out, _seed_int64(seed), step, modality, offset)
    return out.to(device)


def _cpu_tables():
    """The CPU kernel tables this machine runs (``MMMOD_CPU_KERNELS``): the fused update's
    vectorised loops are built for AVX-512 and AVX2, its portable loops run under "scalar"."""
    if not CPU_LIVE:
        return ["scalar"]
    import mmmod._C
    info = mmmod._C.cpu_kernels()
    return ((["avx512"] if info.get("avx512_supported") else [])
            + (["avx2"] if info["avx2_supported"] else []) + ["scalar"])


@pytest.mark.skipif(not CPU_LIVE, reason="cpu extension with the fused kernels not built")
@pytest.mark.parametrize("table", _cpu_tables())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n", [0, 1, 13, 4099, 40000])
@pytest.mark.parametrize("noise", [False, True])
def test_cpu_ops_equal_reference(dtype, n, noise, table, monkeypatch):
    """The C++ ops equal the plain-torch reference bit for bit in every dtype over 3 steps, when
    the reference draws the cpu backend's normals (with the reference's own normals the
    modulated gradient may differ by the normals' float32 roundings, about 3 % of the elements
    by one float32 ulp at these sizes), under every CPU kernel table."""
    monkeypatch.setenv("MMMOD_CPU_KERNELS", table)
    monkeypatch.setattr(RF, "philox_normal", _cpu_noise)
    torch.manual_seed(n)
    p0, g = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
    sigma = torch.tensor([0.02]) if noise else None
    k, u = torch.tensor(0.6), torch.tensor(0.5)
    for upd in (None, u):
        for nesterov, dampening, maximize in ((True, 0.0, False), (False, 0.1, True)):
            out = []
            for impl in ("ref", "op"):
                p, buf = p0.clone(), torch.empty_like(p0)
                for t in range(3):  # the first step starts the momentum buffer
                    args = ([p], [g * (t + 1)], [buf], [t > 0], [5], k, sigma, upd)
                    hyper = dict(lr=0.1, weight_decay=0.01, momentum=0.9, dampening=dampening,
                                 nesterov=nesterov, maximize=maximize)
                    if impl == "ref":
                        FU.reference_sgd_(*args, **hyper, seed=3, step=t, modality=1)
                    else:
                        torch.ops.mmmod.fused_sgd_(*args, *hyper.values(), 3, t, 1)
                out.append((p, buf))
            for x, y in zip(*out):
                assert _op_equal(x, y, dtype), (upd, nesterov)
        for decoupled, maximize in ((True, False), (False, True)):
            out = []
            for impl in ("ref", "op"):
                p, a, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
                for t in range(1, 4):
                    args = ([p], [g * t], [a], [v], [float(t)], [5], k, sigma, upd)
                    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999,
                                 eps=1e-4 if dtype == torch.float16 else 1e-8,  # 1e-8: 0 in fp16
                                 weight_decay=0.01, decoupled=decoupled, maximize=maximize)
                    if impl == "ref":
                        FU.reference_adam_(*args, **hyper, seed=3, step=t, modality=1)
                    else:
                        torch.ops.mmmod.fused_adam_(*args, *hyper.values(), 3, t, 1)
                out.append((p, a, v))
            checked = list(zip(*out))
            if dtype in (torch.float16, torch.bfloat16) and not decoupled:
                # grad + wd p rounds differently in torch's reduced-precision kernel (see
                # _op_equal); where exp_avg_sq is near 0 that moves the parameter by far more
                # than an ulp (m / (sqrt(v) + eps)), so only the moments are bounded here
                checked = checked[1:]
            for x, y in checked:
                assert _op_equal(x, y, dtype), (upd, decoupled)


def _op_equal(x, y, dtype):
    """Bitwise in float32 / float64; within REDUCED_OP_ULPS normwise ulps of the dtype in
    fp16 / bf16 (docs/fused.md: torch's reduced-precision add-with-alpha)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return torch.equal(x, y)
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return False
    d = (x.double() - y.double()).abs().max() if x.numel() else 0.0
    scale = x.double().abs().max() if x.numel() else 0.0
    return bool(d <= REDUCED_OP_ULPS * torch.finfo(dtype).eps * scale)


# the ops against their reference in fp16 / bf16 over 3 steps (normwise ulps of the dtype)
REDUCED_OP_ULPS = 2


@pytest.mark.skipif(not CPU_LIVE, reason="cpu extension with the fused kernels not built")
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_cpu_fused_adam_bitwise_under_each_torch_cpu_capability(capability):
    """torch's DEFAULT kernels round a * b + c twice, its AVX2/AVX-512 ones once: the kernel
    follows the capability torch dispatches to (a fresh process: it is read at start-up)."""
    import subprocess
    import sys
    code = ("import sys; sys.path[:0] = ['tests/kernels', 'tests']; import torch, test_fused_update as T\n"
            "for kind in ('sgd', 'adam', 'adamw'):\n"
            "    a, _ = T._train(kind, False, 'cpu', steps=6)\n"
            "    b, _ = T._train(kind, True, 'cpu', steps=6)\n"
            "    assert all(torch.equal(x, y) for x, y in zip(a, b)), kind\n"
            "print('ok', torch.backends.cpu.get_cpu_capability())\n")
    import os
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


# ---- the optimizer level: dtypes, layouts, GradScaler, accumulation ---------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_fused_equals_unfused_low_and_double_precision(backend, kind, dtype):
    """Parameters, gradients and state in fp16 / bf16 / fp64 (torch's SGD and Adam take every
    floating dtype on CPU), 20 steps, OGM-GE (noise on): bitwise, except SGD and Adam (coupled
    weight decay) on the cpu backend in fp16 / bf16, within REDUCED_CPU_ULPS (docs/fused.md:
    torch's own reduced-precision add-with-alpha rounds differently in its vector body and its
    scalar tail)."""
    # eps 1e-8 is 0 in fp16 (Adam would divide 0 by 0): fp16 Adam runs take a representable one
    kw = dict(eps=1e-4) if kind != "sgd" and dtype == torch.float16 else None
    a, ia = _train(kind, False, backend, dtype=dtype, inner_kw=kw)
    b, ib = _train(kind, True, backend, dtype=dtype, inner_kw=kw)
    reduced = dtype in (torch.float16, torch.bfloat16)
    if kind != "adamw" and backend == "cpu" and reduced:
        for x, y in zip(a, b):
            assert x.dtype == dtype and torch.isfinite(x).all()
            d = (x.double() - y.double()).abs().max()
            assert d <= REDUCED_CPU_ULPS * torch.finfo(dtype).eps * x.double().abs().max()
        return
    for x, y in zip(a, b):
        assert x.dtype == dtype and torch.isfinite(x).all() and torch.equal(x, y)
    _assert_same_state(ia, ib)


# SGD / Adam on the cpu backend, fp16/bf16 parameters, after 20 steps: normwise ulps of the
# dtype (observed: SGD 0.93 in both, Adam 0.06 in fp16, bitwise in bf16)
REDUCED_CPU_ULPS = 2


def _assert_same_state(ia, ib):
    """The optimizers' states, parameter by parameter (the fused step creates the modalities'
    state before the inner step creates the others': the dicts' orders differ)."""
    pa = [p for g in ia.param_groups for p in g["params"]]
    pb = [p for g in ib.param_groups for p in g["params"]]
    for x, y in zip(pa, pb):
        sa, sb = ia.state.get(x, {}), ib.state.get(y, {})
        assert sorted(sa) == sorted(sb)
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert torch.equal(sa[key], sb[key]), key


class _Layouts(torch.nn.Module):
    """Modality a: a channels_last conv weight (not contiguous) and an empty parameter;
    modality v: a transposed (non-contiguous) matrix and an ordinary bias."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.ParameterList([
            torch.nn.Parameter(torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last)),
            torch.nn.Parameter(torch.empty(0, 5)),
            torch.nn.Parameter(torch.randn(7))])
        self.v = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(6, 5).t()),
                                         torch.nn.Parameter(torch.randn(5))])


def _train_layouts(kind, fused, backend, steps=8):
    m = _Layouts()
    assert not m.a[0].is_contiguous() and not m.v[0].is_contiguous()
    inner = _inner(kind, m.parameters())
    opt = mmmod.ModulatedOptimizer(inner, {"a": m.a, "v": m.v}, method="ogm_ge", alpha=0.8,
                                   backend=backend, fused=fused, param_filter=lambda n, p: True)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.observe([torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)],
                    torch.randint(0, 3, (8,), generator=g))
        opt.step()
    return list(m.parameters()), inner


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_fused_non_contiguous_and_empty_params(backend, kind):
    a, ia = _train_layouts(kind, False, backend)
    b, ib = _train_layouts(kind, True, backend)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        assert x.stride() == y.stride()  # updated in place: the layout is the parameter's own
    _assert_same_state(ia, ib)


def _train_loop(kind, fused, backend, *, scaler=False, accumulate=1, bad_step=None, steps=6):
    """A real loop (TwoEncoder, cross-entropy): GradScaler with an inf injected at bad_step (the
    scaler skips that step), gradients accumulated over micro-batches (observe per micro-batch)."""
    from _models import TwoEncoder, batch, make

    torch.manual_seed(0)
    model = TwoEncoder()
    inner = _inner(kind, model.parameters())
    opt, names = make(model, inner, backend=backend, alpha=0.8, method="ogm_ge", fused=fused)
    sc = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2) if scaler else None
    g = torch.Generator().manual_seed(3)
    scales = []
    for i in range(steps):
        opt.zero_grad()
        for _ in range(accumulate):
            xs, y = batch(g=g)
            out, feats = model(xs)
            opt.observe(dict(zip(names, mmmod.fusion.concat_logits(model.head, feats))), y)
            loss = torch.nn.functional.cross_entropy(out, y) / accumulate
            (sc.scale(loss) if sc is not None else loss).backward()
        if i == bad_step:
            model.encoders[0][0].weight.grad[0, 0, 0, 0] = float("inf")
        if sc is not None:
            sc.step(opt)
            sc.update()
            scales.append(sc.get_scale())
        else:
            opt.step()
    return [p.detach().clone() for p in model.parameters()], opt.step_count, scales


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("case", ["scaler", "accumulate", "scaler+accumulate"])
def test_fused_grad_scaler_and_accumulation(backend, kind, case):
    kw = dict(scaler="scaler" in case, accumulate=3 if "accumulate" in case else 1,
              bad_step=2 if "scaler" in case else None)
    a, na, sa = _train_loop(kind, False, backend, **kw)
    b, nb, sb = _train_loop(kind, True, backend, **kw)
    assert na == nb == (5 if kw["bad_step"] is not None else 6)  # the inf step is skipped
    assert sa == sb
    for x, y in zip(a, b):
        assert torch.isfinite(x).all() and torch.equal(x, y)


def test_errors_before_anything_is_written():
    m = _model(torch.float32)
    with pytest.raises(ValueError, match="supports torch.optim.SGD, Adam and AdamW"):
        mmmod.ModulatedOptimizer(torch.optim.RMSprop(m.parameters()), {"a": m["a"], "v": m["v"]},
                                 fused=True, backend="torch")
    with pytest.raises(ValueError, match="amsgrad=True"):
        mmmod.ModulatedOptimizer(torch.optim.Adam(m.parameters(), amsgrad=True),
                                 {"a": m["a"], "v": m["v"]}, fused=True, backend="torch")
    inner = torch.optim.SGD(m.parameters(), lr=0.1)
    opt = mmmod.ModulatedOptimizer(inner, {"a": m["a"], "v": m["v"]}, fused=True, backend="torch")
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    inner.param_groups[0]["differentiable"] = True
    before = [p.detach().clone() for p in m.parameters()]
    opt.observe([torch.randn(4, 3), torch.randn(4, 3)], torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="differentiable=True"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_params_outside_modalities_use_inner_step():
    a, _ = _train("sgd", False, "torch")
    b, _ = _train("sgd", True, "torch")
    assert torch.equal(a[-1], b[-1]) and torch.equal(a[-2], b[-2])  # the head


# ---- the Triton kernel (kernels/fused_update_kernel.py), under TRITON_INTERPRET=1 on CPU ------
TRITON_LIVE = backends.status("triton")[0]
# fused vs unfused / op vs reference under the interpreter, normwise ulps of the dtype: the
# interpreter evaluates tl.fma as a rounded product plus a rounded sum and its square root is
# numpy's (torch's CPU step: one-rounding FMAs, its own sqrt), and its normals use numpy's
# log/cos/sin (docs/semantics.md section 5); observed up to 1.2 over 5 steps
TRITON_INTERP_ULPS = 4


def _normwise_ulps(x, y, dtype):
    x, y = x.double(), y.double()
    if x.numel() == 0:
        return 0.0
    return float((x - y).abs().max() / (torch.finfo(dtype).eps * x.abs().max().clamp_min(1e-30)))


@pytest.mark.skipif(not TRITON_LIVE, reason="triton backend not available")
@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_triton_fused_equals_unfused(kind, dtype):
    a, ia = _train(kind, False, "triton", dtype=dtype, steps=5)
    b, ib = _train(kind, True, "triton", dtype=dtype, steps=5)
    for x, y in zip(a, b):
        assert torch.isfinite(y).all() and _normwise_ulps(x, y, dtype) <= TRITON_INTERP_ULPS
    pa = [p for g in ia.param_groups for p in g["params"]]
    pb = [p for g in ib.param_groups for p in g["params"]]
    for x, y in zip(pa, pb):
        assert sorted(ia.state.get(x, {})) == sorted(ib.state.get(y, {}))


def _fused_kernels():
    """The Triton launchers (mmmod/backends/triton/fused_update.py) bound to a fresh backend, as
    ``.sgd_`` / ``.adam_`` with ``reference_sgd_`` / ``reference_adam_``'s signature, and the
    backend as ``.be``; skipped where Triton is absent."""
    pytest.importorskip("triton")
    import functools
    import types

    from mmmod.backends.triton import TritonBackend, fused_update
    be = TritonBackend()
    return types.SimpleNamespace(be=be, sgd_=functools.partial(fused_update.fused_sgd_, be),
                                 adam_=functools.partial(fused_update.fused_adam_, be))


@pytest.mark.skipif(not TRITON_LIVE, reason="triton backend not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [0, 1, 13, 4099])
def test_triton_ops_match_reference(dtype, n):
    """The launchers (sgd_ / adam_) against the plain-torch reference over 3 steps: odd sizes,
    an empty tensor, a stream offset that is not a multiple of 4, noise, the update scale."""
    fk = _fused_kernels()
    torch.manual_seed(n)
    sizes = [n, 5]
    p0 = [torch.randn(s).to(dtype) for s in sizes]
    g = [torch.randn(s).to(dtype) for s in sizes]
    offs = [3, 3 + n]
    k, u = torch.tensor(0.6), torch.tensor(0.5)
    for sigma in (None, torch.tensor([0.02, 0.05])):
        for upd in (None, u):
            out = []
            for impl in (FU.reference_sgd_, fk.sgd_):
                p, buf = [x.clone() for x in p0], [torch.empty_like(x) for x in p0]
                for t in range(3):
                    impl(p, [x * (t + 1) for x in g], buf, [t > 0] * 2, offs, k, sigma, upd,
                         lr=0.1, weight_decay=0.01, momentum=0.9, dampening=0.1, nesterov=True,
                         maximize=False, seed=3, step=t, modality=1)
                out.append(p + buf)
            for x, y in zip(*out):
                assert _normwise_ulps(x, y, dtype) <= TRITON_INTERP_ULPS
            out = []
            for impl in (FU.reference_adam_, fk.adam_):
                p = [x.clone() for x in p0]
                a, v = [torch.zeros_like(x) for x in p0], [torch.zeros_like(x) for x in p0]
                for t in range(1, 4):
                    impl(p, [x * t for x in g], a, v, [float(t)] * 2, offs, k, sigma, upd,
                         lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                         decoupled=True, maximize=True, seed=3, step=t, modality=1)
                out.append(p + a + v)
            for x, y in zip(*out):
                assert _normwise_ulps(x, y, dtype) <= TRITON_INTERP_ULPS


@pytest.mark.skipif(not TRITON_LIVE, reason="triton backend not available")
def test_triton_launcher_refuses_before_writing():
    fk = _fused_kernels()
    p = [torch.ones(5), torch.ones(3)]
    before = [x.clone() for x in p]
    with pytest.raises(ValueError, match="grads 1 must be a contiguous"):
        fk.sgd_(p, [torch.ones(5), torch.ones(4)], [torch.empty(5), torch.empty(3)],
                [False, False], [0, 5], torch.tensor(1.0), None, None, lr=0.1,
                weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False, maximize=False,
                seed=0, step=0, modality=0)
    with pytest.raises(ValueError, match="step count"):
        fk.adam_(p, [torch.ones(5), torch.ones(3)], [torch.zeros(5), torch.zeros(3)],
                 [torch.zeros(5), torch.zeros(3)], [0.0, 1.0], [0, 5], torch.tensor(1.0), None,
                 None, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                 decoupled=True, maximize=False, seed=0, step=0, modality=0)
    assert all(torch.equal(a, b) for a, b in zip(before, p))


def test_triton_fused_table_is_reused_while_storages_stay():
    """The fused update's table is built and uploaded once per set of storages, not per step,
    by the backend's one table cache."""
    cache = _fused_kernels().be.meta_cache
    g, p, s = torch.zeros(10), torch.zeros(10), torch.zeros(10)
    t1 = cache.fused([g], [p], [s], [None], [0], [True], 256)
    t2 = cache.fused([g], [p], [s], [None], [0], [True], 256)
    assert t1 is t2 and cache.builds == 1
    t3 = cache.fused([g], [p], [s], [None], [0], [False], 256)  # a flag changed
    assert t3 is not t1 and not torch.equal(t3.table, t1.table) and cache.builds == 2
