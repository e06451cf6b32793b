"""The test database of the mmmod ops, backends and methods (torch's ``common_optimizers.py``
is the model): what each op takes (sample inputs of odd sizes, empty and non-contiguous
tensors, every float dtype with its tolerance), what it must refuse (error inputs), which
backends run here, and what each method needs to run a few epochs. Generic tests over it:
tests/ops/test_op_infos.py; tests/backends/test_outside_backend.py runs the method infos."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from mmmod import backends, methods
from mmmod.reference.native_rules import METHODS as RULE_METHODS
from mmmod.reference.native_rules import NativeRule, rule_of
from mmmod.reference.ops import REFERENCES

#: (rtol, atol) of a backend's kernel against the reference, per dtype of the data it writes;
#: the compiled and Triton kernels keep the reference's float32 arithmetic, so the rest is the
#: last bit of the noise (a few elements, one float32 ulp) and of the final rounding
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-3),
              torch.bfloat16: (1e-2, 1e-2), torch.float64: (1e-7, 1e-9)}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Sample:
    """One call: ``args`` in the op's schema order; ``desc`` names it in test ids."""
    desc: str
    args: tuple
    dtype: torch.dtype = torch.float32


@dataclass
class ErrorSample:
    desc: str
    args: tuple
    error: type
    match: str


@dataclass
class OpInfo:
    name: str
    samples: Callable[[torch.device], list]  # -> [Sample]
    errors: Callable[[torch.device], list] = lambda device: []  # -> [ErrorSample]
    #: argument positions the op writes (compared after the call, checked untouched on error)
    mutated: tuple = ()

    @property
    def reference(self):
        return REFERENCES[self.name]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _t(shape, dtype, device, g, noncontig=False):
    if noncontig and len(shape) == 2:
        x = torch.randn(shape[1], shape[0], generator=g).t()
    else:
        x = torch.randn(*shape, generator=g)
    x = x.to(dtype)
    return x.to(device) if not noncontig else x.to(device).t().contiguous().t()


def _scalars(device):
    return torch.tensor(0.7, device=device), torch.tensor(1.0, device=device)


# ---- sample inputs per op -------------------------------------------------------------------
def _scores_samples(device):
    g, out = _gen(1), []
    for dtype in FLOAT_DTYPES:
        zs = [_t((7, 4), dtype, device, g), _t((7, 6), dtype, device, g, noncontig=True)]
        out.append(Sample(f"odd-{dtype}", (zs, torch.randint(0, 4, (7,), generator=g).to(device)),
                          dtype))
    out.append(Sample("empty-batch", ([torch.empty(0, 3, device=device)] * 2,
                                      torch.empty(0, dtype=torch.long, device=device))))
    return out


def _coefficients_samples(device):
    s = torch.tensor([3.0, 1.5, 2.0], device=device)
    return [Sample(f"{m}", (s.clone(), int(rule_of(m)), 0.5, 2.0)) for m in RULE_METHODS]


def _coefficients_errors(device):
    s = torch.tensor([3.0, 1.5, 2.0], device=device)
    bad = max(NativeRule) + 1
    return [ErrorSample("unknown-rule", (s, bad, 0.5, 2.0), ValueError,
                        f"unknown native rule code {bad}; expected one of 0 \\(none\\)"),
            ErrorSample("negative-rule", (s, -1, 0.5, 2.0), ValueError, "unknown native rule code -1")]


def _bucket(dtype, device, g, sizes=((37,), (3, 5), (0,), (1,))):
    return [_t(s, dtype, device, g) for s in sizes]


def _offsets(ts, start=3):
    out, run = [], start
    for t in ts:
        out.append(run)
        run += t.numel()
    return out


def _modulate_samples(device):
    g, out = _gen(2), []
    k, gate = _scalars(device)
    for dtype in FLOAT_DTYPES:
        for noise, scaled in ((False, False), (True, False), (True, True)):
            ts = _bucket(dtype, device, g)
            out.append(Sample(f"{dtype}-noise{int(noise)}-scaled{int(scaled)}",
                              (ts, _offsets(ts), k, gate, noise, scaled, -5, 3, 1), dtype))
    return out


def _modulate_capturable_samples(device):
    g, out = _gen(3), []
    k, gate = _scalars(device)
    for dtype in FLOAT_DTYPES:
        ts = _bucket(dtype, device, g)
        out.append(Sample(f"{dtype}-step-tensor", (ts, _offsets(ts), k, gate, True, False, 9, 0, 2,
                                                    None, torch.tensor(4, device=device)), dtype))
    return out


def _modulate_sigma_samples(device):
    g, out = _gen(4), []
    k, gate = _scalars(device)
    for dtype in FLOAT_DTYPES:
        ts = _bucket(dtype, device, g)
        sigma = torch.tensor([0.1, 0.2, 0.3, float("nan")], device=device)
        out.append(Sample(f"{dtype}", (ts, _offsets(ts), k, gate, sigma, 11, 5, 0), dtype))
    return out


def _std_samples(device):
    g = _gen(5)
    return [Sample(f"{dtype}", (_bucket(dtype, device, g),), dtype) for dtype in FLOAT_DTYPES]


def _moments_samples(device):
    g = _gen(6)
    out = [Sample(f"{dtype}", ([_t((7,), dtype, device, g), torch.empty(0, dtype=dtype, device=device),
                                _t((5, 4), dtype, device, g, noncontig=True)],), dtype)
           for dtype in FLOAT_DTYPES]
    out.append(Sample("no-tensors", ([],)))
    return out


def _philox_samples(device):
    return [Sample("odd", (torch.empty(11, device=device), 7, 2, 0, 3)),
            Sample("empty", (torch.empty(0, device=device), 7, 2, 0, 0))]


def _proximal_samples(device):
    g, out = _gen(7), []
    for dtype in FLOAT_DTYPES:
        shapes = ((9, 5), (7,), (0, 3), (2, 2, 3))
        gs = [_t(s, dtype, device, g) for s in shapes]
        ps = [_t(s, dtype, device, g) for s in shapes]
        p0 = [_t(s, dtype, device, g) for s in shapes]
        for beta in (0.0, 0.6):
            out.append(Sample(f"{dtype}-beta{beta}",
                              ([x.clone() for x in gs], ps, p0, torch.tensor(beta, device=device)),
                              dtype))
    return out


def _fused_sgd_samples(device):
    g, out = _gen(8), []
    k = torch.tensor(0.6, device=device)
    for dtype in FLOAT_DTYPES:
        sizes = ((13,), (4, 3))
        ps = [_t(s, dtype, device, g) for s in sizes]
        gs = [_t(s, dtype, device, g) for s in sizes]
        bufs = [_t(s, dtype, device, g) for s in sizes]
        sigma = torch.tensor([0.02, 0.01], device=device)
        out.append(Sample(f"{dtype}", (ps, gs, bufs, [True, False], [5, 18], k, sigma,
                                       torch.tensor(0.5, device=device), 0.1, 0.01, 0.9, 0.1,
                                       True, False, 3, 2, 1), dtype))
    return out


def _fused_adam_samples(device):
    g, out = _gen(9), []
    k = torch.tensor(0.6, device=device)
    for dtype in FLOAT_DTYPES:
        sizes = ((13,), (4, 3))
        ps = [_t(s, dtype, device, g) for s in sizes]
        gs = [_t(s, dtype, device, g) for s in sizes]
        m1 = [_t(s, dtype, device, g) for s in sizes]
        m2 = [_t(s, dtype, device, g).abs() for s in sizes]
        out.append(Sample(f"{dtype}", (ps, gs, m1, m2, [2.0, 3.0], [0, 13], k, None, None, 1e-2,
                                       0.9, 0.999, 1e-8, 0.01, True, False, 3, 2, 1), dtype))
    return out


def _pair_lists(dtype, device, g):
    shapes = ((37,), (0,), (5, 4), (4100,))
    fused = [_t(s, dtype, device, g) for s in shapes[:2]] + [
        _t((5, 4), dtype, device, g, noncontig=True), _t(shapes[3], dtype, device, g)]
    summed = [_t(s, dtype, device, g) for s in shapes[:2]] + [
        _t((5, 4), dtype, device, g, noncontig=True), _t(shapes[3], dtype, device, g)]
    return fused, summed


def _pair_scale(device):
    return torch.tensor([2.0 ** -7], dtype=torch.float64, device=device)  # a GradScaler's 1/scale


def _pair_moments_samples(device):
    g, out = _gen(10), []
    for dtype in FLOAT_DTYPES + (torch.float64,):
        fused, summed = _pair_lists(dtype, device, g)
        # float64 rows: kernel and reference (torch's dot) differ in summation order only
        out.append(Sample(f"{dtype}", (fused, summed, None), torch.float64))
        out.append(Sample(f"{dtype}-scaled", (fused, summed, _pair_scale(device)), torch.float64))
    return out


def _moments(n, g, device, conflict):
    """[n, 3] rows (|a|^2, |b|^2, a.b) of possible vectors; ``conflict``: a.b < 0 in total
    (the min-norm branch), else > 0 (equal weights)."""
    aa = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    bb = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    cos = (torch.rand(n, generator=g, dtype=torch.float64) * 0.9) * (-1 if conflict else 1)
    return torch.stack([aa, bb, cos * (aa * bb).sqrt()], 1).to(device)


def _combine_samples(device):
    g, out = _gen(11), []
    for dtype in FLOAT_DTYPES + (torch.float64,):
        fused, summed = _pair_lists(dtype, device, g)
        for conflict in (True, False):
            moments = _moments(len(summed), g, device, conflict)
            out.append(Sample(f"{dtype}-conflict{int(conflict)}",
                              ([x.clone() for x in summed], fused, moments, [len(summed)], 1.5,
                               None), dtype))
        out.append(Sample(f"{dtype}-scaled", ([x.clone() for x in summed], fused, moments,
                                              [len(summed)], 1.5, _pair_scale(device)), dtype))
        out.append(Sample(f"{dtype}-own-moments", ([x.clone() for x in summed], fused, None,
                                                   [len(summed)], 1.5, _pair_scale(device)),
                          dtype))
        if len(summed) > 1:
            out.append(Sample(f"{dtype}-two-modalities",
                              ([x.clone() for x in summed], fused, moments,
                               [1, len(summed) - 1], 1.5, None), dtype))
    return out


# ---- error inputs (each raises before anything is written) ----------------------------------
def _modulate_sigma_errors(device):
    ts = [torch.randn(5, device=device), torch.randn(3, device=device)]
    k, gate = _scalars(device)
    return [ErrorSample("sigma-shape", (ts, [0, 5], k, gate, torch.ones(3, device=device), 1, 0, 0),
                        ValueError, "sigma must have shape"),
            ErrorSample("sigma-dtype", (ts, [0, 5], k, gate, torch.ones(2, dtype=torch.float64,
                                                                         device=device), 1, 0, 0),
                        TypeError, "sigma must be float32")]


def _moments_errors(device):
    return [ErrorSample("int-tensor", ([torch.ones(3, device=device),
                                        torch.ones(3, dtype=torch.int32, device=device)],),
                        TypeError, "tensor 1 is (torch.int32|Int)")]


def _proximal_errors(device):
    g = [torch.randn(4, 3, device=device), torch.randn(5, device=device)]
    p = [torch.randn(4, 3, device=device), torch.randn(6, device=device)]
    p0 = [torch.randn(4, 3, device=device), torch.randn(6, device=device)]
    return [ErrorSample("shape", (g, p, p0, torch.tensor(0.5, device=device)), ValueError,
                        "tensor 1: grad")]


def _pair_errors(device):
    a = [torch.randn(4, 3, device=device), torch.randn(5, device=device)]
    s = [torch.randn(4, 3, device=device), torch.randn(6, device=device)]
    h = [torch.randn(4, 3, device=device), torch.randn(5, device=device, dtype=torch.float16)]
    s2 = [torch.randn(4, 3, device=device), torch.randn(5, device=device)]
    scale32 = torch.tensor([0.5], device=device)
    return [ErrorSample("shape", (a, s, None), ValueError, "tensor 1: fused gradient"),
            ErrorSample("dtype", (h, s2, None), TypeError, "tensor 1: fused gradient"),
            ErrorSample("count", (a[:1], s2, None), ValueError, "1 fused gradients for 2"),
            ErrorSample("scale-dtype", (a, s2, scale32), TypeError, "fused_scale must be")]


def _combine_errors(device):
    f64 = torch.float64
    out = []
    for e in _pair_errors(device):
        fused, summed, scale = e.args
        out.append(ErrorSample(e.desc, (summed, fused, torch.ones(len(summed), 3, dtype=f64,
                                                                  device=device),
                                        [len(summed)], 1.5, scale),
                               e.error, e.match))
    a = [torch.randn(4, 3, device=device), torch.randn(5, device=device)]
    s = [torch.randn(4, 3, device=device), torch.randn(5, device=device)]
    mom = torch.ones(2, 3, dtype=f64, device=device)
    out.append(ErrorSample("moments-shape", (s, a, torch.ones(3, 3, dtype=f64, device=device),
                                             [2], 1.5, None), ValueError,
                           r"moments must have shape \[2, 3\]"))
    out.append(ErrorSample("moments-dtype", (s, a, torch.ones(2, 3, device=device), [2], 1.5,
                                             None), TypeError, "moments must be float64"))
    out.append(ErrorSample("groups-sum", (s, a, mom, [1, 2], 1.5, None), ValueError,
                           "add up to 3 tensors"))
    out.append(ErrorSample("groups-empty-modality", (s, a, mom, [2, 0], 1.5, None), ValueError,
                           "each at least 1"))
    return out


OP_INFOS = [
    OpInfo("scores", _scores_samples),
    OpInfo("coefficients", _coefficients_samples, _coefficients_errors),
    OpInfo("modulate_", _modulate_samples, mutated=(0,)),
    OpInfo("modulate_.capturable", _modulate_capturable_samples, mutated=(0,)),
    OpInfo("modulate_sigma_", _modulate_sigma_samples, _modulate_sigma_errors, mutated=(0,)),
    OpInfo("_bucket_std", _std_samples),
    OpInfo("_bucket_moments", _moments_samples, _moments_errors),
    OpInfo("_philox_normal_", _philox_samples, mutated=(0,)),
    OpInfo("proximal_", _proximal_samples, _proximal_errors, mutated=(0,)),
    OpInfo("fused_sgd_", _fused_sgd_samples, mutated=(0, 2)),
    OpInfo("fused_adam_", _fused_adam_samples, mutated=(0, 2, 3)),
    OpInfo("_pair_moments", _pair_moments_samples, _pair_errors),
    OpInfo("combine_", _combine_samples, _combine_errors, mutated=(0,)),
]
#: ops with a reference (``bucket_table`` is a CUDA kernel's device metadata: tests/backends/test_ext_cuda.py)
assert {o.name for o in OP_INFOS} == set(REFERENCES), set(REFERENCES) ^ {o.name for o in OP_INFOS}


# ---- backends -------------------------------------------------------------------------------
@dataclass
class BackendInfo:
    name: str
    device: torch.device
    #: the interpreter runs Triton on the CPU: only each op's first samples (time)
    max_samples: int | None = None

    @property
    def live(self) -> tuple[bool, str]:
        live, why = backends.status(self.name)
        if live and not backends._load(self.name).supports(self.device):
            return False, f"{self.name} does not run on {self.device} here"
        return live, why


def _backend_infos():
    gpu = torch.device("cuda") if torch.cuda.is_available() else None
    out = [BackendInfo("torch", torch.device("cpu")), BackendInfo("cpu", torch.device("cpu"))]
    out.append(BackendInfo("triton", gpu or torch.device("cpu"), None if gpu else 2))
    if gpu is not None:
        out.append(BackendInfo("cuda", gpu))
    return out


BACKEND_INFOS = _backend_infos()


# ---- methods --------------------------------------------------------------------------------
@dataclass
class MethodInfo:
    name: str
    #: per-epoch inputs of ``set_epoch`` for epoch e (``Method.epoch_inputs``)
    epoch_inputs: Callable[[int], dict] = field(default=lambda e: {})

    @property
    def method(self):
        return methods.get(self.name)

    @property
    def fused(self) -> bool:
        """Whether ``fused=True`` runs this method (a gradient-correcting method is refused)."""
        m = self.method
        return m.modulates and not m.corrects_grads


_EPOCH_INPUTS = {"val_acc": lambda e: {"val_acc": {"audio": 0.4 + 0.1 * e, "visual": 0.5}}}


def method_info(name: str) -> MethodInfo:
    needs = methods.get(name).epoch_inputs
    missing = [k for k in needs if k not in _EPOCH_INPUTS]
    assert not missing, f"tests/infos.py: say how to make {missing} for method {name!r}"

    def inputs(e):
        out = {}
        for k in needs:
            out.update(_EPOCH_INPUTS[k](e))
        return out
    return MethodInfo(name, inputs)


def method_infos() -> list[MethodInfo]:
    return [method_info(n) for n in methods.names()]
