"""The one list of natively fused coefficient rules (mmmod.reference.native_rules.NativeRule):
its codes are the ``coefficients`` op's ``rule`` argument, the compiled kernels mirror them
(csrc/common/native_rules.h), and every other list of native rules derives from the enum."""
import re
from pathlib import Path

import pytest
import torch

from mmmod import _ext, _ops, backends, functional, methods, reference
from mmmod.reference.native_rules import ALIASES, METHODS, MODULATING, NativeRule, rule_of


def _cpu_extension():
    mod, why = _ext.load("cpu")
    if mod is None:
        pytest.skip(why)
    return mod


def test_codes_and_labels():
    assert [(r.label, int(r)) for r in NativeRule] == [("none", 0), ("ogm", 1), ("mlb", 2)]
    assert METHODS == ("none", "ogm", "ogm_ge", "mlb")
    assert MODULATING == {NativeRule.OGM, NativeRule.MLB}
    for name in METHODS:
        assert rule_of(name) is (ALIASES.get(name) or NativeRule[name.upper()])
        assert rule_of(int(rule_of(name))) is rule_of(name)


@pytest.mark.parametrize("bad, err, match", [
    ("agm", ValueError, r"unknown method 'agm'; expected one of \('none', 'ogm', 'ogm_ge', 'mlb'\)"),
    (3, ValueError, r"unknown native rule code 3; expected one of 0 \(none\), 1 \(ogm\), 2 \(mlb\)"),
    (True, TypeError, "method name or a NativeRule code"),
    (None, TypeError, "method name or a NativeRule code"),
])
def test_rule_of_refuses(bad, err, match):
    with pytest.raises(err, match=match):
        rule_of(bad)


def test_the_compiled_kernels_mirror_the_enum():
    """mmmod._C.native_rules() is built from csrc/common/native_rules.h: label -> code."""
    ext = _cpu_extension()
    assert ext.native_rules() == {r.label: int(r) for r in NativeRule}


def test_the_cpu_kernel_refuses_an_unknown_code_as_the_reference_does():
    _cpu_extension()
    s = torch.tensor([3.0, 1.5, 2.0])
    cpu = backends.kernel("coefficients", "cpu", torch.device("cpu"))
    for bad in (len(NativeRule), -1, 2**40):
        with pytest.raises(ValueError, match="unknown native rule code") as native:
            cpu(s, bad, 0.5, 2.0)
        with pytest.raises(ValueError, match="unknown native rule code") as ref:
            reference.ops.coefficients(s, bad, 0.5, 2.0)
        # the same list of codes on both sides
        tail = re.search(r"unknown native rule code .*", str(ref.value)).group(0)
        assert tail in str(native.value), (str(native.value), tail)


@pytest.mark.parametrize("rule", list(NativeRule), ids=lambda r: r.label)
def test_each_code_runs_the_reference_rule_on_the_cpu_kernel(rule):
    _cpu_extension()
    cpu = backends.kernel("coefficients", "cpu", torch.device("cpu"))
    g = torch.Generator().manual_seed(int(rule))
    for m in (2, 3, 5):
        s = torch.rand(m, generator=g) + 0.1
        assert torch.equal(cpu(s, int(rule), 0.7, 3.0), reference.coefficients(s, rule.label, 0.7, 3.0))


def test_every_list_derives_from_the_enum():
    labels = {r.label for r in MODULATING}
    assert backends.get("torch").native_rules == frozenset()
    for name in ("cpu", "triton"):
        live, _ = backends.status(name)
        if live:
            assert backends.get(name).native_rules == labels, name
    natives = {m.native for m in (methods.get(n) for n in methods.names())} - {None}
    assert natives == labels
    # a method may name only a modulating rule ("none" is the kernels' identity, no method's rule)
    bad = type("NoneNative", (methods.Method,), {"name": "none_native", "native": "none"})()
    with pytest.raises(ValueError, match="native must be None or one of"):
        methods.register(bad)
    # the op's schema takes the code
    assert "int rule" in str(torch.ops.mmmod.coefficients.default._schema)
    assert _ops.NativeRule is NativeRule


def test_triton_codes_agree_with_the_enum():
    """The Triton epilogue's METHOD codes (mmmod/backends/triton/scores.py) are NativeRule's,
    and the kernel's branch is OGM's code (MLB, the other modulating rule, is its else)."""
    from mmmod.backends.triton.scores import METHOD_CODE
    assert {name: rule_of(name) for name in METHOD_CODE} == METHOD_CODE
    assert set(METHOD_CODE) == set(METHODS)
    src = (Path(__file__).resolve().parents[2] / "kernels" / "score_kernel.py").read_text()
    assert re.findall(r"METHOD == (\d+)", src) == [str(int(NativeRule.OGM))]
    assert MODULATING == {NativeRule.OGM, NativeRule.MLB}


def test_functional_passes_the_code_to_the_op(monkeypatch):
    """functional.coefficients with a native method reaches the op with the rule's int code."""
    seen = []
    impl = backends.get("torch")
    original = impl._kernel

    def spy(op, device):
        k = original(op, device)
        if op != "coefficients":
            return k
        return lambda scores, rule, *a: (seen.append(rule), k(scores, rule, *a))[1]

    monkeypatch.setattr(type(impl), "native_rules", frozenset({"ogm", "mlb"}))
    monkeypatch.setattr(impl, "_kernel", spy)
    s = torch.tensor([3.0, 1.5])
    functional.coefficients(s, "ogm_ge", backend="torch")
    functional.coefficients(s, "mlb", backend="torch")
    assert seen == [int(NativeRule.OGM), int(NativeRule.MLB)]
    assert all(type(r) is int for r in seen)
