"""Generic tests over the op database (tests/infos.py), for every op on every live backend:
the backend's kernel (as ``mmmod.backends.kernel`` resolves it) against the reference,
``torch.library.opcheck`` of that kernel under the op's schema and fake, and nothing written
when an input is refused."""
import pytest
import torch
from torch.library import opcheck

from mmmod import _ops, backends
from mmmod.reference.ops import REFERENCES

from infos import BACKEND_INFOS, OP_INFOS, TOLERANCES


def _backend_params(unit=True):
    out = []
    for b in BACKEND_INFOS:
        live, why = b.live
        marks = [pytest.mark.skipif(not live, reason=why)]
        if unit and b.name in ("torch", "cpu"):
            marks.append(pytest.mark.unit)
        if b.device.type == "cuda":
            marks.append(pytest.mark.gpu)
        out.append(pytest.param(b, id=b.name, marks=marks))
    return out


BACKENDS = _backend_params()
BACKENDS_FULL_LANE = _backend_params(unit=False)  # opcheck runs each op several times
OPS = [pytest.param(o, id=o.name) for o in OP_INFOS]


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


def _samples(op, b):
    samples = op.samples(b.device)
    return samples if b.max_samples is None else samples[:b.max_samples]


def _close(got, want, dtype, what):
    rtol, atol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    for x, y in zip(_tensors(got), _tensors(want)):
        torch.testing.assert_close(x.cpu(), y.cpu(), rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("b", BACKENDS)
def test_kernel_matches_the_reference(b, op):
    run = backends.kernel(op.name, b.name, b.device)
    for s in _samples(op, b):
        args_k, args_r = _clone(s.args), _clone(s.args)
        out_k = run(*args_k)
        out_r = op.reference(*args_r)
        what = f"{b.name} {op.name} [{s.desc}]"
        if out_r is not None:
            _close(out_k, out_r, s.dtype, what + " output")
        for i in op.mutated:
            _close(args_k[i], args_r[i], s.dtype, f"{what} argument {i}")


_mirrors: dict = {}
_lib = torch.library.Library("mmmod_opcheck", "FRAGMENT")


def _as_op(b, op_name, fn):
    """A Python kernel as an op of its own with the mmmod op's schema and fake, so opcheck
    checks it (the dispatcher route of the op itself is opchecked where it is the kernel)."""
    if isinstance(fn, torch._ops.OpOverload):
        return fn
    key = (b.name, op_name)
    if key not in _mirrors:
        d = _ops.OPS[op_name]
        name = f"{b.name}_{op_name}"
        _lib.define(name + d.schema[len(op_name):])
        _lib.impl(name, fn, "CompositeExplicitAutograd")
        torch.library.register_fake(f"mmmod_opcheck::{name}", d.fake, lib=_lib)
        base, _, ov = name.partition(".")
        _mirrors[key] = getattr(getattr(torch.ops.mmmod_opcheck, base), ov or "default")
    return _mirrors[key]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("b", BACKENDS_FULL_LANE)
def test_opcheck(b, op):
    target = _as_op(b, op.name, backends.kernel(op.name, b.name, b.device))
    for s in _samples(op, b)[:3]:
        opcheck(target, _clone(s.args))


@pytest.mark.parametrize("op", [o for o in OPS if o.values[0].errors(torch.device("cpu"))])
@pytest.mark.parametrize("b", BACKENDS)
def test_nothing_written_on_error(b, op):
    run = backends.kernel(op.name, b.name, b.device)
    for e in op.errors(b.device):
        before = [t.clone() for t in _tensors(e.args)]
        with pytest.raises(e.error, match=e.match):
            run(*e.args)
        for x, y in zip(_tensors(e.args), before):
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


@pytest.mark.unit
def test_every_op_has_an_info_and_every_backend_a_route():
    assert {o.name for o in OP_INFOS} == set(REFERENCES)
    assert set(_ops.OPS) == set(REFERENCES) | {"bucket_table"}
