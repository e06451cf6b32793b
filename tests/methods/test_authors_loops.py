"""Authors' training loops, transcribed, run for several epochs against ModulatedOptimizer on
the torch and cpu backends (docs/semantics.md names each source's commit and lines). AGM: see
tests/fusion/test_fusion_grad_scales.py and tests/methods/test_methods_agm.py; InfoReg:
tests/methods/test_methods_inforeg.py; MSLR: tests/methods/test_methods_mslr.py."""
import copy as cp

import pytest
import torch
import torch.nn as nn

import mmmod
from mmmod import backends

BACKENDS = [b for b in ("torch", "cpu") if backends.status(b)[0]]


class AVNet(nn.Module):
    """The official AVClassifier's layout: audio_net, visual_net (conv encoders, pooled), and
    fusion_module.fc_out over the concatenated features."""

    def __init__(self, classes=4, width=3):
        super().__init__()
        self.audio_net = nn.Sequential(nn.Conv2d(1, width, 3), nn.ReLU(), nn.Conv2d(width, width, 3),
                                       nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.visual_net = nn.Sequential(nn.Conv2d(2, width, 3), nn.ReLU(), nn.Conv2d(width, width, 3),
                                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fusion_module = nn.Module()
        self.fusion_module.fc_out = nn.Linear(2 * width, classes)

    def forward(self, spec, image):
        a, v = self.audio_net(spec), self.visual_net(image)
        return a, v, self.fusion_module.fc_out(torch.cat((a, v), 1))


def official_ogm_epoch(args, epoch, model, batches, optimizer):
    """GeWu-Lab/OGM-GE_CVPR2022 main.py @ 0f64793, train_epoch lines 70-153 (the model is not
    wrapped in DataParallel here, so a parameter's top-level name is split('.')[0], not [1])."""
    criterion = nn.CrossEntropyLoss()
    softmax = nn.Softmax(dim=1)
    relu = nn.ReLU(inplace=True)
    tanh = nn.Tanh()
    coeffs = []
    for spec, image, label in batches:
        optimizer.zero_grad()
        a, v, out = model(spec, image)
        weight_size = model.fusion_module.fc_out.weight.size(1)
        out_v = (torch.mm(v, torch.transpose(model.fusion_module.fc_out.weight[:, weight_size // 2:], 0, 1))
                 + model.fusion_module.fc_out.bias / 2)
        out_a = (torch.mm(a, torch.transpose(model.fusion_module.fc_out.weight[:, :weight_size // 2], 0, 1))
                 + model.fusion_module.fc_out.bias / 2)
        loss = criterion(out, label)
        loss.backward()
        score_v = sum([softmax(out_v)[i][label[i]] for i in range(out_v.size(0))])
        score_a = sum([softmax(out_a)[i][label[i]] for i in range(out_a.size(0))])
        ratio_v = score_v / score_a
        ratio_a = 1 / ratio_v
        if ratio_v > 1:
            coeff_v = 1 - tanh(args["alpha"] * relu(ratio_v))
            coeff_a = 1
        else:
            coeff_a = 1 - tanh(args["alpha"] * relu(ratio_a))
            coeff_v = 1
        coeffs.append(tuple(float(torch.as_tensor(c).detach()) for c in (coeff_a, coeff_v)))
        if args["modulation_starts"] <= epoch <= args["modulation_ends"]:
            for name, parms in model.named_parameters():
                layer = str(name).split('.')[0]
                if 'audio' in layer and len(parms.grad.size()) == 4:
                    if args["modulation"] == 'OGM_GE':
                        parms.grad = parms.grad * coeff_a + \
                            torch.zeros_like(parms.grad).normal_(0, parms.grad.std().item() + 1e-8)
                    elif args["modulation"] == 'OGM':
                        parms.grad *= coeff_a
                if 'visual' in layer and len(parms.grad.size()) == 4:
                    if args["modulation"] == 'OGM_GE':
                        parms.grad = parms.grad * coeff_v + \
                            torch.zeros_like(parms.grad).normal_(0, parms.grad.std().item() + 1e-8)
                    elif args["modulation"] == 'OGM':
                        parms.grad *= coeff_v
        optimizer.step()
    return coeffs


def _batches(seed, n=4, b=6, classes=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 1, 8, 8, generator=g) * (1 + i % 2), torch.randn(b, 2, 8, 8, generator=g),
             torch.randint(0, classes, (b,), generator=g)) for i in range(n)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["ogm", "ogm_ge"])
def test_official_ogm_loop_over_epochs(seed, method, backend):
    """Four epochs of the official loop (SGD momentum 0.9, weight decay 1e-4 as its main();
    window epochs 0-1 of 0-3) against the optimizer; OGM-GE's noise with noise_rng="torch",
    which draws torch's generator in the official order."""
    if method == "ogm_ge" and backend != "torch":
        pytest.skip("noise_rng='torch' (the official generator stream) runs on the torch backend")
    torch.manual_seed(seed)
    model = AVNet()
    ref = cp.deepcopy(model)
    args = {"alpha": 0.8, "modulation_starts": 0, "modulation_ends": 1,
            "modulation": "OGM_GE" if method == "ogm_ge" else "OGM"}
    epochs = [_batches(seed * 10 + e) for e in range(4)]

    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    torch.manual_seed(1000 + seed)
    want = [official_ogm_epoch(args, e, ref, epochs[e], opt_ref) for e in range(4)]

    opt = mmmod.ModulatedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4),
        {"audio": model.audio_net, "visual": model.visual_net}, method=method, alpha=0.8,
        modulation_starts=0, modulation_ends=1, backend=backend,
        **({"noise_rng": "torch"} if method == "ogm_ge" else {}))
    torch.manual_seed(1000 + seed)
    for e in range(4):
        opt.set_epoch(e)
        for (spec, image, label), (ka, kv) in zip(epochs[e], want[e]):
            opt.zero_grad()
            a, v, out = model(spec, image)
            opt.observe(dict(zip(["audio", "visual"],
                                 mmmod.fusion.concat_logits(model.fusion_module.fc_out, [a, v]))), label)
            nn.functional.cross_entropy(out, label).backward()
            opt.step()
            got = [float(x) for x in opt.coefficients.values()]
            assert got == pytest.approx([ka, kv], rel=1e-5, abs=1e-6)
    assert any(min(k) < 0.9 for ks in want[:2] for k in ks)  # the window did damp a leader
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
