"""MLB's and MSLR's training loops as their authors run them (kkontras/MLB @ 68ad48d), transcribed
and run for several epochs beside ModulatedOptimizer on the torch and cpu backends; parameters
compared to the parity tolerance. docs/semantics.md names every line followed (sections 3 and 9).

The authors' side runs their model layout, transcribed from ``models/MLB_Models.py``
(``Base_Model`` with ``cls_type="linear"``: encoders ``enc_0``/``enc_1`` that each hold their own
linear classifier, ``fc_0_lin`` with the bias, ``fc_1_lin`` without, fused logits
``a W0^T + b/2 + v W1^T + b/2``), their step (``agents/general_agent/helpers/Trainer.py``,
``train_one_step``) and their method classes (``Bias_Infusion.py``). mmmod's side runs the
late-fusion model of the OGM-GE tests (tests/_ogm_official.py: conv encoders, one concat head
``fc_out``) plus unimodal heads, started from the same numbers: ``fc_out.weight = [W0 W1]``, ``fc_out.bias =
b``. The two layouts compute the same function, so any difference is the optimizer's.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mmmod
from mmmod import backends, methods
from mmmod.methods.mslr import MSLR
from _mslr_official import AuthorsMSLR
from _ogm_official import AVNet, conv_encoder

BACKENDS = [b for b in ("torch", "cpu") if backends.status(b)[0]]
WIDTH, CLASSES = 3, 4


class LateFusionNet(AVNet):
    """mmmod's side: the official OGM-GE layout (tests/_ogm_official.py's AVNet) plus a linear
    unimodal head per encoder (MLB trains them; MSLR leaves them unused)."""

    def __init__(self):
        super().__init__(classes=CLASSES, width=WIDTH)
        self.head_audio, self.head_visual = nn.Linear(WIDTH, CLASSES), nn.Linear(WIDTH, CLASSES)


class AuthorsEncoder(nn.Module):
    """MLB_Models.py Audio_ResNet / Video_ResNet: a trunk and the encoder's own classifier."""

    def __init__(self, trunk, classifier):
        super().__init__()
        self.net, self.classifier = trunk, classifier

    def forward(self, x):
        f = self.net(x)
        return {"preds": {"combined": self.classifier(f)}, "features": {"combined": f}}


class AuthorsBaseModel(nn.Module):
    """MLB_Models.py Base_Model, cls_type "linear": fc_0_lin (with the bias), fc_1_lin (none);
    preds "c"/"g" are the encoders' classifiers, or for MSLR (and OGM) the fusion head's halves
    pred_a / pred_v with fc_0_lin.bias / 2 each."""

    def __init__(self, net: LateFusionNet, method: str):
        super().__init__()
        self.method = method
        self.enc_0 = AuthorsEncoder(conv_encoder(1, WIDTH), nn.Linear(WIDTH, CLASSES))
        self.enc_1 = AuthorsEncoder(conv_encoder(2, WIDTH), nn.Linear(WIDTH, CLASSES))
        self.fc_0_lin = nn.Linear(WIDTH, CLASSES)
        self.fc_1_lin = nn.Linear(WIDTH, CLASSES, bias=False)
        with torch.no_grad():  # the same numbers as mmmod's model
            for dst, src in ((self.enc_0.net, net.audio_net), (self.enc_1.net, net.visual_net),
                             (self.enc_0.classifier, net.head_audio),
                             (self.enc_1.classifier, net.head_visual)):
                dst.load_state_dict(src.state_dict())
            self.fc_0_lin.weight.copy_(net.fusion_module.fc_out.weight[:, :WIDTH])
            self.fc_1_lin.weight.copy_(net.fusion_module.fc_out.weight[:, WIDTH:])
            self.fc_0_lin.bias.copy_(net.fusion_module.fc_out.bias)

    def forward(self, spec, image):
        a, v = self.enc_0(spec), self.enc_1(image)
        pred_aa, pred_vv = a["preds"]["combined"], v["preds"]["combined"]
        pred_a = torch.matmul(a["features"]["combined"], self.fc_0_lin.weight.T) + self.fc_0_lin.bias / 2
        pred_v = torch.matmul(v["features"]["combined"], self.fc_1_lin.weight.T) + self.fc_0_lin.bias / 2
        pred = pred_a + pred_v
        if self.method in ("OGM", "OGM_GE", "MSLR"):
            pred_aa, pred_vv = pred_a, pred_v
        return {"preds": {"combined": pred, "c": pred_aa, "g": pred_vv}}


def assert_same_model(net: LateFusionNet, ref: AuthorsBaseModel, rtol=1e-4, atol=1e-5):
    pairs = [(net.audio_net, ref.enc_0.net), (net.visual_net, ref.enc_1.net),
             (net.head_audio, ref.enc_0.classifier), (net.head_visual, ref.enc_1.classifier)]
    for mine, theirs in pairs:
        for (n, p), q in zip(mine.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=n)
    fc = net.fusion_module.fc_out
    torch.testing.assert_close(fc.weight, torch.cat([ref.fc_0_lin.weight, ref.fc_1_lin.weight], 1),
                               rtol=rtol, atol=atol)
    torch.testing.assert_close(fc.bias, ref.fc_0_lin.bias, rtol=rtol, atol=atol)


def _batches(seed, n=4, b=8):
    """Learnable data: each class shifts both inputs by its own pattern (audio more strongly,
    so the modalities are imbalanced and the accuracies move over epochs)."""
    g = torch.Generator().manual_seed(seed)
    pat_a = torch.randn(CLASSES, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    pat_v = torch.randn(CLASSES, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    out = []
    for _ in range(n):
        y = torch.randint(0, CLASSES, (b,), generator=g)
        out.append((torch.randn(b, 1, 8, 8, generator=g) + 1.5 * pat_a[y],
                    torch.randn(b, 2, 8, 8, generator=g) + 0.3 * pat_v[y], y))
    return out


def _inner(params, optimizer):
    if optimizer == "sgd":  # the OGM-GE script's optimizer
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)
    # MLB's CREMA-D default (configs/CREMA_D/default_config_cremad_res.json): Adam, wd 1e-4
    return torch.optim.Adam(params, lr=3e-3, betas=(0.9, 0.999), weight_decay=1e-4)


# ---------------------------------------------------------------------------------------------
# MLB: Bias_Infusion.py lines 565-713 (Bias_Infusion_MLB); Trainer.py train_one_step
# ---------------------------------------------------------------------------------------------

class AuthorsMLB:
    """Bias_Infusion_MLB: on_backward_end's scores, ratios and coefficients (tanh_mode False or
    "2"), and _equalize_gradients' name rule and epoch window."""

    def __init__(self, model, alpha, tanh_mode, tanh_mode_beta, starting_epoch, ending_epoch):
        self.model, self.alpha = model, alpha
        self.tanh_mode, self.tanh_mode_beta = tanh_mode, tanh_mode_beta
        self.starting_epoch, self.ending_epoch = starting_epoch, ending_epoch
        self.softmax = nn.Softmax(dim=1)
        self.tanh = nn.Tanh()

    def on_backward_end(self, label, preds, current_epoch):
        out_color, out_gray = preds["c"], preds["g"]
        score_0 = torch.mean(
            torch.stack([self.softmax(out_color)[i][label[i]] for i in range(out_color.size(0))])).detach()
        score_1 = torch.mean(
            torch.stack([self.softmax(out_gray)[i][label[i]] for i in range(out_gray.size(0))])).detach()
        ratio_0 = score_1 / score_0
        ratio_1 = 1 / ratio_0
        coeff_0 = 1 + self.tanh(self.alpha * (ratio_0 - 1))
        coeff_1 = 1 + self.tanh(self.alpha * (ratio_1 - 1))
        if self.tanh_mode == "2":
            if ratio_0 > 1:
                coeff_0 = 1 + (self.tanh_mode_beta - 1) * self.tanh(self.alpha * (ratio_0 - 1))
            else:
                coeff_0 = 1 + self.tanh(self.alpha * (ratio_0 - 1))
            if ratio_1 > 1:
                coeff_1 = 1 + (self.tanh_mode_beta - 1) * self.tanh(self.alpha * (ratio_1 - 1))
            else:
                coeff_1 = 1 + self.tanh(self.alpha * (ratio_1 - 1))
        self._equalize_gradients(current_epoch, coeff_0=coeff_0, coeff_1=coeff_1)
        return float(coeff_0), float(coeff_1)

    def _equalize_gradients(self, current_epoch, coeff_0=1, coeff_1=1):
        if self.starting_epoch <= current_epoch <= self.ending_epoch:
            for name, parms in self.model.named_parameters():
                if parms.grad is None:
                    continue
                if "mod0" in name or "enc_0" in name or "fc_0_lin.weight" in name:
                    parms.grad *= coeff_0
                if "mod1" in name or "enc_1" in name or "fc_1_lin.weight" in name:
                    parms.grad *= coeff_1


def authors_mlb_epoch(model, bias_infuser, optimizer, batches, epoch):
    """Trainer.train_one_step with multi_supervised_w {"combined": 1, "c": 1, "g": 1} (the
    release configs): the loss sums the weighted CE of every prediction in output order, then
    backward, on_backward_end, optimizer.step() (no clip: clip_grad false)."""
    coeffs = []
    for spec, image, label in batches:
        optimizer.zero_grad()
        output = model(spec, image)
        total_loss = torch.zeros(1).squeeze()
        for k, v in output["preds"].items():
            total_loss += 1 * F.cross_entropy(v, label)
        total_loss.backward()
        coeffs.append(bias_infuser.on_backward_end(label.detach(), output["preds"], epoch))
        optimizer.step()
    return coeffs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("tanh_mode, beta_max", [(False, 2.0), ("2", 3.0)])
def test_authors_mlb_loop_over_epochs(seed, backend, optimizer, tanh_mode, beta_max):
    """Four epochs, the window epochs 0-2 (the authors' default 0..1500 covers every epoch;
    closing it early checks the gate too). tanh_mode False is the rule with beta 2 on both
    sides (mmmod beta_max=2, the default); tanh_mode "2" with tanh_mode_beta is beta_max."""
    torch.manual_seed(seed)
    net = LateFusionNet()
    ref = AuthorsBaseModel(net, "MLB")
    alpha, epochs = 1.0, [_batches(seed * 10 + e) for e in range(4)]

    opt_ref = _inner(ref.parameters(), optimizer)
    bi = AuthorsMLB(ref, alpha, tanh_mode, beta_max, starting_epoch=0, ending_epoch=2)
    want = [authors_mlb_epoch(ref, bi, opt_ref, epochs[e], e) for e in range(4)]

    slices = mmmod.fusion.concat_slices(net.fusion_module.fc_out, [WIDTH, WIDTH])
    opt = mmmod.ModulatedOptimizer(
        _inner(net.parameters(), optimizer),
        {"audio": [net.audio_net, net.head_audio, slices[0]],
         "visual": [net.visual_net, net.head_visual, slices[1]]},
        method="mlb", alpha=alpha, beta_max=beta_max, modulation_starts=0, modulation_ends=2,
        backend=backend)
    for e in range(4):
        opt.set_epoch(e)
        for (spec, image, label), (ka, kv) in zip(epochs[e], want[e]):
            opt.zero_grad()
            a, v, out = net(spec, image)
            heads = [net.head_audio(a), net.head_visual(v)]
            opt.observe({"audio": heads[0].detach(), "visual": heads[1].detach()}, label)
            mmmod.losses.multi_loss(out, heads, label).backward()
            opt.step()
            got = [float(x) for x in opt.coefficients.values()]
            assert got == pytest.approx([ka, kv], rel=1e-5, abs=1e-6)
    # the rule did move both ways in the window: a leader slowed, a laggard sped up
    ks = [k for ep in want[:3] for step in ep for k in step]
    assert min(ks) < 0.97 and max(ks) > 1.03
    assert_same_model(net, ref)


# ---------------------------------------------------------------------------------------------
# MSLR: Bias_Infusion.py lines 1438-1502 (Bias_Infusion_MSLR, tests/_mslr_official.py);
# Trainer.py train_one_step
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def _unimodal_accuracy(preds_fn, batches):
    """Validation accuracy of each modality's predictions ("c", "g"): correct / samples."""
    hits, n = torch.zeros(2), 0
    for spec, image, label in batches:
        za, zv = preds_fn(spec, image)
        hits += torch.stack([(za.argmax(1) == label).sum(), (zv.argmax(1) == label).sum()])
        n += label.numel()
    return (hits / n).tolist()


@pytest.fixture
def mslr_k2():
    """MSLR with the CREMA-D release configuration's base rates and a 2-epoch memory (so the
    ratios leave 1 within a short test)."""
    m = methods.register(MSLR(keep_memory_epoch=2, base_rates=(0.9, 1.1), name="mslr_k2_test"))
    yield m.name
    methods.unregister(m.name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_authors_mslr_loop_over_epochs(seed, backend, mslr_k2):
    """Six epochs. Authors: Trainer's epoch loop (on_epoch_begin with the last validation's
    accuracies of preds "c"/"g", the fusion head's halves with bias / 2 for MSLR; validation at
    each epoch's end), the step's loss replaced by CE(fused) in before_backward, the encoders'
    gradients scaled by ratio * init_learning_rate ({"c": 0.9, "g": 1.1}, configs/CREMA_D/
    release/vit/MSLR.json). mmmod: set_epoch(e, val_acc=...) with the same accuracies of
    mmmod.fusion.concat_logits."""
    torch.manual_seed(seed)
    net = LateFusionNet()
    ref = AuthorsBaseModel(net, "MSLR")
    n_epochs = 6
    epochs = [_batches(seed * 10 + e) for e in range(n_epochs)]
    val = _batches(seed * 10 + 99, n=3)

    opt_ref = _inner(ref.parameters(), "sgd")
    bi = AuthorsMSLR(ref, {"c": 0.9, "g": 1.1}, keep_memory_epoch=2)
    val_logs, want, want_acc = {}, [], []
    for e in range(n_epochs):
        bi.on_epoch_begin(e, val_logs)
        coeffs = []
        for spec, image, label in epochs[e]:
            opt_ref.zero_grad()
            output = ref(spec, image)
            losses = {f"ce_loss_{k}": F.cross_entropy(v, label) for k, v in output["preds"].items()}
            total = sum(losses.values())
            total, losses, _ = bi.before_backward(total, losses)
            total.backward()
            coeffs.append(bi.on_backward_end(e))
            opt_ref.step()
        want.append(coeffs)
        acc = _unimodal_accuracy(lambda s, i: (ref(s, i)["preds"]["c"], ref(s, i)["preds"]["g"]), val)
        want_acc.append(acc)
        val_logs[e] = {"acc": {"c": acc[0], "g": acc[1]}}

    opt = mmmod.ModulatedOptimizer(_inner(net.parameters(), "sgd"),
                                   {"audio": net.audio_net, "visual": net.visual_net},
                                   method=mslr_k2, backend=backend)
    acc = None
    for e in range(n_epochs):
        if e == 0:
            opt.set_epoch(0)
        else:
            opt.set_epoch(e, val_acc={"audio": acc[0], "visual": acc[1]})
        for (spec, image, label), (ka, kv) in zip(epochs[e], want[e]):
            opt.zero_grad()
            a, v, out = net(spec, image)
            F.cross_entropy(out, label).backward()
            opt.step()  # MSLR reads no scores: no observe() needed
            got = [float(x) for x in opt.coefficients.values()]
            assert got == pytest.approx([ka, kv], rel=1e-6)
        acc = _unimodal_accuracy(
            lambda s, i: tuple(mmmod.fusion.concat_logits(net.fusion_module.fc_out,
                                                          list(net(s, i)[:2]))), val)
        assert acc == want_acc[e]
    # epochs 3-5 ran with accuracy ratios, not the base rates alone
    assert any(abs(k[0] / 0.9 - 1) > 1e-3 or abs(k[1] / 1.1 - 1) > 1e-3 for ep in want[3:] for k in ep)
    assert all(k == (0.9, 1.1) for ep in want[:3] for k in ep)
    assert_same_model(net, ref)
