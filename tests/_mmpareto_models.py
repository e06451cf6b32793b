"""The small MMPareto model and training helpers the multi-objective tests share
(tests/methods/test_mmpareto.py, test_objectives*.py, test_mmpareto_ddp.py,
tests/ops/test_combine_op.py): the authors' layout in small (encoders ``<name>_net``, a concat head
``head``, unimodal heads ``head_<name>``)."""
import torch
from torch import nn

import mmmod

NAMES2 = ["audio", "visual"]
NAMES3 = ["audio", "visual", "text"]


class AVNet(nn.Module):
    """The authors' model layout in small: encoders ``<name>_net``, a concat head ``head`` and
    unimodal heads ``head_<name>``. ``conflict``: the first unimodal head starts as minus its
    columns of the fused head, so that modality's gradients conflict (the min-norm branch)."""

    def __init__(self, names=NAMES2, classes=4, width=6, conflict=True):
        super().__init__()
        self.names = list(names)
        for i, n in enumerate(self.names):
            enc = nn.Sequential(nn.Conv1d(1 + i, 3, 3), nn.ReLU(), nn.Flatten(),
                                nn.Linear(3 * 6, width))
            setattr(self, f"{n}_net", enc)
            setattr(self, f"head_{n}", nn.Linear(width, classes))
        self.head = nn.Linear(width * len(self.names), classes)
        if conflict:
            with torch.no_grad():
                getattr(self, f"head_{self.names[0]}").weight.copy_(-self.head.weight[:, :width])

    def forward(self, *xs):
        feats = [getattr(self, f"{n}_net")(x) for n, x in zip(self.names, xs)]
        return [self.head(torch.cat(feats, 1))] + [getattr(self, f"head_{n}")(f)
                                                  for n, f in zip(self.names, feats)]


def data(names, steps, seed, b=8, classes=4):
    g = torch.Generator().manual_seed(seed)
    return [([torch.randn(b, 1 + i, 8, generator=g) for i in range(len(names))],
             torch.randint(0, classes, (b,), generator=g)) for _ in range(steps)]


def losses_of(model, xs, y, names, scale=1.0):
    outs = model(*xs)
    ls = [nn.functional.cross_entropy(o, y) * scale for o in outs]
    return dict(zip(["multimodal"] + list(names), ls))


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


def make_opt(model, names, backend="torch", inner=None, **kw):
    return mmmod.ModulatedOptimizer(inner or sgd(model),
                                    {n: getattr(model, f"{n}_net") for n in names},
                                    method="mmpareto", backend=backend, **kw)


def mmmod_step(model, opt, xs, y, names):
    opt.zero_grad()
    opt.backward(losses_of(model, xs, y, names))
    opt.step()


def max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
