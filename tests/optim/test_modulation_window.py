"""The modulation window (modulation_starts/modulation_ends, README "API") gates every
registered method: outside it the gradients reach the inner optimizer exactly as backward left
them, scaling, noise and corrections (InfoReg's proximal pull) alike."""
import pytest
import torch

import mmmod
from mmmod import methods


def _epoch_inputs(m, epoch):
    # MSLR reads validation accuracies from epoch 1 on
    return {"val_acc": [0.6 + 0.01 * epoch, 0.4]} if "val_acc" in m.epoch_inputs and epoch >= 1 else {}


@pytest.mark.parametrize("name", methods.names())
def test_modulation_ends_0_leaves_epoch_1_untouched(name):
    m = methods.get(name)
    torch.manual_seed(0)
    enc = torch.nn.ModuleList([torch.nn.Linear(3, 4), torch.nn.Linear(2, 4)])
    seen = []

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            seen.append([p.grad.clone() for p in enc.parameters()])
            return super().step(closure)

    opt = mmmod.ModulatedOptimizer(Spy(enc.parameters(), lr=0.1), {"a": enc[0], "v": enc[1]},
                                   method=name, backend="torch", param_filter="all",
                                   modulation_ends=0, history=16)
    changed = {0: [], 1: []}
    for epoch in (0, 1):
        opt.set_epoch(epoch, **_epoch_inputs(m, epoch))
        for step in range(3):
            opt.zero_grad()
            x_a, x_v = torch.randn(5, 3), torch.randn(5, 2)
            y = torch.randint(0, 4, (5,))
            z_a, z_v = enc[0](x_a), enc[1](x_v)
            # audio leads by a margin: every rule has something to do
            opt.observe({"a": z_a.detach() + 4 * torch.nn.functional.one_hot(y, 4), "v": z_v.detach()}, y)
            loss = (z_a + z_v).square().mean() + 0.1 * sum(p.square().sum() for p in enc.parameters())
            if m.combines_objectives:  # per-objective gradients: the fused and unimodal losses
                opt.backward({"fused": loss, "a": z_a.square().mean(), "v": z_v.square().mean()})
            else:
                loss.backward()
            raw = [p.grad.clone() for p in enc.parameters()]
            opt.step()
            changed[epoch].append(any(not torch.equal(r, s) for r, s in zip(raw, seen[-1])))
    assert changed[1] == [False] * 3, f"method {name!r} changed gradients outside the window"
    assert opt.history()["modulated"].tolist()[3:] == [False] * 3
    if m.modulates and name not in ("mslr",):  # MSLR's epoch-0 coefficient is 1
        assert any(changed[0]), f"method {name!r} changed nothing inside the window"
