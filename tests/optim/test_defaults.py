"""Defaults a first user meets: a filter that selects nothing says which one would, frozen or
empty modalities are observed but not modulated, detached logits cannot feed MLB's loss, and
``opt.backend`` names the backend that runs."""
import warnings

import pytest
import torch
from torch import nn

import mmmod
from mmmod import _ext

pytestmark = pytest.mark.filterwarnings("ignore:mmmod. no fused backend")


class MLPPair(nn.Module):
    def __init__(self, d_a=8, d_v=6, hidden=16, classes=3):
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(d_a, hidden), nn.ReLU())
        self.visual = nn.Sequential(nn.Linear(d_v, hidden), nn.ReLU())
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, xa, xv):
        fa, fv = self.audio(xa), self.visual(xv)
        return self.head(torch.cat([fa, fv], 1)), (fa, fv)


def batch(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 8, generator=g), torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("method,filt,suggest", [
    ("ogm_ge", "conv", "param_filter='matrix' (weights of 2+ dims) or 'all'"),
    ("ogm", "conv", "param_filter='matrix'"),
])
def test_conv_default_on_mlp_suggests_the_filter(method, filt, suggest):
    m = MLPPair()
    with pytest.raises(ValueError) as e:
        mmmod.ModulatedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1),
                                 {"audio": m.audio, "visual": m.visual}, method=method)
    msg = str(e.value)
    assert f"modality 'audio': param_filter '{filt}' selects none of its 2 trainable tensors" in msg
    assert suggest in msg and "official OGM-GE" in msg
    # and the suggested filter works
    mmmod.ModulatedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1),
                             {"audio": m.audio, "visual": m.visual}, method=method, param_filter="matrix")


def test_matrix_filter_on_biases_only_suggests_all():
    m = MLPPair()
    with pytest.raises(ValueError, match="pass param_filter='all'"):
        mmmod.ModulatedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1),
                                 {"audio": [m.audio[0].bias], "visual": m.visual}, method="agm")


def train(m, opt, steps=3, method_inputs=None):
    for ep in range(2):
        opt.set_epoch(ep, **(method_inputs or {}))
        for _ in range(steps):
            xa, xv, y = batch()
            opt.zero_grad()
            out, feats = m(xa, xv)
            opt.observe(dict(zip(["audio", "visual"], mmmod.fusion.concat_logits(m.head, feats))), y)
            nn.functional.cross_entropy(out, y).backward()
            opt.step()


@pytest.mark.parametrize("method", ["ogm_ge", "mlb", "agm", "inforeg", "mslr"])
@pytest.mark.parametrize("fused", [False, True])
def test_frozen_modality_is_observed_not_modulated(method, fused):
    m = MLPPair()
    for p in m.visual.parameters():
        p.requires_grad_(False)
    frozen = [p.detach().clone() for p in m.visual.parameters()]
    # the usual idiom: the optimizer gets the trainable parameters only
    inner = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        opt = mmmod.ModulatedOptimizer(inner, {"audio": m.audio, "visual": m.visual}, method=method,
                                       param_filter="all", backend="torch", fused=fused)
    ours = [str(x.message) for x in w if "trainable" in str(x.message)]
    assert len(ours) == 1 and "['visual'] have no trainable parameter" in ours[0]
    assert opt.param_names[1] == [] and len(opt.param_names[0]) == 2
    train(m, opt, method_inputs={"val_acc": {"audio": .6, "visual": .4}} if method == "mslr" else None)
    assert all(torch.equal(p, f) for p, f in zip(m.visual.parameters(), frozen))
    assert torch.isfinite(opt.scores["visual"]) and torch.isfinite(opt.coefficients["visual"])
    opt.load_state_dict(opt.state_dict())


def test_empty_modality_list_is_accepted_and_audio_still_modulated():
    m = MLPPair()
    ref = MLPPair()
    ref.load_state_dict(m.state_dict())
    with pytest.warns(UserWarning, match=r"\['visual'\] have no trainable parameter"):
        opt = mmmod.ModulatedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1),
                                       {"audio": m.audio, "visual": []}, method="ogm",
                                       param_filter="all", alpha=5.0, backend="torch")
    base = torch.optim.SGD(ref.parameters(), lr=0.1)
    xa, xv, y = batch()
    opt.zero_grad()
    out, feats = m(xa, xv)
    opt.observe(mmmod.fusion.concat_logits(m.head, feats), y)
    nn.functional.cross_entropy(out, y).backward()
    opt.step()
    base.zero_grad()
    nn.functional.cross_entropy(ref(xa, xv)[0], y).backward()
    base.step()
    k = opt.coefficients
    # the visual encoder (not modulated) steps exactly as plain SGD; audio is scaled by its k
    assert all(torch.equal(a, b) for a, b in zip(m.visual.parameters(), ref.visual.parameters()))
    assert float(min(k.values())) < 1.0
    changed = not all(torch.equal(a, b) for a, b in zip(m.audio.parameters(), ref.audio.parameters()))
    assert changed == (float(k["audio"]) != 1.0)


def test_every_modality_frozen_is_refused():
    m = MLPPair()
    with pytest.raises(ValueError, match="no modality has a trainable parameter"):
        mmmod.ModulatedOptimizer(torch.optim.SGD(m.head.parameters(), lr=0.1),
                                 {"audio": [], "visual": []}, param_filter="all")


def test_trainable_parameter_outside_the_optimizer_still_refused():
    m = MLPPair()
    with pytest.raises(ValueError, match="'0.weight' of modality 'visual' is not in the inner"):
        mmmod.ModulatedOptimizer(torch.optim.SGD(m.audio.parameters(), lr=0.1),
                                 {"audio": m.audio, "visual": m.visual}, param_filter="all")


def test_multi_loss_refuses_detached_unimodal_logits():
    m = MLPPair()
    xa, xv, y = batch()
    out, feats = m(xa, xv)
    with pytest.raises(ValueError, match="unimodal logits 0 do not require grad.*concat_logits"):
        mmmod.losses.multi_loss(out, mmmod.fusion.concat_logits(m.head, feats), y)
    with pytest.raises(ValueError, match="unimodal logits 'visual' do not require grad"):
        mmmod.losses.multi_loss(out, {"audio": feats[0][:, :3], "visual": feats[1][:, :3].detach()}, y)
    # unimodal heads with grad: the extra terms reach the encoders
    heads = [nn.Linear(16, 3), nn.Linear(16, 3)]
    loss = mmmod.losses.multi_loss(out, [h(f) for h, f in zip(heads, feats)], y)
    loss.backward()
    assert heads[0].weight.grad is not None
    with torch.no_grad():  # evaluation: nothing to train, nothing refused
        out, feats = m(xa, xv)
        mmmod.losses.multi_loss(out, mmmod.fusion.concat_logits(m.head, feats), y)


def test_backend_reports_the_resolved_one():
    m = MLPPair()
    opt = mmmod.ModulatedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1),
                                   {"audio": m.audio, "visual": m.visual}, param_filter="all")
    live = _ext.load("cpu")[0] is not None
    assert opt.requested_backend == "auto"
    assert opt.backend == ("cpu" if live else "torch")
    assert f"backend={opt.backend!r} (requested 'auto')" in repr(opt)
    opt = mmmod.ModulatedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1),
                                   {"audio": m.audio, "visual": m.visual}, param_filter="all",
                                   backend="torch")
    assert opt.backend == opt.requested_backend == "torch"
