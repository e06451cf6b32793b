"""Sum fusion's per-modality logits as the official OGM-GE code scores them: each branch's weight
and half of that branch's bias (GeWu-Lab/OGM-GE_CVPR2022 main.py @ 0f64793 lines 82-86;
SumFusion in models/fusion_modules.py lines 5-13). docs/semantics.md section 1."""
import copy as cp

import pytest
import torch
import torch.nn as nn

import mmmod
from mmmod import backends
from _ogm_official import SumAVNet, batches, official_ogm_epoch

BACKENDS = [b for b in ("torch", "cpu") if backends.status(b)[0]]


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
    epochs = [batches(seed * 10 + e) for e in range(3)]
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    args = {"alpha": 0.8, "modulation": "OGM", "modulation_starts": 0, "modulation_ends": 1}
    want = [official_ogm_epoch(args, e, ref, epochs[e], opt_ref) for e in range(3)]

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
