"""Pickle and deep-copy a ModulatedOptimizer with each torch LR scheduler attached: a scheduler
sets ``opt.step`` as an instance attribute holding a weak reference to the optimizer, which a
copy must not carry (it would step the original)."""
import copy
import pickle

import pytest
import torch
from torch.optim import lr_scheduler as lrs
from torch.optim import swa_utils

from _models import TwoEncoder, batch, make, train_step



def _decay(epoch):  # module level: a pickled LambdaLR needs a picklable function
    return 0.9 ** epoch


def _factor(epoch):
    return 0.9


SCHEDULERS = {
    "LambdaLR": lambda o: lrs.LambdaLR(o, _decay),
    "MultiplicativeLR": lambda o: lrs.MultiplicativeLR(o, _factor),
    "StepLR": lambda o: lrs.StepLR(o, 2),
    "MultiStepLR": lambda o: lrs.MultiStepLR(o, [1, 3]),
    "ConstantLR": lambda o: lrs.ConstantLR(o),
    "LinearLR": lambda o: lrs.LinearLR(o),
    "ExponentialLR": lambda o: lrs.ExponentialLR(o, 0.9),
    "SequentialLR": lambda o: lrs.SequentialLR(
        o, [lrs.ConstantLR(o), lrs.ExponentialLR(o, 0.9)], milestones=[2]),
    "PolynomialLR": lambda o: lrs.PolynomialLR(o, 4),
    "CosineAnnealingLR": lambda o: lrs.CosineAnnealingLR(o, 4),
    "ChainedScheduler": lambda o: lrs.ChainedScheduler([lrs.ConstantLR(o), lrs.ExponentialLR(o, 0.9)]),
    "ReduceLROnPlateau": lambda o: lrs.ReduceLROnPlateau(o),
    "CyclicLR": lambda o: lrs.CyclicLR(o, 0.01, 0.1, step_size_up=2),
    "CosineAnnealingWarmRestarts": lambda o: lrs.CosineAnnealingWarmRestarts(o, 2),
    "OneCycleLR": lambda o: lrs.OneCycleLR(o, 0.1, total_steps=10),
    "SWALR": lambda o: swa_utils.SWALR(o, 0.05),
}


def test_every_scheduler_class_is_covered():
    classes = {n for n, c in vars(lrs).items() if isinstance(c, type) and issubclass(c, lrs.LRScheduler)
               and c.__module__ == lrs.__name__ and not n.startswith("_") and n != "LRScheduler"}
    assert classes <= set(SCHEDULERS)


def _trained(name):
    torch.manual_seed(0)
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                      backend="torch", alpha=0.8, seed=1)
    sched = SCHEDULERS[name](opt)
    assert "step" in vars(opt) or name == "ReduceLROnPlateau" or hasattr(opt.step, "_wrapped_by_lr_sched")
    g = torch.Generator().manual_seed(1)
    data = [batch(g=g) for _ in range(4)]
    for xs, y in data[:2]:
        train_step(model, opt, names, xs, y)
        sched.step(0.0) if name == "ReduceLROnPlateau" else sched.step()
    return model, opt, sched, names, data


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_deepcopy_with_scheduler_trains_the_copy_only(name):
    model, opt, sched, names, data = _trained(name)
    model2, opt2, sched2 = copy.deepcopy((model, opt, sched))
    assert "step" not in vars(opt2)  # no wrapper bound to the original
    before = [p.detach().clone() for p in model.parameters()]
    for xs, y in data[2:]:
        train_step(model2, opt2, names, xs, y)
        sched2.step(0.0) if name == "ReduceLROnPlateau" else sched2.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # original unmoved
    assert opt.step_count == 2 and opt2.step_count == 4
    for xs, y in data[2:]:  # the original, trained the same way, ends where the copy did
        train_step(model, opt, names, xs, y)
        sched.step(0.0) if name == "ReduceLROnPlateau" else sched.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    assert torch.equal(opt._coeffs, opt2._coeffs)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_pickle_with_scheduler(name):
    model, opt, sched, names, data = _trained(name)
    again = pickle.loads(pickle.dumps(opt))
    assert again.step_count == 2 and again.seed == 1 and "step" not in vars(again)
    assert again.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    params = again.optimizer.param_groups[0]["params"]
    before = [p.detach().clone() for p in model.parameters()]
    for p in params:
        p.grad = torch.ones_like(p)
    again.observe({n: torch.randn(3, 5) for n in names}, torch.tensor([0, 1, 2]))
    again.step()
    assert again.step_count == 3
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    # the scheduler and the optimizer pickled together keep the scheduler working on the copy
    opt_b, sched_b = pickle.loads(pickle.dumps((opt, sched)))
    assert sched_b.optimizer is opt_b


def test_unpickles_an_instance_state_from_before_the_run_holder():
    """Pickles made when the run state were plain instance attributes still load."""
    model, opt, sched, names, data = _trained("StepLR")
    state = opt.__getstate__()
    run = state.pop("_run")
    state.update({"epoch": 4, "step_count": run.step_count, "seed": run.seed, "alpha": run.alpha,
                  "beta_max": run.beta_max, "modulation_starts": 0, "modulation_ends": None,
                  "_epoch_hooked": 4, "_score_sum": None, "_observed": 0, "_samples": 0,
                  "_scores": run.scores, "_coeffs": run.coeffs, "_skipped": run.skipped,
                  "_fused_pending": None, "_recorder": None})
    old = type(opt).__new__(type(opt))
    old.__setstate__(state)
    assert old.epoch == 4 and old.step_count == 2 and old.alpha == 0.8
    assert torch.equal(old._coeffs, opt._coeffs) and "epoch" not in vars(old)
