"""OGM-GE on a pair of MLP encoders (the README Quick start, with evaluation).

OGM-GE's default ``param_filter="conv"`` keeps 4-D conv weights only, as the authors' code does;
an MLP has none, so pass ``param_filter="all"`` (every tensor of each encoder) or ``"matrix"``.

    python examples/ogm_ge_mlp.py [--epochs 8] [--tiny]
"""
import torch
from torch import nn

import mmmod
from synthetic import MLPPair, accuracy, arguments, budget, loaders

args = arguments(__doc__.splitlines()[0], epochs=8)
torch.manual_seed(args.seed)
train, val = loaders(seed=args.seed, **budget(args))
model = MLPPair()
opt = mmmod.ModulatedOptimizer(
    torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
    modalities={"audio": model.audio, "visual": model.visual},
    method="ogm_ge", alpha=0.8, param_filter="all", history=10_000)

for epoch in range(1 if args.tiny else args.epochs):
    opt.set_epoch(epoch)
    for xa, xv, y in train:
        opt.zero_grad()
        out, feats = model(xa, xv)
        # scores: each modality's share of the fusion head (detached; for observe() only)
        opt.observe(dict(zip(opt.names, mmmod.fusion.concat_logits(model.head, feats))), y)
        nn.functional.cross_entropy(out, y).backward()
        opt.step()  # OGM-GE damps the leading modality's gradients, then SGD steps
    acc = accuracy(model, val)
    k = {n: round(float(v), 3) for n, v in opt.coefficients.items()}
    print(f"epoch {epoch}: val fused {acc['fused']:.3f} audio {acc['audio']:.3f} "
          f"visual {acc['visual']:.3f}  last k {k}")

h = opt.history()
print(f"backend {opt.backend}; {h['coeff'].shape[0]} steps recorded; mean k audio "
      f"{h['coeff'][:, 0].mean():.3f}, visual {h['coeff'][:, 1].mean():.3f}")
