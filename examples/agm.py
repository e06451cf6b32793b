"""AGM: coefficients from running means of each modality's unimodal loss (its scores are
per-sample NLL, not probabilities; ``mmmod plot`` titles them so).

AGM's default filter is ``"matrix"`` (every tensor of 2+ dims, as BalanceBenchmark), which
suits MLP encoders as they are.

    python examples/agm.py [--epochs 8] [--tiny]
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
    method="agm", history=10_000)  # alpha: AGM's default 1.5

for epoch in range(1 if args.tiny else args.epochs):
    opt.set_epoch(epoch)
    for xa, xv, y in train:
        opt.zero_grad()
        out, feats = model(xa, xv)
        opt.observe(dict(zip(opt.names, mmmod.fusion.concat_logits(model.head, feats))), y)
        nn.functional.cross_entropy(out, y).backward()
        opt.step()
    acc = accuracy(model, val)
    k = {n: round(float(v), 3) for n, v in opt.coefficients.items()}
    print(f"epoch {epoch}: val fused {acc['fused']:.3f}  last k {k}")
h = opt.history()
mean = h["score"][-1] / h["samples"][-1]  # the step's NLL sums over its samples
print("last step's mean NLL:", {n: round(float(v), 3) for n, v in zip(opt.names, mean)},
      " running means:", [round(x, 3) for x in h["score_mean"][-1].tolist()])
