"""mmmod.fusion.GradScales against a transcription of AGM's official hooks
(lihong2303/AGM model/CREMAD_net.py @ 5a65542, GradMod lines 7-72; run/CREMAD_main.py lines
64-66, 130-166, 233-244)."""
import copy as cp
import math

import pytest
import torch
import torch.nn as nn

from mmmod import functional, methods
from mmmod.fusion import GradScales, grad_scaled_sum


class Net(nn.Module):
    """AVClassifier's shape: two encoders, concat head; pad_* zero a modality's input."""

    def __init__(self):
        super().__init__()
        self.audio_net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6))
        self.visual_net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6))
        self.fc_out = nn.Linear(12, 3)

    def forward(self, audio, visual, pad_audio=False, pad_visual=False):
        if pad_audio:
            audio = torch.zeros_like(audio)
        if pad_visual:
            visual = torch.zeros_like(visual)
        return self.fc_out(torch.cat((self.audio_net(audio), self.visual_net(visual)), 1))


class ModalityVisual(nn.Module):
    def forward(self, total_out, pad_visual_out, pad_audio_out):
        return 0.5 * (total_out - pad_visual_out + pad_audio_out)


class ModalityAudio(nn.Module):
    def forward(self, total_out, pad_visual_out, pad_audio_out):
        return 0.5 * (total_out - pad_audio_out + pad_visual_out)


class ModalityOut(nn.Module):
    def forward(self, x):
        return x


class GradMod(nn.Module):
    """CREMAD_net.py's GradMod, transcribed (train/eval switching kept; the net has no
    batch norm or dropout here, so it changes nothing)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.m_v, self.m_a = ModalityVisual(), ModalityAudio()
        self.m_v_o, self.m_a_o = ModalityOut(), ModalityOut()
        self.scale_a = self.scale_v = 1.0
        self.m_a_o.register_full_backward_hook(self.hooka)
        self.m_v_o.register_full_backward_hook(self.hookv)

    def hooka(self, m, ginp, gout):
        gnew = ginp[0].clone()
        return gnew * self.scale_a,

    def hookv(self, m, ginp, gout):
        gnew = ginp[0].clone()
        return gnew * self.scale_v,

    def update_scale(self, coeff_a, coeff_v):
        self.scale_a, self.scale_v = coeff_a, coeff_v

    def forward(self, audio, visual):
        total_out = self.net(audio, visual)
        self.net.eval()
        pad_visual_out = self.net(audio, visual, pad_audio=False, pad_visual=True)
        pad_audio_out = self.net(audio, visual, pad_audio=True, pad_visual=False)
        self.net.train()
        m_a = self.m_a_o(self.m_a(total_out, pad_visual_out, pad_audio_out))
        m_v = self.m_v_o(self.m_v(total_out, pad_visual_out, pad_audio_out))
        return total_out, pad_visual_out, pad_audio_out, m_a + m_v


def mmmod_forward(net, gs, audio, visual):
    total_out = net(audio, visual)
    pad_visual_out = net(audio, visual, pad_visual=True)
    pad_audio_out = net(audio, visual, pad_audio=True)
    m_a = 0.5 * (total_out - pad_audio_out + pad_visual_out)
    m_v = 0.5 * (total_out - pad_visual_out + pad_audio_out)
    return m_a, m_v, gs.fuse([m_a, m_v])


def _data(g):
    return torch.randn(7, 5, generator=g), torch.randn(7, 4, generator=g), torch.randint(0, 3, (7,), generator=g)


@pytest.mark.parametrize("k", [(1.0, 1.0), (0.3, 2.5), (4.0, 0.05)])
def test_grad_scales_equal_the_official_hooks(seed, k):
    g = torch.Generator().manual_seed(seed)
    net = Net()
    ref = GradMod(cp.deepcopy(net))
    a, v, y = _data(g)
    ref.update_scale(*k)
    *_, out_ref = ref(a, v)
    nn.functional.cross_entropy(out_ref, y).backward()
    gs = GradScales(2)
    *_, out = mmmod_forward(net, gs, a, v)
    gs.set_(torch.tensor(k))
    nn.functional.cross_entropy(out, y).backward()
    assert torch.equal(out, out_ref)
    for (n, p), q in zip(net.named_parameters(), ref.net.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=n)
    if k[0] != k[1]:
        # not the same as scaling the encoder gradients: the head and the other encoder move
        plain = cp.deepcopy(net)
        for p in plain.parameters():
            p.grad = None
        *_, out_p = mmmod_forward(plain, GradScales(2), a, v)
        nn.functional.cross_entropy(out_p, y).backward()
        assert not torch.allclose(plain.fc_out.weight.grad, net.fc_out.weight.grad)


def test_official_agm_loop_with_grad_scales(seed):
    """Eight steps of CREMAD_main.py's AGM branch (coefficients from this step's scores and the
    running means before their update, update_scale, backward, the clip when the head's
    gradient leaves [-1, 1], SGD step) against mmmod's AGM rule feeding GradScales."""
    g = torch.Generator().manual_seed(seed)
    net = Net()
    ref = GradMod(cp.deepcopy(net))
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    gs, state, alpha = GradScales(2), methods.get("agm_official").init_state(2), 1.5
    softmax = nn.Softmax(dim=1)
    train_score_a = train_score_v = 0.
    for it in range(1, 9):
        a, v, y = _data(g)
        # the official loop
        total_out, pad_visual_out, pad_audio_out, out = ref(a, v)
        out_a = 0.5 * (total_out - pad_audio_out + pad_visual_out)
        out_v = 0.5 * (total_out - pad_visual_out + pad_audio_out)
        opt_ref.zero_grad()
        score_audio = sum(-torch.log(softmax(out_a)[j][y[j]]) for j in range(7)) / 7
        score_visual = sum(-torch.log(softmax(out_v)[j][y[j]]) for j in range(7)) / 7
        ratio_a = math.exp(score_visual.item() - score_audio.item())
        ratio_v = math.exp(score_audio.item() - score_visual.item())
        coeff_a = math.exp(alpha * min(math.exp(train_score_v - train_score_a) - ratio_a, 10))
        coeff_v = math.exp(alpha * min(math.exp(train_score_a - train_score_v) - ratio_v, 10))
        train_score_a = train_score_a * (it - 1) / it + score_audio.item() / it
        train_score_v = train_score_v * (it - 1) / it + score_visual.item() / it
        ref.update_scale(coeff_a, coeff_v)
        nn.functional.cross_entropy(out, y).backward()
        clip_ref = bool(ref.net.fc_out.weight.grad.max() > 1 or ref.net.fc_out.weight.grad.min() < -1)
        if clip_ref:
            nn.utils.clip_grad_norm_(ref.parameters(), max_norm=1.0)
        opt_ref.step()
        # mmmod: the AGM rule on this step's scores, written into the scales before backward
        m_a, m_v, fused = mmmod_forward(net, gs, a, v)
        opt.zero_grad()
        m = methods.get("agm_official")
        k = functional.coefficients(m.batch_scores([m_a.detach(), m_v.detach()], y) / 7, "agm_official",
                                    alpha=alpha, state=state)
        torch.testing.assert_close(k.double(), torch.tensor([coeff_a, coeff_v], dtype=torch.float64),
                                   rtol=2e-5, atol=1e-6)
        gs.set_(k)
        nn.functional.cross_entropy(fused, y).backward()
        w = net.fc_out.weight.grad
        assert bool(w.max() > 1 or w.min() < -1) == clip_ref
        if clip_ref:
            nn.utils.clip_grad_norm_(net.parameters(), max_norm=1.0)
        opt.step()
    for p, q in zip(net.parameters(), ref.net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_grad_scaled_sum_checks_its_inputs():
    x = torch.ones(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="one scale per contribution"):
        grad_scaled_sum([x, x], torch.ones(3))
    with pytest.raises(ValueError, match="contribution 1 has shape"):
        grad_scaled_sum([x, torch.ones(3, 2)], torch.ones(2))
    with pytest.raises(ValueError, match="shape"):
        GradScales(2).set_(torch.ones(3))


def _official_step(ref, opt_ref, scores_run, a, v, y, alpha, modulate):
    """One step of CREMAD_main.py's AGM branch (lines 64-66, 130-166, 233-244); ``scores_run``:
    [train_score_a, train_score_v, iteration]. Outside the window the loop never calls
    update_scale; the scales are set to 1 here, as mmmod writes them (docs/semantics.md
    section 8)."""
    softmax = nn.Softmax(dim=1)
    total_out, pad_visual_out, pad_audio_out, out = ref(a, v)
    out_a = 0.5 * (total_out - pad_audio_out + pad_visual_out)
    out_v = 0.5 * (total_out - pad_visual_out + pad_audio_out)
    opt_ref.zero_grad()
    n = y.shape[0]
    score_audio = sum(-torch.log(softmax(out_a)[j][y[j]]) for j in range(n)) / n
    score_visual = sum(-torch.log(softmax(out_v)[j][y[j]]) for j in range(n)) / n
    train_score_a, train_score_v, it = scores_run
    ratio_a = math.exp(score_visual.item() - score_audio.item())
    ratio_v = math.exp(score_audio.item() - score_visual.item())
    coeff_a = math.exp(alpha * min(math.exp(train_score_v - train_score_a) - ratio_a, 10))
    coeff_v = math.exp(alpha * min(math.exp(train_score_a - train_score_v) - ratio_v, 10))
    scores_run[0] = train_score_a * (it - 1) / it + score_audio.item() / it
    scores_run[1] = train_score_v * (it - 1) / it + score_visual.item() / it
    scores_run[2] = it + 1
    ref.update_scale(coeff_a, coeff_v) if modulate else ref.update_scale(1.0, 1.0)
    nn.functional.cross_entropy(out, y).backward()
    w = ref.net.fc_out.weight.grad
    if w.max() > 1 or w.min() < -1:
        nn.utils.clip_grad_norm_(ref.parameters(), max_norm=1.0)
    opt_ref.step()
    return coeff_a, coeff_v


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_optimizer_writes_the_scales_as_the_official_loop(seed, backend):
    """Three epochs (the window ends after the second) of the official AGM loop against
    ModulatedOptimizer(method="agm_official") with attach_grad_scales: the optimizer writes this step's
    coefficients in observe(), before the backward the hooks act in, and step() does not scale
    the encoder gradients again."""
    import mmmod
    from mmmod import backends

    if not backends.status(backend)[0]:
        pytest.skip(f"backend {backend} not available")
    g = torch.Generator().manual_seed(seed)
    net = Net()
    ref = GradMod(cp.deepcopy(net))
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    gs = GradScales(2)
    opt = mmmod.ModulatedOptimizer(
        torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
        {"audio": net.audio_net, "visual": net.visual_net}, method="agm_official", alpha=1.5,
        modulation_ends=1, backend=backend)
    opt.attach_grad_scales(gs)
    run = [0.0, 0.0, 1]
    hooked = 0
    for epoch in range(3):
        opt.set_epoch(epoch)
        for _ in range(6):
            a, v, y = _data(g)
            coeff = _official_step(ref, opt_ref, run, a, v, y, 1.5, epoch <= 1)
            opt.zero_grad()
            m_a, m_v, fused = mmmod_forward(net, gs, a, v)
            opt.observe({"audio": m_a.detach(), "visual": m_v.detach()}, y)
            want = torch.tensor(coeff if epoch <= 1 else (1.0, 1.0))
            torch.testing.assert_close(gs.scales.double(), want.double(), rtol=2e-5, atol=1e-6)
            hooked += epoch <= 1 and abs(coeff[0] - coeff[1]) > 1e-3
            nn.functional.cross_entropy(fused, y).backward()
            w = net.fc_out.weight.grad
            if w.max() > 1 or w.min() < -1:
                nn.utils.clip_grad_norm_(net.parameters(), max_norm=1.0)
            opt.step()
            torch.testing.assert_close(torch.stack(list(opt.coefficients.values())).double(),
                                       torch.tensor(coeff, dtype=torch.float64), rtol=2e-5, atol=1e-6)
    assert hooked > 6  # the scales did differ between the modalities
    for (n, p), q in zip(net.named_parameters(), ref.net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def test_attach_grad_scales_refusals_and_skips():
    import mmmod

    net = Net()
    mods = {"audio": net.audio_net, "visual": net.visual_net}

    def make(**kw):
        return mmmod.ModulatedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), mods,
                                        backend="torch", **kw)
    with pytest.raises(ValueError, match="3 scales but the optimizer has 2 modalities"):
        make(method="agm").attach_grad_scales(GradScales(3))
    with pytest.raises(ValueError, match="method 'none' computes no coefficients"):
        make(method="none").attach_grad_scales(GradScales(2))
    with pytest.raises(ValueError, match="apply_to='grad'"):
        make(method="agm", apply_to="update").attach_grad_scales(GradScales(2))
    with pytest.raises(TypeError, match="GradScales"):
        make(method="agm").attach_grad_scales(torch.ones(2))
    opt, gs = make(method="agm"), GradScales(2)
    opt.attach_grad_scales(gs)
    a, v, y = _data(torch.Generator().manual_seed(0))
    m_a, m_v, fused = mmmod_forward(net, gs, a, v)
    z = {"audio": m_a.detach(), "visual": m_v.detach()}
    opt.observe(z, y)
    state = {k: t.clone() for k, t in opt._method_state.items()}
    scales = gs.scales.clone()
    with pytest.raises(RuntimeError, match="observe\\(\\) called twice"):
        opt.observe(z, y)
    assert torch.equal(gs.scales, scales)  # the refused call wrote nothing
    for k, t in opt._method_state.items():
        assert torch.equal(t, state[k]), k
    # non-finite logits: the step is skipped, the scales are ones, the backward untouched
    opt.drop_scores()  # no backward ran: zero_grad() alone keeps the pending scores
    opt.zero_grad()
    opt.observe({"audio": torch.full_like(z["audio"], float("nan")), "visual": z["visual"]}, y)
    assert torch.equal(gs.scales, torch.ones(2))
    opt.attach_grad_scales(None)  # detached: step() scales the encoder gradients again
    assert opt._grad_scales is None
