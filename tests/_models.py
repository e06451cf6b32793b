"""Tiny two-encoder model shared by the optimizer tests."""
import torch
from torch import nn

import mmmod


class TwoEncoder(nn.Module):
    def __init__(self, classes=5, width=4, m=2):
        super().__init__()
        self.encoders = nn.ModuleList(
            nn.Sequential(nn.Conv2d(1 + i, width, 3), nn.ReLU(), nn.Conv2d(width, width, 3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten()) for i in range(m))
        self.head = nn.Linear(width * m, classes)

    def forward(self, xs):
        feats = [enc(x) for enc, x in zip(self.encoders, xs)]
        return self.head(torch.cat(feats, 1)), feats


def batch(b=6, m=2, classes=5, g=None):
    xs = [torch.randn(b, 1 + i, 9, 9, generator=g) for i in range(m)]
    return xs, torch.randint(0, classes, (b,), generator=g)


def make(model, inner, m=2, **kw):
    names = ["audio", "visual", "text", "depth"][:m]
    return mmmod.ModulatedOptimizer(inner, dict(zip(names, model.encoders)), **kw), names


def train_step(model, opt, names, xs, y, scaler=None):
    opt.zero_grad()
    out, feats = model(xs)
    opt.observe(dict(zip(names, mmmod.fusion.concat_logits(model.head, feats))), y)
    loss = nn.functional.cross_entropy(out, y)
    if opt._method.combines_objectives:  # per-objective gradients: opt.backward(losses)
        return _multi_objective_step(model, opt, names, feats, loss, y, scaler)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return loss


def unimodal_logits(head: nn.Linear, feats):
    """Each modality's share of the concat head, differentiable: z_m = f_m W[:, cols(m)]^T +
    b / M (mmmod.fusion.concat_logits without no_grad), reaching encoder m only."""
    zs, start = [], 0
    for f in feats:
        zs.append(f @ head.weight[:, start:start + f.shape[1]].T + head.bias / len(feats))
        start += f.shape[1]
    return zs


def _multi_objective_step(model, opt, names, feats, loss, y, scaler):
    losses = {"multimodal": loss}
    for n, z in zip(names, unimodal_logits(model.head, feats)):
        losses[n] = nn.functional.cross_entropy(z, y)
    if scaler is None:
        opt.backward(losses)
        opt.step()
    else:
        opt.backward(losses, scaler=scaler)
        scaler.step(opt)
        scaler.update()
    return loss
