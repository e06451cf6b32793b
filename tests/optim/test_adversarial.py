"""A hostile user's inputs, on every live backend: each one is either handled (and gives the
reference's result) or refused with an error naming what is wrong, raised before any parameter
or gradient changes (checked bit for bit), so a retry after fixing the input modulates once."""
import copy
import io
import math
import pickle
import random

import pytest
import torch
from torch import nn

import mmmod
from mmmod import backends, functional
from _models import TwoEncoder, batch, make, train_step

pytestmark = pytest.mark.filterwarnings("ignore:mmmod. no fused backend")

def _live_on_cpu(name):
    try:
        backends.get(name, "cpu")
        return True
    except RuntimeError:
        return False


LIVE = [b for b in ("torch", "cpu", "triton") if _live_on_cpu(b)]


def _dense(t):
    return t.detach().to_dense() if t.layout != torch.strided else t.detach()


def snap(tensors):
    return [None if t is None else _dense(t).clone() for t in tensors]


def same_bits(tensors, saved):
    return all((t is None and s is None) or (t is not None and torch.equal(_dense(t), s))
               for t, s in zip(tensors, saved))


# ---- 1. a failing step writes nothing; a retry scales once -----------------------------------
def issue_setup(backend, bad_w_grad):
    v, w, u = (nn.Parameter(torch.ones(s)) for s in [(5,), (4, 3), (6,)])
    opt = mmmod.ModulatedOptimizer(torch.optim.SGD([v, w, u], lr=0.1), {"a": [v, w], "b": [u]},
                                   method="ogm", alpha=0.8, param_filter="all", backend=backend)
    w.grad_dtype = None  # a hostile user may: let w take a gradient of any dtype
    v.grad, w.grad, u.grad = torch.ones(5), bad_w_grad, torch.ones(6)
    opt.observe({"a": torch.tensor([[5., 0, 0]]), "b": torch.tensor([[0., 0, 0]])},
                torch.tensor([0]))
    return opt, (v, w, u)


def _inference_grad():
    with torch.inference_mode():
        return torch.ones(4, 3)


BAD_W_GRADS = {
    "expanded": (lambda: torch.ones(1, 3).expand(4, 3), "share memory"),
    "expanded-column": (lambda: torch.ones(4, 1).expand(4, 3), "share memory"),
    "as_strided-overlap": (lambda: torch.ones(12).as_strided((4, 3), (1, 1)), "share memory"),
    "aliases-v": (None, "overlap in memory"),  # w.grad a view of v.grad's memory
    "inference": (_inference_grad, "inference tensor"),
    "int": (lambda: torch.ones(4, 3, dtype=torch.int32), "dtype torch.int32"),
    "fp8": (lambda: torch.ones(4, 3).to(torch.float8_e4m3fn), "dtype torch.float8_e4m3fn"),
    "complex": (lambda: torch.ones(4, 3, dtype=torch.complex64), "dtype torch.complex64"),
    "sparse": (lambda: torch.ones(4, 3).to_sparse(), "non-dense gradient"),
}


@pytest.mark.parametrize("backend", LIVE)
@pytest.mark.parametrize("case", list(BAD_W_GRADS))
def test_failing_step_writes_nothing_and_retry_scales_once(backend, case):
    make_bad, match = BAD_W_GRADS[case]
    if case == "aliases-v":
        store = torch.ones(17)
        v0 = store[:5]
        opt, (v, w, u) = issue_setup(backend, store[3:15].view(4, 3))
        v.grad = v0  # v.grad's elements 3, 4 are w.grad's 0, 1
    else:
        opt, (v, w, u) = issue_setup(backend, make_bad())
    params, grads = snap([v, w, u]), snap([v.grad, w.grad, u.grad])
    with pytest.raises((ValueError, TypeError), match=match):
        opt.step()
    assert same_bits([v, w, u], params) and same_bits([v.grad, w.grad, u.grad], grads)
    assert opt.step_count == 0 and opt.skipped_steps == 0 and opt._coeffs is None
    # fix the input, retry: the gradients are scaled exactly once
    v.grad, w.grad = torch.ones(5), torch.ones(4, 3)
    opt.step()
    k = opt._coeffs
    s = torch.softmax(torch.tensor([5., 0, 0]), 0)[0]  # modality a leads: 1 - tanh(0.8 rho)
    torch.testing.assert_close(k[0], 1 - torch.tanh(0.8 * s / (1 / 3)))
    assert torch.equal(v.grad, torch.ones(5) * k[0]) and torch.equal(w.grad, torch.ones(4, 3) * k[0])
    assert torch.equal(u.grad, torch.ones(6))


@pytest.mark.parametrize("backend", LIVE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_non_dense_layouts_are_modulated_like_the_reference(backend, dtype, seed):
    """Transposed, strided and offset views (no self-overlap) are handled on every backend."""
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(9, 7, generator=g).to(dtype), torch.randn(6, 10, generator=g).to(dtype),
            torch.randn(5, 4, 3, generator=g).to(dtype)]
    views = [lambda t: t.t(), lambda t: t[::2, 1::3], lambda t: t.permute(2, 0, 1)[:, 1:]]
    mine = [b.clone() for b in base]
    ref = [b.clone() for b in base]
    k = torch.tensor([0.375, 1.5])
    for target, be in ((mine, backend), (ref, "torch")):
        gs = [f(t) for f, t in zip(views, target)]
        functional.modulate_([gs[:2], gs[2:]], k, noise=True, seed=seed, step=4, backend=be)
    # noise and k are float32 math on every backend, so float64 matches to float32 precision
    tol = {torch.float32: 1e-5, torch.float64: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for a, b, orig, f in zip(mine, ref, base, views):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        untouched = torch.ones_like(orig, dtype=torch.bool)
        f(untouched).fill_(False)
        assert torch.equal(a[untouched], orig[untouched])  # outside the view: not touched


# ---- overlap between tensors (fused kernels would race) ------------------------------------
@pytest.mark.parametrize("backend", LIVE)
def test_overlapping_tensors_are_refused_before_any_write(backend):
    a, b = torch.randn(10), torch.randn(4, 6)
    keep = snap([a, b])
    cases = [
        ([[a, a], [b]], r"tensor 0 of modality 0 and tensor 1 of modality 0 overlap"),
        ([[a], [b, a[3:8]]], r"tensor 0 of modality 0 and tensor 1 of modality 1 overlap"),
        ([[b[:, :4]], [b[1:, 2:]]], "overlap in memory"),
        ([[b.t()], [b[2]]], "overlap in memory"),
        ([[a[:6].view(2, 3)], [a[5:]]], "overlap in memory"),
    ]
    for grads, match in cases:
        with pytest.raises(ValueError, match=match):
            functional.modulate_(grads, torch.tensor([0.5, 0.25]), noise=True, backend=backend)
        assert same_bits([a, b], keep)


@pytest.mark.parametrize("backend", LIVE)
def test_disjoint_blocks_of_one_buffer_are_accepted(backend, seed):
    """Column blocks of one matrix (ParamSlice, MLB's fusion head) share a byte range but no
    element: accepted, and each gets its own modality's coefficient."""
    w = torch.randn(5, 8)
    w0 = w.clone()
    k = torch.tensor([0.5, 2.0])
    functional.modulate_([[w[:, :3]], [w[:, 3:]]], k, noise=False, backend=backend)
    assert torch.equal(w[:, :3], w0[:, :3] * 0.5) and torch.equal(w[:, 3:], w0[:, 3:] * 2)
    flat = torch.randn(30)
    rows = [flat[:12].view(3, 4), flat[12:].view(3, 6)]
    functional.modulate_([rows[:1], rows[1:]], k, noise=False, backend=backend)


@pytest.mark.parametrize("path", ["check_no_overlap", "check_grads-python", "check_grads-fast"])
def test_overlap_check_matches_brute_force(seed, path, monkeypatch):
    """check_no_overlap against the actual element addresses of random strided views of one
    buffer: it never misses an overlap; same-stride blocks it decides exactly. The same through
    check_grads, with its Python checks alone and with the C++ fast path (mmmod._C)."""
    if path == "check_grads-fast" and not functional._fast_checker():
        pytest.skip("mmmod._C (with check_grads) is not built")
    if path == "check_grads-python":
        monkeypatch.setattr(functional, "_fast_check_grads", False)
    rnd = random.Random(seed)
    buf = torch.zeros(256)
    addr = torch.arange(256)
    missed = exact_wrong = 0
    for trial in range(2000):
        def view(like=None):
            if like is not None:
                return buf.as_strided(like.shape, like.stride(), rnd.randint(0, 60))
            nd = rnd.randint(1, 3)
            shape = [rnd.randint(1, 4) for _ in range(nd)]
            stride = [rnd.choice([0, 1, 2, 3, 4, 5, 8, 12, 16]) for _ in range(nd)]
            return buf.as_strided(shape, stride, rnd.randint(0, 60))
        a = view()
        b = view(a if trial % 2 else None)
        cells = [set(addr.as_strided(t.shape, t.stride(), t.storage_offset()).flatten().tolist())
                 for t in (a, b)]
        truth = bool(cells[0] & cells[1])
        try:
            if path == "check_no_overlap":
                functional.check_no_overlap([((0, 0), a), ((1, 0), b)], lambda m, i: f"t{m}")
            else:  # also refuses a self-overlapping a or b: an overlap said, never missed
                functional.check_grads([[a], [b]])
            said = False
        except ValueError:
            said = True
        missed += truth and not said
        contiguous_like = not functional.self_overlaps(a) and a.stride() == tuple(
            int(math.prod(a.shape[d + 1:])) for d in range(a.dim()))
        exact_wrong += trial % 2 == 1 and contiguous_like and said != truth
        a_self = len(addr.as_strided(a.shape, a.stride(), 0).flatten().unique()) < a.numel()
        missed += a_self and not functional.self_overlaps(a)
    assert missed == 0 and exact_wrong == 0


# ---- 2. closures -----------------------------------------------------------------------------
def test_lbfgs_modulates_every_evaluation(seed):
    torch.manual_seed(seed)
    a = TwoEncoder()
    b = copy.deepcopy(a)
    xs, y = batch()
    opt = mmmod.ModulatedOptimizer(torch.optim.LBFGS(a.parameters(), lr=0.5, max_iter=4),
                                   {"audio": a.encoders[0], "visual": a.encoders[1]},
                                   method="ogm", alpha=0.8, backend="torch")
    calls = []

    def closure():
        opt.zero_grad()
        out, feats = a(xs)
        opt.observe(mmmod.fusion.concat_logits(a.head, feats), y)
        loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        calls.append(1)
        return loss

    plain = torch.optim.LBFGS(b.parameters(), lr=0.5, max_iter=4)
    ks = []

    def closure_b():  # the same, modulated by hand with the functional API
        plain.zero_grad()
        out, feats = b(xs)
        s = functional.scores(mmmod.fusion.concat_logits(b.head, feats), y, backend="torch")
        k = functional.coefficients(s, "ogm", alpha=0.8, backend="torch")
        ks.append(k)
        loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        grads = [[p.grad for p in enc.parameters() if p.dim() == 4] for enc in b.encoders]
        functional.modulate_(grads, k, noise=False, backend="torch")
        return loss

    snapshot = snap(list(a.parameters()))
    with pytest.raises(TypeError, match="requires a closure"):
        opt.step()
    assert same_bits(list(a.parameters()), snapshot)
    opt.step(closure)
    plain.step(closure_b)
    assert len(calls) == len(ks) > 1  # several evaluations, each modulated
    assert opt.step_count == 1 and torch.equal(opt._coeffs, ks[-1])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_closure_with_plain_inner_optimizer_is_evaluated_once_then_modulated():
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.1), method="ogm",
                      backend="torch")
    xs, y = batch()
    n = []

    def closure():
        n.append(1)
        opt.zero_grad()
        out, feats = model(xs)
        opt.observe(dict(zip(names, mmmod.fusion.concat_logits(model.head, feats))), y)
        loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        return loss

    assert opt.step(closure) is not None and n == [1] and (opt._coeffs < 1).any()


# ---- 3. checkpoints --------------------------------------------------------------------------
def built(method="ogm_ge", model=None, **kw):
    model = model or TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.1), method=method,
                      backend="torch", **kw)
    return model, opt, names


def trained_checkpoint(**kw):
    model, opt, names = built(**kw)
    train_step(model, opt, names, *batch())
    return model, opt.state_dict()


@pytest.mark.parametrize("saved,loading,match", [
    (dict(method="mlb", apply_to="update", seed=7), dict(method="ogm_ge", alpha=0.8),
     "method='mlb'"),
    (dict(method="ogm", apply_to="update"), dict(method="ogm"), "apply_to='update'"),
    (dict(method="ogm_ge", noise_std="scaled"), dict(method="ogm_ge"), "noise_std='scaled'"),
    (dict(method="ogm", param_filter="all"), dict(method="ogm"), "selects other tensors"),
    (dict(method="mlb", param_filter="conv"), dict(method="mlb"), "selects other tensors"),
])
def test_checkpoint_of_another_setup_is_refused(saved, loading, match):
    model, sd = trained_checkpoint(**saved)
    _, opt, _ = built(model=model, **loading)
    before = (opt.method, opt.alpha, opt.seed, opt.apply_to, copy.deepcopy(opt.optimizer.state_dict()))
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert (opt.method, opt.alpha, opt.seed, opt.apply_to) == before[:4]
    assert repr(opt.optimizer.state_dict()) == repr(before[4])


@pytest.mark.parametrize("key,value,match", [
    ("method", "bogus", "method='bogus'"), ("alpha", float("nan"), "alpha must be finite"),
    ("alpha", -2.0, "alpha must be >= 0"), ("beta_max", -1.0, "beta_max must be >= 1"),
    ("modulation_ends", "10", "modulation_ends must be an int"),
])
def test_corrupt_checkpoint_hyperparameters_are_refused_at_load(key, value, match):
    model, sd = trained_checkpoint(method="ogm_ge")
    sd["mmmod"]["hyper"][key] = value
    _, opt, _ = built(model=model)
    with pytest.raises((ValueError, TypeError), match=match):
        opt.load_state_dict(sd)


def test_corrupt_checkpoint_seed_and_entries():
    model, sd = trained_checkpoint()
    for key, value, match in (("seed", 2 ** 64, "seed must lie"), ("seed", 1.5, "seed must be"),
                              ("step_count", -1, "step_count must be >= 0")):
        bad = copy.deepcopy(sd)
        bad["mmmod"][key] = value
        with pytest.raises((ValueError, TypeError), match=match):
            built(model=model)[1].load_state_dict(bad)
    bad = copy.deepcopy(sd)
    del bad["mmmod"]["selection"]
    with pytest.raises(ValueError, match=r"lacks \['selection'\]"):
        built(model=model)[1].load_state_dict(bad)


def test_scalar_hyperparameters_come_from_the_checkpoint():
    model, sd = trained_checkpoint(method="ogm_ge", alpha=0.8, seed=7, modulation_ends=9)
    _, opt, _ = built(model=model, method="ogm_ge", alpha=0.3, seed=1)
    opt.load_state_dict(sd)
    assert (opt.alpha, opt.seed, opt.modulation_ends, opt.step_count) == (0.8, 7, 9, 1)


def test_state_dict_hooks_run():
    model, opt, names = built()
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append(("sd_pre", o is opt)))

    def post(o, sd):
        seen.append(("sd_post", "mmmod" in sd))
        sd["extra"] = 1
        return sd
    opt.register_state_dict_post_hook(post)

    def load_pre(o, sd):
        seen.append(("load_pre", sd.get("extra")))
        sd = dict(sd)
        sd.pop("extra")
        return sd
    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: seen.append(("load_post", o is opt)))
    train_step(model, opt, names, *batch())
    sd = opt.state_dict()
    assert sd["extra"] == 1
    opt.load_state_dict(sd)
    assert seen == [("sd_pre", True), ("sd_post", True), ("load_pre", 1), ("load_post", True)]


# ---- 4. copies -------------------------------------------------------------------------------
@pytest.mark.parametrize("method,inner", [("ogm_ge", "adam"), ("mlb", "sgd"), ("agm", "sgd")])
def test_deepcopy_of_model_and_optimizer_trains_identically(seed, method, inner):
    torch.manual_seed(seed)
    model = TwoEncoder()
    mk = {"adam": lambda p: torch.optim.Adam(p, lr=1e-2),
          "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)}[inner]
    opt, names = make(model, mk(model.parameters()), method=method, alpha=0.8, backend="torch",
                      seed=seed, apply_to="update" if method == "mlb" else "grad")
    g = torch.Generator().manual_seed(seed)
    data = [batch(g=g) for _ in range(5)]
    for xs, y in data[:2]:
        train_step(model, opt, names, xs, y)
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.optimizer is not opt.optimizer and opt2._method is opt._method
    assert all(opt2._method_state[k] is not v for k, v in opt._method_state.items())
    assert all(p2 is not p for p2, p in zip(model2.parameters(), model.parameters()))
    for xs, y in data[2:]:
        train_step(model, opt, names, xs, y)
        train_step(model2, opt2, names, xs, y)
        assert torch.equal(opt._coeffs, opt2._coeffs)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert opt2.step_count == opt.step_count == 5


def test_pickle_and_torch_save_round_trip():
    model, opt, names = built(method="ogm_ge", seed=3)
    train_step(model, opt, names, *batch())
    again = pickle.loads(pickle.dumps(opt))
    assert again.seed == 3 and again.step_count == 1 and again.names == opt.names
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    # it owns copies of the parameters (as any pickled optimizer): train them once
    params = loaded.optimizer.param_groups[0]["params"]
    for p in params:
        p.grad = torch.ones_like(p)
    loaded.observe({n: torch.randn(3, 5) for n in names}, torch.tensor([0, 1, 2]))
    loaded.step()
    assert loaded.step_count == 2


def test_recorder_attachment_is_not_copied():
    from mmmod import monitor
    model, opt, names = built()
    monitor.attach(opt)
    twin = copy.deepcopy(opt)
    assert opt.recorder is not None and twin.recorder is None


# ---- 5, 6. seeds and hyperparameters -----------------------------------------------------------
@pytest.mark.parametrize("kw,exc,match", [
    ({"seed": 2 ** 64}, ValueError, r"seed must lie in \[-2\*\*63, 2\*\*64\)"),
    ({"seed": -2 ** 63 - 1}, ValueError, "seed must lie"),
    ({"seed": 1.5}, TypeError, "seed must be an int"),
    ({"seed": "3"}, TypeError, "seed must be an int"),
    ({"seed": True}, TypeError, "seed must be an int"),
    ({"alpha": -2.0}, ValueError, "alpha must be >= 0"),
    ({"alpha": float("nan")}, ValueError, "alpha must be finite"),
    ({"alpha": float("inf")}, ValueError, "alpha must be finite"),
    ({"alpha": "abc"}, TypeError, "alpha must be a real number"),
    ({"beta_max": -1.0}, ValueError, "beta_max must be >= 1"),
    ({"beta_max": None}, TypeError, "beta_max must be a real number"),
    ({"modulation_ends": "10"}, TypeError, "modulation_ends must be an int"),
    ({"modulation_starts": -1}, ValueError, "modulation_starts must be >= 0"),
    ({"modulation_starts": 1.0}, TypeError, "modulation_starts must be an int"),
    ({"param_filter": ["conv"]}, TypeError, "param_filter must be one of"),
    ({"method": ["ogm"]}, TypeError, "method must be one of"),
    ({"apply_to": None}, TypeError, "apply_to must be one of"),
    ({"backend": 3}, TypeError, "backend must be one of"),
    ({"noise_std": 1}, TypeError, "noise_std must be one of"),
    ({"strict": "yes"}, TypeError, "strict must be True or False"),
    ({"capturable": 1}, TypeError, "capturable must be True or False"),
])
def test_every_hyperparameter_is_validated_by_name(kw, exc, match):
    model = TwoEncoder()
    with pytest.raises(exc, match=match):
        make(model, torch.optim.SGD(model.parameters(), lr=0.1), **{"backend": "torch", **kw})


def test_seeds_follow_torch_manual_seed_and_never_alias():
    def noise(seed):
        g = torch.zeros(64)
        functional.modulate_([[g], [torch.zeros(3)]], torch.ones(2), noise=True, seed=seed,
                             backend="torch")
        return g
    model = TwoEncoder()
    for s, stored in ((0, 0), (2 ** 64 - 1, 2 ** 64 - 1), (-1, 2 ** 64 - 1), (-2 ** 63, 2 ** 63)):
        opt, _ = make(model, torch.optim.SGD(model.parameters(), lr=0.1), backend="torch", seed=s)
        assert opt.seed == stored
    assert torch.equal(noise(-1), noise(2 ** 64 - 1))  # as torch.manual_seed(-1)
    assert not torch.equal(noise(0), noise(2 ** 63))


def test_nan_alpha_no_longer_skips_silently():
    model = TwoEncoder()
    with pytest.raises(ValueError, match="alpha must be finite"):
        make(model, torch.optim.SGD(model.parameters(), lr=0.1), alpha=float("nan"))


# ---- 7. modality names and backends ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["int", "moduledict", "mixed"])
def test_modality_names_are_used_as_given(kind):
    model = TwoEncoder()
    mods = {"int": {0: model.encoders[0], 1: model.encoders[1]},
            "moduledict": nn.ModuleDict({"audio": model.encoders[0], "visual": model.encoders[1]}),
            "mixed": {0: model.encoders[0], "0": model.encoders[1]}}[kind]
    opt = mmmod.ModulatedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), mods,
                                   method="ogm", backend="torch")
    names = list(mods.keys())
    assert opt.names == names
    xs, y = batch()
    train_step(model, opt, names, xs, y)
    assert list(opt.coefficients) == names and list(opt.scores) == names
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    with pytest.raises(KeyError, match="unknown modality"):
        opt.observe({str(n) if isinstance(n, int) else n + "x": torch.zeros(6, 5)
                     for n in names}, y)


@pytest.mark.parametrize("bad", [{(0, 1): None, "b": None}, {1.5: None, "b": None},
                                 {True: None, "b": None}])
def test_unusable_modality_names_refused_at_construction(bad):
    model = TwoEncoder()
    mods = dict(zip(bad, model.encoders))
    with pytest.raises(TypeError, match="modality names must be str or int"):
        mmmod.ModulatedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), mods)


def test_modalities_must_be_a_mapping():
    model = TwoEncoder()
    with pytest.raises(TypeError, match="modalities must be an ordered mapping"):
        mmmod.ModulatedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                 [model.encoders[0], model.encoders[1]])


def test_unavailable_backend_reported_at_construction(monkeypatch):
    model = TwoEncoder()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend='cuda' cannot modulate the parameters on cpu"):
            make(model, torch.optim.SGD(model.parameters(), lr=0.1), backend="cuda")
    monkeypatch.setattr(backends.registry, "status", lambda name: (False, "pretend it is missing"))
    with pytest.raises(RuntimeError, match="pretend it is missing"):
        make(model, torch.optim.SGD(model.parameters(), lr=0.1), backend="cpu")


def test_step_hooks_registered_on_the_wrapper_run():
    model, opt, names = built()
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", o.step_count)))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", o.step_count)))
    train_step(model, opt, names, *batch())
    assert seen == [("pre", 0), ("post", 1)]


def test_lbfgs_in_update_mode_scales_the_whole_step_by_the_last_coefficients(seed):
    torch.manual_seed(seed)
    a = TwoEncoder()
    b = copy.deepcopy(a)
    xs, y = batch()
    opt = mmmod.ModulatedOptimizer(torch.optim.LBFGS(a.parameters(), lr=0.5, max_iter=3),
                                   {"audio": a.encoders[0], "visual": a.encoders[1]},
                                   method="mlb", alpha=1.0, apply_to="update", backend="torch")
    plain = torch.optim.LBFGS(b.parameters(), lr=0.5, max_iter=3)

    def closure_for(model, zero_grad, observe):
        def closure():
            zero_grad()
            out, feats = model(xs)
            observe(mmmod.fusion.concat_logits(model.head, feats), y)
            loss = nn.functional.cross_entropy(out, y)
            loss.backward()
            return loss
        return closure

    p0 = [p.detach().clone() for p in a.parameters()]
    opt.step(closure_for(a, opt.zero_grad, opt.observe))
    plain.step(closure_for(b, plain.zero_grad, lambda *args: None))
    k = opt._coeffs
    assert not torch.equal(k, torch.ones(2))
    for m, enc in enumerate(a.encoders):
        enc_b = b.encoders[m]
        start = [q for q, p in zip(p0, a.parameters()) if any(p is r for r in enc.parameters())]
        for p, q, s0 in zip(enc.parameters(), enc_b.parameters(), start):
            torch.testing.assert_close(p, s0 + k[m] * (q - s0), rtol=1e-6, atol=1e-7)
    assert torch.equal(a.head.weight, b.head.weight)  # not selected: the plain LBFGS step
