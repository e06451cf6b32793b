"""MSLR and InfoReg: methods that act once per epoch, through ``opt.set_epoch``.

MSLR sets each modality's coefficient from its validation accuracy history, so every epoch
starts with ``opt.set_epoch(epoch, val_acc={...})``; its coefficients stay 1 for a warm-up of
6 epochs (epoch 0 has no accuracy yet, then 5 are collected). InfoReg snapshots the parameters
at ``set_epoch`` and, while a modality's Fisher trace still grows, pulls the leading one back
towards that snapshot; it needs no input besides the epoch.

    python examples/epoch_inputs.py --method mslr [--epochs 9] [--tiny]
    python examples/epoch_inputs.py --method inforeg
"""
import sys

import torch
from torch import nn

import mmmod
from synthetic import MLPPair, accuracy, arguments, budget, loaders

method = "inforeg" if "--method" in sys.argv and sys.argv[sys.argv.index("--method") + 1] == "inforeg" \
    else "mslr"
if "--method" in sys.argv:  # the shared parser does not know --method
    i = sys.argv.index("--method")
    del sys.argv[i:i + 2]
args = arguments(__doc__.splitlines()[0], epochs=9)
torch.manual_seed(args.seed)
train, val = loaders(seed=args.seed, **budget(args))
model = MLPPair()
opt = mmmod.ModulatedOptimizer(
    torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
    modalities={"audio": model.audio, "visual": model.visual},
    method=method, history=10_000)  # both default to param_filter "all"

acc = None
for epoch in range(2 if args.tiny else args.epochs):
    if method == "mslr":  # the accuracies measured before this epoch (none before epoch 0)
        opt.set_epoch(epoch, val_acc=None if acc is None else {"audio": acc["audio"], "visual": acc["visual"]})
    else:
        opt.set_epoch(epoch)
    for xa, xv, y in train:
        opt.zero_grad()
        out, feats = model(xa, xv)
        opt.observe(dict(zip(opt.names, mmmod.fusion.concat_logits(model.head, feats))), y)
        nn.functional.cross_entropy(out, y).backward()
        opt.step()
    acc = accuracy(model, val)
    h = opt.history()
    extra = "ratio" if method == "mslr" else "beta"
    print(f"epoch {epoch}: val fused {acc['fused']:.3f} audio {acc['audio']:.3f} visual "
          f"{acc['visual']:.3f}  {extra} {[round(x, 3) for x in h[extra][-1].tolist()]}")
