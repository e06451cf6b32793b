"""What a checkpoint brings is validated before anything changes: a corrupt skipped count, other
scores/coefficients, another inner optimizer type, an older checkpoint's missing hyperparameter,
a method state with NaN/inf or a negative running value -- each refused by name, the optimizer
(inner state and param groups included) left as it was."""
import copy

import pytest
import torch
from mmmod import backends
from _models import TwoEncoder, batch, make, train_step

pytestmark = pytest.mark.filterwarnings("ignore:mmmod. no fused backend")

LIVE = [b for b in ("torch", "cpu") if backends.status(b)[0]]


def _trained(method="ogm_ge", inner=torch.optim.SGD, backend="torch", steps=2, **kw):
    torch.manual_seed(0)
    model = TwoEncoder()
    opt, names = make(model, inner(model.parameters(), lr=1e-2), method=method, backend=backend,
                      **kw)
    g = torch.Generator().manual_seed(1)
    for t in range(steps):
        if method == "mslr":
            opt.set_epoch(t, val_acc=[0.5 + 0.1 * t, 0.4])
        train_step(model, opt, names, *batch(g=g))
    return model, opt, names


def _refused(opt, sd, match):
    before = copy.deepcopy(opt.state_dict())
    groups = _groups(opt)
    with pytest.raises((ValueError, TypeError), match=match):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert repr(after) == repr(before) and _groups(opt) == groups


def _groups(opt):
    return [({k: v for k, v in g.items() if k != "params"}, [id(p) for p in g["params"]])
            for g in opt.optimizer.param_groups]


@pytest.mark.parametrize("backend", LIVE)
@pytest.mark.parametrize("bad", ["3", 3.0, torch.tensor([1, 2]), torch.tensor(1.5),
                                 torch.tensor(-1), torch.tensor(True)])
def test_corrupt_skipped_steps_is_refused(backend, bad):
    _, opt, _ = _trained(backend=backend)
    sd = opt.state_dict()
    sd["mmmod"]["skipped_steps"] = bad
    _refused(opt, sd, "skipped_steps")


@pytest.mark.parametrize("key", ["scores", "coefficients"])
@pytest.mark.parametrize("bad", [torch.zeros(3), "x", torch.zeros(2, dtype=torch.int64)])
def test_corrupt_last_scores_and_coefficients_are_refused(key, bad):
    _, opt, _ = _trained()
    sd = opt.state_dict()
    sd["mmmod"][key] = bad
    _refused(opt, sd, key)


@pytest.mark.parametrize("backend", LIVE)
@pytest.mark.parametrize("saved,loaded", [(torch.optim.SGD, torch.optim.Adam),
                                          (torch.optim.Adam, torch.optim.SGD),
                                          (torch.optim.Adam, torch.optim.AdamW)])
def test_another_inner_optimizer_type_is_refused_by_name(backend, saved, loaded):
    _, src, _ = _trained(inner=saved, backend=backend)
    _, dst, _ = _trained(inner=loaded, backend=backend, steps=1)
    _refused(dst, src.state_dict(), f"inner optimizer torch.optim.*{saved.__name__}.*"
                                    f"{loaded.__name__}")


def test_the_same_inner_type_still_loads_and_resumes_bitwise():
    model, opt, names = _trained(inner=torch.optim.Adam)
    model2, opt2 = copy.deepcopy((model, opt))
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # (torch's load shares tensors)
    assert opt2.state_dict()["mmmod"]["inner"] == "torch.optim.adam.Adam"
    g = torch.Generator().manual_seed(5)
    xs, y = batch(g=g)
    train_step(model, opt, names, xs, y)
    train_step(model2, opt2, names, xs, y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


def test_an_older_checkpoint_without_the_inner_record_still_loads():
    _, opt, _ = _trained()
    sd = opt.state_dict()
    del sd["mmmod"]["inner"]
    opt.load_state_dict(sd)


@pytest.mark.parametrize("key", ["alpha", "beta_max", "modulation_starts", "modulation_ends",
                                 "method", "noise_std"])
def test_a_missing_hyperparameter_is_named(key):
    _, opt, _ = _trained()
    sd = opt.state_dict()
    del sd["mmmod"]["hyper"][key]
    _refused(opt, sd, rf"lacks \['{key}'\]")


@pytest.mark.parametrize("method,key,value", [
    ("agm", "score_mean", float("nan")), ("agm", "score_mean", -1.0), ("agm", "steps", float("inf")),
    ("mslr", "ratio", float("nan")), ("mslr", "ratio", -0.5), ("inforeg", "fisher", -1.0),
    ("inforeg", "beta", float("nan"))])
def test_nan_or_negative_method_state_is_refused_by_name(method, key, value):
    _, opt, _ = _trained(method=method)
    sd = opt.state_dict()
    st = sd["mmmod"]["method_state"][key]
    st.view(-1)[0] = value
    _refused(opt, sd, f"'{key}'.*{'NaN or inf' if value != value or abs(value) == float('inf') else 'negative'}")


def test_corrupt_skipped_no_longer_breaks_the_next_step():
    """The probe's case: before, "3" loaded and the next step raised after the update."""
    model, opt, names = _trained()
    sd = opt.state_dict()
    sd["mmmod"]["skipped_steps"] = "3"
    with pytest.raises(ValueError):
        opt.load_state_dict(sd)
    train_step(model, opt, names, *batch())
    assert opt.skipped_steps == 0 and opt.step_count == 3
