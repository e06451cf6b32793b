"""Bad input: a clear error naming the problem, or a documented skip; gradients untouched."""
import pytest
import torch
from torch import nn

import mmmod
from mmmod import functional
from _models import TwoEncoder, batch, make

pytestmark = pytest.mark.filterwarnings("ignore:mmmod. no fused backend")


def ready(method="ogm_ge", **kw):
    """A model with gradients in place and an optimizer ready to observe."""
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.1), method=method,
                      backend="torch", **kw)
    xs, y = batch()
    out, feats = model(xs)
    nn.functional.cross_entropy(out, y).backward()
    logits = dict(zip(names, mmmod.fusion.concat_logits(model.head, feats)))
    snapshot = [(p.detach().clone(), p.grad.clone()) for p in model.parameters()]
    return model, opt, logits, y, snapshot


def untouched(model, snapshot):
    return all(torch.equal(p, p0) and torch.equal(p.grad, g0)
               for p, (p0, g0) in zip(model.parameters(), snapshot))


@pytest.mark.parametrize("labels,match", [
    (torch.zeros(6, 1, dtype=torch.long), "labels must be 1-D"),
    (torch.zeros(5, dtype=torch.long), "batch size 6 but labels have 5"),
    (torch.zeros(6), "integer"),
    (torch.full((6,), 5), r"labels must lie in \[0, 5\) for modality 'audio'"),
    (torch.full((6,), -1), r"got values in \[-1, -1\]"),
])
def test_bad_labels_raise_and_touch_nothing(labels, match):
    model, opt, logits, _, snap = ready()
    with pytest.raises((ValueError, TypeError), match=match):
        opt.observe(logits, labels)
    assert opt._observed == 0 and untouched(model, snap)


def test_unknown_and_missing_modality_names():
    model, opt, logits, y, snap = ready()
    with pytest.raises(KeyError, match="unknown modality 'txt'"):
        opt.observe({**logits, "txt": logits["audio"]}, y)
    with pytest.raises(KeyError, match="missing logits for modality 'visual'"):
        opt.observe({"audio": logits["audio"]}, y)
    with pytest.raises(ValueError, match="logits of modality 'visual' must be 2-D"):
        opt.observe({"audio": logits["audio"], "visual": logits["visual"][0]}, y)
    assert untouched(model, snap)


def test_parameter_in_two_modalities():
    model = TwoEncoder()
    with pytest.raises(ValueError, match=r"parameter '0.weight' of modality 'visual' also belongs "
                                         r"to modality 'audio'"):
        mmmod.ModulatedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                 {"audio": model.encoders[0], "visual": model.encoders[0]})


def test_empty_modality_names_it():
    model = TwoEncoder()
    with pytest.raises(ValueError, match="modality 'visual': param_filter 'conv' selects no"):
        mmmod.ModulatedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                 {"audio": model.encoders[0], "visual": model.head})


def test_parameter_not_in_inner_optimizer():
    model = TwoEncoder()
    with pytest.raises(ValueError, match="not in the inner optimizer's param_groups"):
        mmmod.ModulatedOptimizer(torch.optim.SGD(model.encoders[0].parameters(), lr=0.1),
                                 {"audio": model.encoders[0], "visual": model.encoders[1]})


@pytest.mark.parametrize("kw,match", [
    ({"method": "ogn"}, "unknown method 'ogn'"), ({"apply_to": "weights"}, "apply_to"),
    ({"noise_std": "after"}, "noise_std"), ({"noise_rng": "mt"}, "noise_rng"),
    ({"backend": "metal"}, "unknown backend 'metal'"), ({"param_filter": "convs"}, "param_filter"),
    ({"modulation_starts": 5, "modulation_ends": 2}, "modulation_ends"),
])
def test_bad_arguments(kw, match):
    model = TwoEncoder()
    with pytest.raises(ValueError, match=match):
        make(model, torch.optim.SGD(model.parameters(), lr=0.1), **kw)


def test_single_modality_rejected():
    model = TwoEncoder()
    with pytest.raises(ValueError, match="at least two"):
        mmmod.ModulatedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                 {"audio": model.encoders[0]})


def test_step_without_observe():
    model, opt, _, _, snap = ready()
    with pytest.raises(RuntimeError, match="without observe"):
        opt.step()
    assert untouched(model, snap)


def test_zero_grad_drops_stale_scores():
    """Scores whose backward ran (a step that never came) are stale at zero_grad."""
    model, opt, logits, y, _ = ready()
    opt.observe(logits, y)
    xs, y = batch()
    nn.functional.cross_entropy(model(xs)[0], y).backward()
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="without observe"):
        opt.step()


def test_sparse_gradient_raises_before_any_change():
    model, opt, logits, y, _ = ready(param_filter="all")
    p = model.encoders[1][0].bias
    p.grad = p.grad.to_sparse()
    snap = [(q.detach().clone(), q.grad.clone()) for q in model.parameters() if q is not p]
    opt.observe(logits, y)
    with pytest.raises(ValueError, match=r"parameter '0.bias' of modality 'visual' has a non-dense gradient"):
        opt.step()
    rest = [q for q in model.parameters() if q is not p]
    assert all(torch.equal(q, q0) and torch.equal(q.grad, g0) for q, (q0, g0) in zip(rest, snap))


def test_nan_logits_skip_modulation_and_count():
    """Documented: non-finite scores skip the step's modulation (no sync), the inner step runs."""
    model, opt, logits, y, snap = ready()
    logits["visual"] = logits["visual"].clone()
    logits["visual"][2, 1] = float("nan")
    grads = [p.grad.clone() for p in model.parameters()]
    opt.observe(logits, y)
    opt.step()
    assert opt.skipped_steps == 1
    for p, (p0, _), g in zip(model.parameters(), snap, grads):
        assert torch.equal(p.grad, g)  # modulation did not touch the gradients
        assert torch.equal(p, p0.add(g, alpha=-0.1))  # the plain SGD step still happened


def test_strict_raises_on_nan_logits():
    model, opt, logits, y, snap = ready(strict=True)
    logits["audio"] = logits["audio"] * float("inf")
    with pytest.raises(ValueError, match="logits of modality 'audio' contain NaN or inf"):
        opt.observe(logits, y)
    assert untouched(model, snap)


def test_functional_errors_name_the_tensor():
    with pytest.raises(ValueError, match=r"coeffs must have shape \[2\]"):
        functional.modulate_([[torch.zeros(3)], [torch.zeros(3)]], torch.ones(3), noise=False)
    with pytest.raises(TypeError, match="tensor 1 of modality 1 has dtype torch.int64"):
        functional.modulate_([[torch.zeros(3)], [torch.zeros(3), torch.zeros(2, dtype=torch.long)]],
                             torch.ones(2), noise=False)
    with pytest.raises(ValueError, match="scores must be 1-D with M >= 2"):
        functional.coefficients(torch.ones(1), "ogm")
    with pytest.raises(ValueError, match="unknown method"):
        functional.coefficients(torch.ones(2), "bogus")


def test_load_state_dict_from_other_setup():
    model, opt, *_ = ready()
    with pytest.raises(KeyError, match="no 'mmmod' entry"):
        opt.load_state_dict(opt.optimizer.state_dict())
    sd = opt.state_dict()
    sd["mmmod"]["modalities"] = ["a", "b"]
    with pytest.raises(ValueError, match="saved for modalities"):
        opt.load_state_dict(sd)
