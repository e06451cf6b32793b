"""The step plan (mmmod/optim/plan.py), the methods' traits (mmmod/methods/traits.py) and the run
state's checkpoint accessors (mmmod/optim/state.py)."""
import copy
import dataclasses

import pytest
import torch

import mmmod
from mmmod import methods
from mmmod.methods import Method, MethodTraits
from mmmod.optim import plan as step_plan
from mmmod.optim.state import RunState

from _models import TwoEncoder, batch, make, train_step

pytestmark = pytest.mark.unit


def _trained(method="ogm_ge", steps=2, **kw):
    torch.manual_seed(0)
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                      method=method, backend="torch", **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        train_step(model, opt, names, *batch(g=g))
    return model, opt, names


def _stage_names(opt):
    return [stage.__name__ for stage in opt._plan.evaluation]


@pytest.mark.parametrize("method,fused,expected", [
    ("ogm", False, ["coefficients", "modulate"]),
    ("ogm_ge", False, ["coefficients", "modulate"]),
    ("agm", False, ["coefficients", "modulate"]),
    # InfoReg scales nothing and adds no noise: no pass over the gradients, unless the fused
    # update takes the (unit) coefficients
    ("inforeg", False, ["coefficients", "correct_grads"]),
    ("inforeg", True, ["coefficients", "correct_grads", "modulate"]),
    ("mmpareto", False, ["combine_objectives", "coefficients"]),
    ("none", False, []),
])
def test_the_plan_holds_the_stages_the_method_needs(method, fused, expected):
    model = TwoEncoder()
    opt, _ = make(model, torch.optim.SGD(model.parameters(), lr=0.1), method=method,
                  backend="torch", fused=fused)
    assert _stage_names(opt) == expected


def test_noise_only_coefficients_keep_the_skip_signal():
    k = torch.tensor([0.25, 1.7, float("nan"), float("inf"), -float("inf"), 0.0])
    out = step_plan.noise_only_coefficients(k)
    assert out.dtype == k.dtype
    assert torch.equal(out[:2], torch.ones(2)) and out[5] == 1
    assert torch.isnan(out[2:5]).all()
    # what the modulation reads: all finite exactly when k is
    assert bool(torch.isfinite(out).all()) is False
    assert bool(torch.isfinite(step_plan.noise_only_coefficients(k[:2])).all())


def test_traits_are_frozen_and_read_from_an_outside_method():
    class Halve(Method):
        name = "halve_traits_test"
        noise, corrects_grads, score_reduction = True, True, "mean"
        epoch_inputs = ["val_acc"]

        def coefficients(self, scores, *, alpha, beta_max, state):
            return torch.full_like(scores, 0.5)

    t = Halve().traits()
    assert isinstance(t, MethodTraits)
    assert (t.noise, t.corrects_grads, t.mean_scores, t.scales, t.epoch_inputs) == (
        True, True, True, True, ("val_acc",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.noise = False
    assert methods.get("inforeg").traits().whole_tensor_stats


def test_run_state_round_trips_the_checkpoint_position():
    _, opt, _ = _trained("agm")
    saved = opt.run_state.to_dict()
    assert saved["step_count"] == 2 and set(saved["method_state"]) == set(opt._method_state)
    fresh = RunState()
    fresh.method_state = {k: torch.zeros_like(v) for k, v in opt._method_state.items()}
    fresh.load_dict(saved)
    assert fresh.step_count == 2 and fresh.epoch_hooked == saved["epoch"]
    for k, v in opt._method_state.items():
        assert torch.equal(fresh.method_state[k], v)
    assert torch.equal(fresh.coeffs, opt._coeffs) and torch.equal(fresh.skipped, opt._skipped)
    # the saved values are copies: training on does not change them
    before = saved["coefficients"].clone()
    opt._coeffs.add_(1)
    assert torch.equal(saved["coefficients"], before)


def test_state_dict_entry_is_the_run_state():
    _, opt, _ = _trained("ogm_ge", capturable=False)
    own = opt.state_dict()["mmmod"]
    run = opt.run_state.to_dict()
    for key in ("step_count", "seed", "epoch", "skipped_steps", "scores", "coefficients"):
        a, b = own[key], run[key]
        assert (a == b) if not isinstance(a, torch.Tensor) else torch.equal(a, b), key
    assert own["hyper"]["alpha"] == run["alpha"] == opt.alpha


def test_unpickles_an_instance_state_whose_method_state_was_an_attribute():
    """Pickles made while the method state and the device counter were instance attributes
    (beside the run holder) load them into the holder."""
    _, opt, _ = _trained("agm")
    state = copy.deepcopy(opt.__getstate__())
    run = state["_run"]
    state["_method_state"] = run.__dict__.pop("method_state")
    state["_step_t"] = run.__dict__.pop("step_t")
    run.fused_pending = None  # a field the holder had then
    state["_offsets"] = [[0]]
    old = type(opt).__new__(type(opt))
    old.__setstate__(state)
    assert "_method_state" not in vars(old) and not hasattr(old.run_state, "fused_pending")
    for k, v in opt._method_state.items():
        assert torch.equal(old._method_state[k], v)
    assert old.run_state.method_state is old._method_state and old.device_step is None


def test_the_plan_is_rebuilt_not_copied():
    model, opt, names = _trained("ogm_ge")
    twin_model, twin = copy.deepcopy((model, opt))
    assert twin._plan is not opt._plan and twin._plan.objectives is twin._objectives
    assert "_plan" not in opt.__getstate__()
    xs, y = batch(g=torch.Generator().manual_seed(5))
    train_step(model, opt, names, xs, y)
    train_step(twin_model, twin, names, xs, y)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


def test_the_module_level_import_path():
    assert mmmod.ModulatedOptimizer is mmmod.optim.ModulatedOptimizer
    with pytest.raises(ImportError):
        __import__("mmmod.optimizer")
