"""A two-modality LightningModule for the Lightning integration tests (imported only where
Lightning is installed; also run as the training script of the 2-process DDP test)."""
import sys

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mmmod
from _models import TwoEncoder
from mmmod.integrations.lightning import ModulatedModule, ModulationCallback

B, N = 8, 32  # batch size, samples per epoch


def data(seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 9, 9, generator=g), torch.randn(n, 2, 9, 9, generator=g),
                         torch.randint(0, 5, (n,), generator=g))


def loader(seed=0, n=N):
    return DataLoader(data(seed, n), batch_size=B, shuffle=False)


class Net(ModulatedModule, L.LightningModule):
    def __init__(self, method="ogm_ge", manual=False, proxy_calls=False, inf_at=None,
                 direct=False, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.net = TwoEncoder()
        self.method, self.kw = method, dict(alpha=0.8, backend="torch", history=64, **kw)
        self.automatic_optimization = not manual
        self.proxy_calls = proxy_calls  # manual: observe/set_epoch on self.optimizers() itself
        self.direct = direct  # automatic: self.optimizers().observe() in training_step
        self.inf_at = inf_at  # the global step whose gradient gets an inf (GradScaler skip)
        self.seen = 0

    def configure_optimizers(self):
        return mmmod.ModulatedOptimizer(
            torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9),
            {"audio": self.net.encoders[0], "visual": self.net.encoders[1]},
            method=self.method, **self.kw)

    def training_step(self, batch, batch_idx):
        xa, xv, y = batch
        out, feats = self.net([xa, xv])
        logits = mmmod.fusion.concat_logits(self.net.head, feats)
        loss = nn.functional.cross_entropy(out, y)
        if self.automatic_optimization and self.direct:  # no callback: the core's zero_grad rule
            self.optimizers().observe({"audio": logits[0], "visual": logits[1]}, y)
            return loss
        if self.automatic_optimization:
            self.modulate({"audio": logits[0], "visual": logits[1]}, y)  # the one line
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        if self.proxy_calls:
            opt.set_epoch(self.current_epoch)
            opt.observe({"audio": logits[0], "visual": logits[1]}, y)
        else:
            self.modulate({"audio": logits[0], "visual": logits[1]}, y)
        self.manual_backward(loss)
        opt.step()
        return loss

    def on_train_epoch_start(self):
        if self.direct:  # through the LightningOptimizer proxy
            self.optimizers().set_epoch(self.current_epoch)

    def on_after_backward(self):
        self.seen += 1
        if self.inf_at is not None and self.seen == self.inf_at:
            self.net.encoders[0][0].weight.grad[0, 0, 0, 0] = float("inf")

    def validation_step(self, batch, batch_idx):
        xa, xv, y = batch
        out, feats = self.net([xa, xv])
        logits = mmmod.fusion.concat_logits(self.net.head, feats)
        self.modulate({"audio": logits[0], "visual": logits[1]}, y)  # no_grad: records nothing
        for name, z in zip(("audio", "visual"), logits):
            self.log(f"val_acc_{name}", (z.argmax(1) == y).float().mean())


def trainer(tmp=None, callbacks=None, **kw):
    base = dict(accelerator="cpu", devices=1, max_epochs=2, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                num_sanity_val_steps=0, deterministic=True, default_root_dir=tmp)
    base.update(kw)
    return L.Trainer(callbacks=[ModulationCallback()] if callbacks is None else callbacks, **base)


def plain_loop(epochs=2, accumulate=1, method="ogm_ge", **kw):
    """The same training as a plain loop: the reference Lightning must match bitwise."""
    model = Net(method, **kw)
    opt = model.configure_optimizers()
    batches = list(loader())
    for epoch in range(epochs):
        opt.set_epoch(epoch)
        for i in range(0, len(batches), accumulate):
            opt.zero_grad()
            for xa, xv, y in batches[i:i + accumulate]:
                out, feats = model.net([xa, xv])
                logits = mmmod.fusion.concat_logits(model.net.head, feats)
                opt.observe({"audio": logits[0], "visual": logits[1]}, y)
                loss = nn.functional.cross_entropy(out, y)
                (loss / accumulate if accumulate > 1 else loss).backward()
            opt.step()
    return model, opt


if __name__ == "__main__":  # 2-process DDP on CPU: python _lightning_models.py OUT
    out = sys.argv[1]
    model = Net()
    t = trainer(strategy="ddp", devices=2, max_epochs=1)
    t.fit(model, loader(n=64))
    opt = mmmod.unwrap(t.optimizers[0])
    torch.save({"params": [p.detach().clone() for p in model.parameters()],
                "samples": opt.history()["samples"], "coeff": opt.history()["coeff"]},
               f"{out}/rank{t.global_rank}.pt")
