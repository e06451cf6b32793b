"""``fused=True`` with AdamW: the modulation runs inside the optimizer's update, one pass per
bucket. On CPU the result equals modulating then calling AdamW's own step; this script checks
that on one run and times both.

It pays off on large models (docs/fused.md: 0.65x the unfused OGM-GE + AdamW step on two
ResNet-18 encoders); on a model this small the per-step overhead dominates and it can be slower.

    python examples/fused_adamw.py [--epochs 3] [--tiny]
"""
import copy
import time

import torch
from torch import nn

import mmmod
from synthetic import MLPPair, arguments, budget, loaders

args = arguments(__doc__.splitlines()[0], epochs=3)
torch.manual_seed(args.seed)
base = MLPPair()
runs = {}
for fused in (False, True):
    model = copy.deepcopy(base)  # the same initialisation and (below) batches for both
    train, _ = loaders(seed=args.seed, **budget(args))
    opt = mmmod.ModulatedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        modalities={"audio": model.audio, "visual": model.visual},
        method="ogm_ge", alpha=0.8, param_filter="all", fused=fused)
    t0 = time.perf_counter()
    for epoch in range(1 if args.tiny else args.epochs):
        opt.set_epoch(epoch)
        for xa, xv, y in train:
            opt.zero_grad()
            out, feats = model(xa, xv)
            opt.observe(dict(zip(opt.names, mmmod.fusion.concat_logits(model.head, feats))), y)
            nn.functional.cross_entropy(out, y).backward()
            opt.step()
    runs[fused] = (model, time.perf_counter() - t0, opt.backend)
diff = max((a - b).abs().max().item() for a, b in zip(runs[False][0].parameters(), runs[True][0].parameters()))
print(f"backend {runs[True][2]}: unfused {runs[False][1]:.2f}s, fused {runs[True][1]:.2f}s; "
      f"max parameter difference {diff:.3g}")  # 0 with the cpu backend (bitwise equal)
