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
from _ogm_official import AVNet, batches, official_ogm_epoch

BACKENDS = [b for b in ("torch", "cpu") if backends.status(b)[0]]


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
    epochs = [batches(seed * 10 + e) for e in range(4)]

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
