"""MLB: unimodal heads trained with ``mmmod.losses.multi_loss``, their logits giving the scores.

MLB needs a linear head per modality *with gradient* next to the fusion head: its objective is
CE(fused) + sum_m CE(head_m(f_m)), and each modality's coefficient scales that modality's
encoder, its head and its block of the fusion weight (``mmmod.fusion.concat_slices``).
``mmmod.fusion.concat_logits`` does not fit here: its logits are detached (scores only), and
``multi_loss`` refuses them.

    python examples/mlb_unimodal_heads.py [--epochs 8] [--tiny]
"""
import torch

import mmmod
from synthetic import MLPPair, accuracy, arguments, budget, loaders

args = arguments(__doc__.splitlines()[0], epochs=8)
torch.manual_seed(args.seed)
train, val = loaders(seed=args.seed, **budget(args))
model = MLPPair(unimodal_heads=True)
blocks = mmmod.fusion.concat_slices(model.head, [64, 64])  # each modality's columns of the head
opt = mmmod.ModulatedOptimizer(
    torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
    modalities={"audio": [model.audio, model.heads["audio"], blocks[0]],
                "visual": [model.visual, model.heads["visual"], blocks[1]]},
    method="mlb", alpha=0.5)  # default param_filter "all"; slices are always kept

for epoch in range(1 if args.tiny else args.epochs):
    opt.set_epoch(epoch)
    for xa, xv, y in train:
        opt.zero_grad()
        out, (fa, fv) = model(xa, xv)
        heads = {"audio": model.heads["audio"](fa), "visual": model.heads["visual"](fv)}
        opt.observe(heads, y)                         # read without grad
        mmmod.losses.multi_loss(out, heads, y).backward()
        opt.step()
    acc = accuracy(model, val)
    k = {n: round(float(v), 3) for n, v in opt.coefficients.items()}
    print(f"epoch {epoch}: val fused {acc['fused']:.3f}  last k {k}")
