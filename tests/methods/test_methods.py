"""The method registry: every registered method on every live backend, and the public
extension point (a method registered from outside the package, used by name)."""
import math

import pytest
import torch

import mmmod
from mmmod import functional, methods

from _backends import LIVE_BACKENDS, device_for


class Half(methods.Method):
    name = "half_test"
    summary = "halves every selected gradient"

    def coefficients(self, scores, *, alpha, beta_max, state):
        return torch.full_like(scores, 0.5)


class Counting(methods.Method):
    """A stateful rule: k_m = 1 / (1 + number of steps seen), state on the device."""
    name = "counting_test"
    summary = "test: state advanced on the device"
    default_alpha = 0.0

    def init_state(self, num_modalities, device=None):
        return {"steps": torch.zeros((), dtype=torch.float32, device=device)}

    def coefficients(self, scores, *, alpha, beta_max, state):
        state["steps"].add_(1)
        return self.nan_if_any_nan(scores, (1.0 / (1.0 + state["steps"])).expand_as(scores).float())


@pytest.fixture
def registered():
    added = []

    def add(m):
        methods.register(m)
        added.append(m.name)
        return m
    yield add
    for n in added:
        methods.unregister(n)


def test_builtins_are_registered_in_order():
    assert methods.names()[:4] == ("ogm", "ogm_ge", "mlb", "none")
    assert methods.get("ogm_ge").noise and not methods.get("ogm").noise
    assert methods.get("mlb").shard_safe
    assert methods.get("mlb").default_alpha == 0.5 and methods.get("ogm").default_filter == "conv"


def test_unknown_method_names_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown method 'bogus'.*ogm_ge"):
        methods.get("bogus")
    with pytest.raises(ValueError, match="unknown method 'bogus'"):
        functional.coefficients(torch.ones(2), "bogus")


def test_reregistering_a_taken_name_is_an_error(registered):
    registered(Half())
    with pytest.raises(ValueError, match="already registered"):
        methods.register(Half())
    with pytest.raises(ValueError, match="already registered"):
        methods.register(type("Shadow", (methods.Method,), {"name": "ogm"})())


@pytest.mark.parametrize("bad, err", [
    (lambda: methods.register(Half), "Method instance"),
    (lambda: methods.register(object()), "mmmod.methods.Method"),
    (lambda: methods.register(type("Nameless", (methods.Method,), {})()), "identifier"),
    (lambda: methods.register(type("BadFilter", (methods.Method,),
                                   {"name": "badf", "default_filter": "convs"})()), "default_filter"),
    (lambda: methods.register(type("BadNative", (methods.Method,),
                                   {"name": "badn", "native": "agm"})()), "native"),
])
def test_register_refuses_malformed_methods(bad, err):
    with pytest.raises((TypeError, ValueError), match=err):
        bad()


@pytest.mark.parametrize("alpha, beta_max, err", [
    (-2.0, 2.0, "alpha must be >= 0"), (float("nan"), 2.0, "alpha must be finite"),
    ("abc", 2.0, "alpha must be a real number"), (True, 2.0, "alpha must be a real number"),
    (0.5, -1.0, "beta_max must be >= 1"), (0.5, float("inf"), "beta_max must be finite"),
])
def test_hyperparameters_are_validated_by_name(alpha, beta_max, err):
    with pytest.raises((TypeError, ValueError), match=err):
        functional.coefficients(torch.tensor([1.0, 2.0]), "mlb", alpha=alpha, beta_max=beta_max)


@pytest.mark.parametrize("backend", LIVE_BACKENDS)
@pytest.mark.parametrize("name", [n for n in ("ogm", "ogm_ge", "mlb", "none")])
@pytest.mark.parametrize("M", [2, 3, 4])
def test_every_builtin_matches_its_torch_rule_on_every_backend(backend, name, M):
    g = torch.Generator().manual_seed(M)
    s = (torch.rand(M, generator=g) * 8 + 0.5).to(device_for(backend))
    m = methods.get(name)
    ref = m.coefficients(s, alpha=0.7, beta_max=2.5, state=m.init_state(M))
    got = functional.coefficients(s, name, alpha=0.7, beta_max=2.5, backend=backend)
    # native fused rules use a libdevice-free tanh: a few float32 ulp (docs/triton.md)
    torch.testing.assert_close(got, ref, rtol=4e-7, atol=4e-7)
    nan = functional.coefficients(torch.tensor([1.0] + [float("nan")] * (M - 1),
                                               device=device_for(backend)), name,
                                  backend=backend)
    assert torch.isnan(nan).all() or name == "none"


@pytest.mark.parametrize("backend", LIVE_BACKENDS)
def test_a_user_method_runs_on_every_backend(backend, registered):
    registered(Half())
    s = torch.tensor([3.0, 1.0, 2.0], device=device_for(backend))
    k = functional.coefficients(s, "half_test", backend=backend)
    assert torch.equal(k.cpu(), torch.full((3,), 0.5))


def test_stateful_method_keeps_its_state_on_the_device(registered):
    m = registered(Counting())
    st = m.init_state(2)
    ks = [functional.coefficients(torch.tensor([1.0, 2.0]), "counting_test", state=st)
          for _ in range(3)]
    assert torch.equal(torch.stack([k[0] for k in ks]),
                       1.0 / (1.0 + torch.tensor([1.0, 2.0, 3.0])))
    assert float(st["steps"]) == 3
    # without a state the functional call is stateless
    k = functional.coefficients(torch.tensor([1.0, 2.0]), "counting_test")
    assert math.isclose(float(k[0]), 0.5)


def test_table_lists_every_method():
    rows = {r["name"]: r for r in methods.table()}
    assert set(methods.names()) == set(rows)
    assert rows["ogm_ge"]["noise"] and rows["mlb"]["hyperparameters"] == ("alpha", "beta_max")


def _semantics_table():
    import pathlib
    text = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "semantics.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0].startswith("`") and cells[0].endswith("`"):
            rows[cells[0].strip("`")] = cells
    return rows


def test_docs_method_table_matches_the_registry():
    """docs/semantics.md section 7 lists every built-in method with its registered defaults."""
    rows = _semantics_table()
    builtin = [m for m in methods.names()
               if type(methods.get(m)).__module__.startswith("mmmod.methods.")]
    assert set(builtin) <= set(rows), f"methods missing from docs/semantics.md: {set(builtin) - set(rows)}"
    for name in builtin:
        m = methods.get(name)
        _, alpha, filt, noise, shard, native, _ = rows[name]
        if m.modulates:
            assert float(alpha) == m.default_alpha, name
        assert filt == m.default_filter, name
        assert (noise == "yes") == m.noise, name
        assert shard.startswith("yes") == m.shard_safe, name
        assert native == (m.native or "-"), name


@pytest.mark.parametrize("backend", LIVE_BACKENDS)
def test_readme_extension_example_halves_the_selected_gradients(backend):
    """README "Adding a method", verbatim apart from the name, on every live backend."""
    class Half(methods.Method):
        name = "half_readme"

        def coefficients(self, scores, *, alpha, beta_max, state):
            return torch.full_like(scores, 0.5)
    methods.register(Half())
    try:
        dev = device_for(backend)
        torch.manual_seed(0)
        enc = [torch.nn.Conv2d(2, 3, 3).to(dev), torch.nn.Linear(5, 4).to(dev)]
        head = torch.nn.Linear(4, 3).to(dev)
        params = [p for m in enc + [head] for p in m.parameters()]
        inner = torch.optim.SGD(params, lr=0.1)
        opt = mmmod.ModulatedOptimizer(inner, {"audio": enc[0], "visual": enc[1]}, method="half_readme",
                                       backend=backend)
        for p in params:
            p.grad = torch.randn_like(p)
        before = {id(p): p.grad.clone() for p in params}
        wbefore = {id(p): p.detach().clone() for p in params}
        opt.observe({"audio": torch.randn(6, 3, device=dev), "visual": torch.randn(6, 3, device=dev)},
                    torch.randint(0, 3, (6,), device=dev))
        opt.step()
        selected = {id(p) for m in enc for p in m.parameters()}
        for p in params:
            want = before[id(p)] * 0.5 if id(p) in selected else before[id(p)]
            assert torch.equal(p.grad, want)
            # the SGD step took the halved gradient (torch's add_ may fuse the multiply-add)
            torch.testing.assert_close(p.detach(), wbefore[id(p)] - 0.1 * want, rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="already registered"):
            methods.register(Half())
    finally:
        methods.unregister("half_readme")
