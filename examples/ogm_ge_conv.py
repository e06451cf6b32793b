"""OGM-GE on conv encoders with its default filter (4-D conv weights, as the authors' code),
logging scores and coefficients to a CSV that ``mmmod plot`` draws.

    python examples/ogm_ge_conv.py [--epochs 6] [--tiny]
    python -m mmmod plot examples_out/ogm_ge_conv.csv   # (--out)
"""
import os

import torch
from torch import nn

import mmmod
from mmmod.monitor import CSVLogger
from synthetic import ConvPair, accuracy, arguments, budget, loaders

args = arguments(__doc__.splitlines()[0], epochs=6)
torch.manual_seed(args.seed)
train, val = loaders(seed=args.seed, image=True, **budget(args))
model = ConvPair()
opt = mmmod.ModulatedOptimizer(
    torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
    modalities={"audio": model.audio, "visual": model.visual},
    method="ogm_ge", alpha=0.8,
    modulation_ends=max(args.epochs // 2 - 1, 0))  # the official script modulates the first half
print("modulated tensors:", {n: len(ps) for n, ps in zip(opt.names, opt.param_names)})
log = CSVLogger(os.path.join(args.out, "ogm_ge_conv.csv"))
handle = opt.add_logger(log, every=20)

for epoch in range(1 if args.tiny else args.epochs):
    opt.set_epoch(epoch)
    for xa, xv, y in train:
        opt.zero_grad()
        out, feats = model(xa, xv)
        opt.observe(dict(zip(opt.names, mmmod.fusion.concat_logits(model.head, feats))), y)
        nn.functional.cross_entropy(out, y).backward()
        opt.step()
    acc = accuracy(model, val)
    print(f"epoch {epoch}: val fused {acc['fused']:.3f} audio {acc['audio']:.3f} visual {acc['visual']:.3f}")
handle.remove()  # flushes the last rows and detaches the logger
log.close()
print(f"wrote {log.path}")
