"""The optimizer behind framework proxies and in framework loop orders, without any framework:
a proxy of each shape Lightning has used, ``unwrap``, zero_grad's rule in both orders, the
no_grad rule for evaluation, ``drop_scores``."""
import copy

import pytest
import torch
from torch import nn

import mmmod
from _models import TwoEncoder, batch, make


class ForwardingProxy:
    """Lightning 2.x's LightningOptimizer: a subclass of the optimizer's class with its own
    ``__dict__``, forwarding missing attributes, ``optimizer`` the wrapped object."""

    def __init__(self, opt):
        self._optimizer = opt
        self.__class__ = type("Lightning" + type(opt).__name__, (ForwardingProxy, type(opt)), {})

    @property
    def optimizer(self):
        return self._optimizer

    def __getattr__(self, item):
        return getattr(self._optimizer, item)


class CopyingProxy:
    """Older Lightning: the same re-classing, with the wrapped ``__dict__`` copied shallowly."""

    def __init__(self, opt):
        self.__dict__ = {k: v for k, v in opt.__dict__.items() if k not in ("step", "__del__")}
        self._optimizer = opt
        self.__class__ = type("Lightning" + type(opt).__name__, (CopyingProxy, type(opt)), {})


class HoldingWrapper:
    """accelerate's AcceleratedOptimizer: holds ``optimizer``, forwards nothing."""

    def __init__(self, opt):
        self.optimizer = opt


def _logits(model, feats, names):
    return dict(zip(names, mmmod.fusion.concat_logits(model.head, feats)))


def _built(**kw):
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.1), backend="torch",
                      alpha=0.8, history=16, **kw)
    return model, opt, names


@pytest.mark.parametrize("proxy", [ForwardingProxy, CopyingProxy])
def test_proxy_writes_reach_the_optimizer(proxy):
    model, opt, names = _built(modulation_ends=0)
    view = proxy(opt)
    assert isinstance(view, mmmod.ModulatedOptimizer) and mmmod.unwrap(view) is opt
    view.set_epoch(3)
    assert opt.epoch == 3 and not opt.in_window()  # the real window moved: no modulation
    xs, y = batch()
    view.zero_grad()
    out, feats = model(xs)
    view.observe(_logits(model, feats, names), y)
    assert opt._observed == 1 and opt._samples == 6
    nn.functional.cross_entropy(out, y).backward()
    opt.step()
    assert view.step_count == opt.step_count == 1 and view.epoch == 3
    assert opt.history()["epoch"].tolist() == [3]
    view.add_logger(type("Sink", (), {"write": lambda self, rows: None})(), every=1)
    assert opt.recorder is view.recorder
    sd = view.state_dict()
    assert sd["mmmod"]["epoch"] == 3
    view.load_state_dict(sd)  # through the proxy: the real inner optimizer loads
    view.drop_scores()
    assert opt._observed == 0


def test_unwrap_follows_nested_wrappers_and_names_the_chain():
    _, opt, _ = _built()
    assert mmmod.unwrap(opt) is opt
    assert mmmod.unwrap(HoldingWrapper(ForwardingProxy(opt))) is opt
    with pytest.raises(TypeError, match=r"no ModulatedOptimizer inside HoldingWrapper -> SGD"):
        mmmod.unwrap(HoldingWrapper(opt.optimizer))


def _pair(seed):
    torch.manual_seed(seed)
    a = TwoEncoder()
    b = copy.deepcopy(a)
    kw = dict(backend="torch", alpha=0.8, seed=seed, history=16)
    opt_a, names = make(a, torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), **kw)
    opt_b, _ = make(b, torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9), **kw)
    return a, b, opt_a, opt_b, names


def _plain(model, opt, names, micro):
    opt.zero_grad()
    for xs, y in micro:
        out, feats = model(xs)
        opt.observe(_logits(model, feats, names), y)
        nn.functional.cross_entropy(out, y).backward()
    opt.step()


def _closure_order(model, opt, names, micro):
    """Lightning's automatic optimization: training_step (observe), then zero_grad on the
    first micro-batch only, then backward; the step after the last one."""
    for i, (xs, y) in enumerate(micro):
        out, feats = model(xs)
        opt.observe(_logits(model, feats, names), y)
        if i == 0:
            opt.zero_grad()
        nn.functional.cross_entropy(out, y).backward()
    opt.step()


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_closure_order_scores_every_micro_batch(seed, micro_batches):
    a, b, opt_a, opt_b, names = _pair(seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        micro = [batch(g=g) for _ in range(micro_batches)]
        _plain(a, opt_a, names, micro)
        _closure_order(b, opt_b, names, micro)
        assert torch.equal(opt_a._scores, opt_b._scores)
    assert opt_b.history()["samples"].tolist() == [6 * micro_batches] * 3
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("order", [_plain, _closure_order])
def test_skipped_step_leaves_no_stale_scores(seed, order):
    """A step that never came (what a GradScaler does on overflow): its scores, whose backward
    ran, are dropped by the next zero_grad in either order."""
    a, b, opt_a, opt_b, names = _pair(seed)
    g = torch.Generator().manual_seed(seed)
    skipped, kept = [batch(g=g)], [batch(g=g)]
    order(a, _NoStep(opt_a), names, skipped)  # observe + backward, no step
    assert opt_a._observed == 1
    order(a, opt_a, names, kept)
    _plain(b, opt_b, names, kept)
    assert torch.equal(opt_a._scores, opt_b._scores)
    assert opt_a.history()["samples"].tolist() == [6]


class _NoStep:
    """The optimizer with step() skipped."""

    def __init__(self, opt):
        self._opt = opt

    def __getattr__(self, item):
        return (lambda *a, **k: None) if item == "step" else getattr(self._opt, item)


def test_observe_under_no_grad_is_evaluation(seed):
    a, b, opt_a, opt_b, names = _pair(seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(2):
        xs, y = batch(g=g)
        _plain(a, opt_a, names, [(xs, y)])
        with torch.no_grad():  # an evaluation pass between training steps
            out, feats = a(xs)
            opt_a.observe(_logits(a, feats, names), y)
        with torch.inference_mode():
            out, feats = a(xs)
            opt_a.observe(_logits(a, feats, names), y)
        assert opt_a._observed == 0
        _plain(b, opt_b, names, [(xs, y)])
    assert torch.equal(opt_a._scores, opt_b._scores)
    assert opt_a.history()["samples"].tolist() == [6, 6]


def test_observe_of_no_grad_logits_outside_no_grad_counts():
    model, opt, names = _built()
    xs, y = batch()
    with torch.no_grad():
        _, feats = model(xs)
        zs = _logits(model, feats, names)
    opt.observe(zs, y)  # logits computed without a graph, observed with grad mode on
    assert opt._observed == 1


def test_drop_scores_and_the_error_pointing_to_the_docs():
    model, opt, names = _built()
    xs, y = batch()
    opt.zero_grad()
    out, feats = model(xs)
    opt.observe(_logits(model, feats, names), y)
    nn.functional.cross_entropy(out, y).backward()
    opt.drop_scores()
    with pytest.raises(RuntimeError, match=r"mmmod.unwrap\(optimizer\).*docs/integrations.md"):
        opt.step()
    assert opt.step_count == 0
