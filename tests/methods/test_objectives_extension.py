"""The extension point: a combine rule registered from outside the package (PCGrad restricted
to each modality's encoder block, the README's example) trains through ``opt.backward`` and
equals the same rule written by hand over separately computed per-objective gradients."""
import copy

import pytest
import torch

import mmmod
from _mmpareto_models import NAMES2, AVNet, data, losses_of, max_diff, sgd


class BlockPCGrad(mmmod.methods.Method):
    """PCGrad (Yu et al., 2020) per modality block: when the fused and unimodal gradients of an
    encoder conflict (negative inner product), each is projected onto the other's normal plane;
    the block's gradient is the sum of the two."""
    name = "block_pcgrad"
    combines_objectives = True
    scales = False         # no coefficient scaling: combine_ is the rule
    needs_scores = False   # no observe() needed
    default_filter = "all"

    def coefficients(self, scores, *, alpha, beta_max, state):
        return torch.ones_like(scores, dtype=torch.float32)

    @torch.no_grad()
    def combine_(self, fused, summed, state, *, alpha, names, fused_scale=None, backend=None):
        for a_m, s_m in zip(fused, summed):  # one modality's block
            a = [x.double() * (1 if fused_scale is None else fused_scale) for x in a_m]
            b = [s.double() - x for s, x in zip(s_m, a)]  # the unimodal objective's gradient
            ab = sum((x * y).sum() for x, y in zip(a, b))
            aa = sum((x * x).sum() for x in a)
            bb = sum((y * y).sum() for y in b)
            conflict = ab < 0
            ca = torch.where(conflict, ab / bb, torch.zeros_like(ab))  # a <- a - (a.b/|b|^2) b
            cb = torch.where(conflict, ab / aa, torch.zeros_like(ab))  # b <- b - (a.b/|a|^2) a
            for s, x, y in zip(s_m, a, b):
                s.copy_((x - ca * y + y - cb * x).to(s.dtype))


@pytest.fixture
def block_pcgrad():
    mmmod.methods.register(BlockPCGrad())
    yield
    mmmod.methods.unregister("block_pcgrad")


def by_hand(model, opt, xs, y):
    """PCGrad on each encoder from one autograd.grad per objective; heads: the summed loss."""
    opt.zero_grad()
    ls = losses_of(model, xs, y, NAMES2)
    for n in NAMES2:
        enc = list(getattr(model, f"{n}_net").parameters())
        a = torch.autograd.grad(ls["multimodal"], enc, retain_graph=True)
        b = torch.autograd.grad(ls[n], enc, retain_graph=True)
        a = [x.double() for x in a]
        b = [x.double() for x in b]
        ab = sum((x * y).sum() for x, y in zip(a, b))
        if ab < 0:
            aa, bb = sum((x * x).sum() for x in a), sum((x * x).sum() for x in b)
            a, b = [x - ab / bb * y for x, y in zip(a, b)], [y - ab / aa * x for x, y in zip(a, b)]
        for p, x, y in zip(enc, a, b):
            p._pc = (x + y).float()
    sum(ls.values()).backward()
    for n in NAMES2:
        for p in getattr(model, f"{n}_net").parameters():
            p.grad = p._pc
            del p._pc
    opt.step()


def test_an_outside_combine_rule_trains_by_name(seed, block_pcgrad):
    torch.manual_seed(seed)
    a = AVNet()
    b = copy.deepcopy(a)
    opt = mmmod.ModulatedOptimizer(sgd(a), {"audio": a.audio_net, "visual": a.visual_net},
                                   method="block_pcgrad")
    ob = sgd(b)
    conflicts = 0
    for xs, y in data(NAMES2, 6, seed):
        opt.zero_grad()
        opt.backward(losses_of(a, xs, y, NAMES2))
        g_mm = [g.clone() for g in opt._objectives.fused[0]]
        g_sum = [p.grad.clone() for p in a.audio_net.parameters()]
        opt.step()
        # PCGrad's property on the conflicting audio block: the result agrees with both
        # objectives' gradients (non-negative inner products)
        dot = lambda u, v: sum((x.double() * y.double()).sum() for x, y in zip(u, v))  # noqa: E731
        g_a = [s - x for s, x in zip(g_sum, g_mm)]
        if dot(g_mm, g_a) < 0:
            conflicts += 1
            new = [p.grad for p in a.audio_net.parameters()]
            assert dot(new, g_mm) >= -1e-6 and dot(new, g_a) >= -1e-6
        by_hand(b, ob, xs, y)
    assert conflicts > 0
    assert max_diff(a, b) < 1e-5
    # not the plain summed-loss run
    torch.manual_seed(seed)
    c = AVNet()
    oc = sgd(c)
    for xs, y in data(NAMES2, 6, seed):
        oc.zero_grad()
        sum(losses_of(c, xs, y, NAMES2).values()).backward()
        oc.step()
    assert max_diff(a, c) > 1e-4


def test_a_rule_without_combine_is_refused_at_step(seed):
    class Declares(mmmod.methods.Method):
        name = "declares_only"
        combines_objectives = True
        scales = False
        needs_scores = False

        def coefficients(self, scores, *, alpha, beta_max, state):
            return torch.ones_like(scores)
    mmmod.methods.register(Declares())
    try:
        model = AVNet()
        opt = mmmod.ModulatedOptimizer(sgd(model), {"audio": model.audio_net,
                                                    "visual": model.visual_net},
                                       method="declares_only")
        xs, y = data(NAMES2, 1, seed)[0]
        opt.backward(losses_of(model, xs, y, NAMES2))
        with pytest.raises(NotImplementedError, match="defines no combine_"):
            opt.step()
    finally:
        mmmod.methods.unregister("declares_only")
