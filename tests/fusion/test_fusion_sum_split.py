"""Sum fusion's per-modality logits as the official OGM-GE code scores them: each branch's weight
and half of that branch's bias (GeWu-Lab/OGM-GE_CVPR2022 main.py @ 0f64793 lines 82-86;
SumFusion in models/fusion_modules.py lines 5-13). docs/semantics.md section 1."""
import copy as cp

import pytest
import torch
import torch.nn as nn

import mmmod
from mmmod import backends

BACKENDS = [b for b in ("torch", "cpu") if backends.status(b)[0]]


class SumAVNet(nn.Module):
    """The official AVClassifier with fusion_method "sum": audio_net, visual_net and
    fusion_module = SumFusion (fc_x on audio, fc_y on visual, both with a bias)."""

    def __init__(self, classes=4, width=3):
        super().__init__()
        self.audio_net = nn.Sequential(nn.Conv2d(1, width, 3), nn.ReLU(), nn.Conv2d(width, width, 3),
                                       nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.visual_net = nn.Sequential(nn.Conv2d(2, width, 3), nn.ReLU(), nn.Conv2d(width, width, 3),
                                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fusion_module = nn.Module()
        self.fusion_module.fc_x = nn.Linear(width, classes)
        self.fusion_module.fc_y = nn.Linear(width, classes)
        with torch.no_grad():  # biases far from 0, so the split matters
            self.fusion_module.fc_x.bias.copy_(torch.linspace(-2.0, 2.0, classes))
            self.fusion_module.fc_y.bias.copy_(torch.linspace(1.5, -1.5, classes))

    def forward(self, spec, image):
        a, v = self.audio_net(spec), self.visual_net(image)
        return a, v, self.fusion_module.fc_x(a) + self.fusion_module.fc_y(v)


def official_sum_ogm_epoch(alpha, epoch, window, model, batches, optimizer):
    """main.py @ 0f64793 train_epoch, fusion_method "sum", modulation "OGM" (lines 82-86 for
    out_v / out_a, 95-98, 105-124, 132-148, 153; no DataParallel: split('.')[0])."""
    criterion = nn.CrossEntropyLoss()
    softmax = nn.Softmax(dim=1)
    relu = nn.ReLU(inplace=True)
    tanh = nn.Tanh()
    coeffs = []
    for spec, image, label in batches:
        optimizer.zero_grad()
        a, v, out = model(spec, image)
        out_v = (torch.mm(v, torch.transpose(model.fusion_module.fc_y.weight, 0, 1)) +
                 model.fusion_module.fc_y.bias / 2)
        out_a = (torch.mm(a, torch.transpose(model.fusion_module.fc_x.weight, 0, 1)) +
                 model.fusion_module.fc_x.bias / 2)
        loss = criterion(out, label)
        loss.backward()
        score_v = sum([softmax(out_v)[i][label[i]] for i in range(out_v.size(0))])
        score_a = sum([softmax(out_a)[i][label[i]] for i in range(out_a.size(0))])
        ratio_v = score_v / score_a
        ratio_a = 1 / ratio_v
        if ratio_v > 1:
            coeff_v = 1 - tanh(alpha * relu(ratio_v))
            coeff_a = 1
        else:
            coeff_a = 1 - tanh(alpha * relu(ratio_a))
            coeff_v = 1
        coeffs.append(tuple(float(torch.as_tensor(c).detach()) for c in (coeff_a, coeff_v)))
        if window[0] <= epoch <= window[1]:
            for name, parms in model.named_parameters():
                layer = str(name).split('.')[0]
                if 'audio' in layer and len(parms.grad.size()) == 4:
                    parms.grad *= coeff_a
                if 'visual' in layer and len(parms.grad.size()) == 4:
                    parms.grad *= coeff_v
        optimizer.step()
    return coeffs


def _batches(seed, n=4, b=6, classes=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 1, 8, 8, generator=g) * (1 + i % 2), torch.randn(b, 2, 8, 8, generator=g),
             torch.randint(0, classes, (b,), generator=g)) for i in range(n)]


def test_sum_logits_take_half_of_each_branch_bias():
    torch.manual_seed(0)
    fx, fy = nn.Linear(3, 4), nn.Linear(3, 4)
    a, v = torch.randn(5, 3), torch.randn(5, 3)
    za, zv = mmmod.fusion.sum_logits([fx, fy], [a, v])
    torch.testing.assert_close(za, a @ fx.weight.T + fx.bias / 2, rtol=0, atol=1e-6)
    torch.testing.assert_close(zv, v @ fy.weight.T + fy.bias / 2, rtol=0, atol=1e-6)
    full = mmmod.fusion.sum_logits([fx, fy], [a, v], full_bias=True)
    torch.testing.assert_close(full[0] + full[1], fx(a) + fy(v))
    assert not torch.allclose(za, full[0])
    assert not za.requires_grad  # scores only


@pytest.mark.parametrize("backend", BACKENDS)
def test_official_ogm_loop_with_sum_fusion(seed, backend):
    """Three epochs of the official loop with sum fusion (window epochs 0-1), SGD momentum 0.9,
    weight decay 1e-4; the optimizer fed mmmod.fusion.sum_logits."""
    torch.manual_seed(seed)
    model = SumAVNet()
    ref = cp.deepcopy(model)
    epochs = [_batches(seed * 10 + e) for e in range(3)]
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    want = [official_sum_ogm_epoch(0.8, e, (0, 1), ref, epochs[e], opt_ref) for e in range(3)]

    opt = mmmod.ModulatedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4),
        {"audio": model.audio_net, "visual": model.visual_net}, method="ogm", alpha=0.8,
        modulation_starts=0, modulation_ends=1, backend=backend)
    fm = model.fusion_module
    for e in range(3):
        opt.set_epoch(e)
        for (spec, image, label), (ka, kv) in zip(epochs[e], want[e]):
            opt.zero_grad()
            a, v, out = model(spec, image)
            opt.observe(dict(zip(["audio", "visual"], mmmod.fusion.sum_logits([fm.fc_x, fm.fc_y], [a, v]))),
                        label)
            nn.functional.cross_entropy(out, label).backward()
            opt.step()
            got = [float(x) for x in opt.coefficients.values()]
            assert got == pytest.approx([ka, kv], rel=1e-5, abs=1e-6)
    assert any(min(k) < 0.9 for ks in want[:2] for k in ks)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
