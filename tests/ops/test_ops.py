"""The one dispatch path: the mmmod ops are defined by mmmod/ops.py at import (schemas, fakes,
the reference as the default implementation) whether or not the extension is built; device
kernels register over them (the CPU/CUDA extensions in C++, the Triton kernels from Python);
backend resolution is cached; a stale binary is refused before it is loaded."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmmod
from mmmod import _ext, backends, reference
from mmmod import _ops as ops

ROOT = Path(__file__).resolve().parents[2]


def run(code, **env):
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_every_op_is_defined_with_its_schema():
    for name, schema in ops.SCHEMAS.items():
        op_name, _, overload = name.partition(".")
        op = getattr(getattr(torch.ops.mmmod, op_name), overload or "default")
        assert str(op._schema) == "mmmod::" + schema, (str(op._schema), schema)


def test_test_only_ops_are_private():
    public = [n for n in ops.SCHEMAS if not n.startswith("_")]
    assert sorted(public) == ["bucket_table", "coefficients", "combine_", "fused_adam_", "fused_sgd_",
                              "modulate_", "modulate_.capturable", "modulate_sigma_", "proximal_",
                              "scores"]


def test_ops_without_the_extension_run_the_reference():
    """MMMOD_DISABLE_EXTENSION=1: the ops still exist, their default is the reference (same
    bits), the fakes trace, and opcheck passes for the reference implementations."""
    run("""
import torch, mmmod
from torch.library import opcheck
from mmmod import backends, reference
assert not backends.status('cpu')[0]
ops = torch.ops.mmmod
g = torch.Generator().manual_seed(0)
zs = [torch.randn(7, 4, generator=g), torch.randn(7, 6, generator=g)]
y = torch.randint(0, 4, (7,), generator=g)
assert torch.equal(ops.scores(zs, y), reference.scores(zs, y))
s = torch.tensor([3.0, 1.5, 2.0])
from mmmod.reference.native_rules import NativeRule
for rule in map(int, NativeRule):
    assert torch.equal(ops.coefficients(s, rule, 0.5, 2.0), reference.coefficients(s, rule, 0.5, 2.0))
ts = [torch.randn(5, generator=g), torch.randn(3, 4, generator=g)]
a, b = [t.clone() for t in ts], [t.clone() for t in ts]
k, gate = torch.tensor(0.7), torch.tensor(1.0)
ops.modulate_(a, [0, 5], k, gate, True, True, -5, 3, 1)
reference.modulate_bucket_(b, [0, 5], k, gate, noise=True, noise_std='scaled', seed=-5, step=3, modality=1)
assert all(torch.equal(x, z) for x, z in zip(a, b))
c = [t.clone() for t in ts]
ops.modulate_.capturable(c, [0, 5], k, gate, True, True, -5, 0, 1, None, torch.tensor(3))
assert all(torch.equal(x, z) for x, z in zip(c, b))
out = torch.empty(9)
ops._philox_normal_(out, 11, 2, 1, 6)
assert torch.equal(out, reference.philox_normal(11, 2, 1, 6, 9))
std = ops._bucket_std([torch.ones(1), ts[1]])
assert std.dtype == torch.float64 and std[0] == 0 and std[1] == reference.tensor_std(ts[1])
opcheck(ops.scores.default, (zs, y))
opcheck(ops.coefficients.default, (s, int(NativeRule.MLB), 0.5, 10.0))
opcheck(ops.modulate_.default, ([t.clone() for t in ts], [0, 5], k, gate, True, False, 7, 3, 1))
opcheck(ops._bucket_std.default, (ts,))
opcheck(ops._philox_normal_.default, (torch.empty(11), 7, 2, 0, 3))
# the fakes: shapes and dtypes on meta tensors
with torch.device('meta'):
    sm = ops.scores([torch.empty(3, 2)] * 4, torch.empty(3, dtype=torch.long))
    table = ops.bucket_table([torch.empty(70000), torch.empty(3)], [0, 70000])
assert sm.shape == (4,) and sm.dtype == torch.float32
assert table.shape == (2 + 5 * 2 + 2 * 3,) and table.dtype == torch.int64
print('ok')
""", MMMOD_DISABLE_EXTENSION="1")


def test_triton_kernels_registered_as_op_implementation_trace_in_one_graph():
    """The Triton kernels as a device implementation of the ops (on a GPU without the CUDA
    extension: CUDA; here, for the test, the CPU interpreter with the CPU extension disabled):
    functional calls with backend='triton' then go through torch.ops.mmmod, give the bits of
    the direct kernel launches, and compile fullgraph."""
    pytest.importorskip("triton")
    run("""
import torch, mmmod
from mmmod import backends, functional
tb = backends.get('triton', 'cpu')
g = torch.Generator().manual_seed(1)
zs = [torch.randn(6, 5, generator=g), torch.randn(6, 7, generator=g).t().contiguous().t()]
y = torch.randint(0, 5, (6,), generator=g)
grads = [torch.randn(40, generator=g), torch.randn(3, 5, generator=g), torch.randn(9, generator=g)]

def step(z0, z1, y, g0, g1, g2):
    s = functional.scores([z0, z1], y, backend='triton')
    k = functional.coefficients(s, 'ogm_ge', alpha=0.8, backend='triton')
    functional.modulate_([[g0, g1], [g2]], k, noise=True, seed=3, step=5, backend='triton')
    return s, k

direct = [a.clone() for a in (*zs, y, *grads)]
want = step(*direct)  # kernels launched directly (nothing registered yet)
assert not tb.op_device_types
tb.register_op_kernels('cpu')
via_op = [a.clone() for a in (*zs, y, *grads)]
got = step(*via_op)
assert all(torch.equal(a, b) for a, b in zip(got + tuple(via_op), want + tuple(direct)))
ex = torch._dynamo.explain(step)(*[a.clone() for a in (*zs, y, *grads)])
assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons
compiled = [a.clone() for a in (*zs, y, *grads)]
got = torch.compile(step, backend='eager', fullgraph=True)(*compiled)
assert all(torch.equal(a, b) for a, b in zip(got + tuple(compiled), want + tuple(direct)))
# a device step counter goes through modulate_.capturable
a = [t.clone() for t in grads[:2]]
b = [t.clone() for t in grads[:2]]
k = torch.tensor([0.5, 1.0])
functional.modulate_([a], k[:1], noise=True, seed=3, step=torch.tensor(9), backend='triton')
functional.modulate_([b], k[:1], noise=True, seed=3, step=9, backend='triton')
assert all(torch.equal(x, z) for x, z in zip(a, b))
print('ok')
""", MMMOD_DISABLE_EXTENSION="1", TRITON_INTERPRET="1")


def test_register_kernels_refuses_an_unknown_op():
    with pytest.raises(ValueError, match="no op 'bogus'"):
        ops.register_kernels("CPU", {"bogus": lambda: None})


def test_backend_resolution_is_cached_and_follows_its_inputs(monkeypatch):
    impl = backends.get("torch", "cpu")
    assert backends.get("torch", torch.device("cpu")) is impl
    n = len(backends._resolved)
    for _ in range(3):
        backends.get("torch", "cpu")
    assert len(backends._resolved) == n
    # TRITON_INTERPRET decides whether triton runs on CPU: part of the key
    if backends.status("triton")[0]:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="cannot run on device cpu"):
            backends.get("triton", "cpu")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert backends.get("triton", "cpu").name == "triton"

    # replacing a backend instance drops the cached answers
    class Other(type(impl)):
        name = "torch"

    monkeypatch.setitem(backends._instances, "torch", Other())
    assert isinstance(backends.get("torch", "cpu"), Other)
    monkeypatch.undo()
    assert backends.get("torch", "cpu") is impl
    with pytest.raises(ValueError, match="unknown backend"):
        backends.get("bogus", "cpu")


def test_stale_record_refuses_a_binary_before_loading_it(monkeypatch):
    """A binary from other sources may register kernels over schemas that changed, and that
    error cannot be caught while it loads: the record beside it is checked first."""
    monkeypatch.setattr(_ext, "build_record", lambda: {"torch": "0.0.0", "backends": ["cpu"]})
    mod, why = _ext._import("mmmod._C_not_there")  # a load attempt would say "not built"
    assert mod is None and "stale build" in why


def test_cpu_build_info_reports_the_kernel_chunk():
    mod, why = _ext.load("cpu")
    if mod is None:
        pytest.skip(why)
    chunk = mod.build_info()["chunk"]
    assert chunk > 0 and chunk & (chunk - 1) == 0
    # the chunk really is the unit of the fixed work split: a tensor one element longer than a
    # chunk is modulated exactly as the reference does it on both sides of the boundary
    g = torch.randn(chunk + 1)
    a, b = [g.clone()], [g.clone()]
    k, gate = torch.tensor(0.3), torch.tensor(1.0)
    torch.ops.mmmod.modulate_(a, [0], k, gate, False, False, 0, 0, 0)
    reference.modulate_bucket_(b, [0], k, gate, noise=False, noise_std="raw", seed=0, step=0,
                               modality=0)
    assert torch.equal(a[0], b[0])


def test_version_is_defined_once():
    src = (ROOT / "setup.py").read_text()
    assert 'version="' not in src and "_version()" in src
    assert mmmod.__version__
