"""PyTorch Lightning: ``ModulationCallback`` and the ``ModulatedModule`` mixin.

``training_step`` hands over the per-modality logits in one line, ``self.modulate(logits,
labels)``; the callback observes them at ``on_before_backward``, i.e. after Lightning's
``zero_grad`` (which its automatic optimization calls between ``training_step`` and the
backward, and only on the first micro-batch of an accumulation window), once per micro-batch,
in automatic and manual optimization alike. It calls ``set_epoch`` at each training epoch's
start (``epoch_inputs`` supplies a method's per-epoch inputs, e.g. MSLR's validation
accuracies: :func:`val_acc_from_metrics`) and logs each step's coefficients (and scores) with
``LightningModule.log``. Every optimizer of the Trainer that is (or wraps) a
``ModulatedOptimizer`` is handled; see docs/integrations.md.

Imports ``lightning.pytorch`` (the ``lightning`` package), else ``pytorch_lightning``: the
callback must come from the package whose ``Trainer`` runs it.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl

from ..optim.proxies import unwrap

__all__ = ["ModulatedModule", "ModulationCallback", "val_acc_from_metrics"]

_PENDING = "_mmmod_pending"  # the module's hand-over list of (optimizer, logits, labels)


class ModulatedModule:
    """Mixin for a ``LightningModule`` (list it first: ``class Net(ModulatedModule,
    L.LightningModule)``): ``self.modulate(logits, labels)`` in ``training_step``."""

    def modulate(self, logits: Any, labels: torch.Tensor, optimizer: Any = None) -> None:
        """Hand over this (micro-)batch's per-modality logits (a dict by modality name, or a
        sequence in the optimizer's modality order) and labels; ``ModulationCallback``
        observes them just before the backward. ``optimizer``: which one, when the Trainer has
        several ``ModulatedOptimizer``. Under ``torch.no_grad()`` (a validation step sharing
        the code) nothing is handed over."""
        if not torch.is_grad_enabled():
            return
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and not any(isinstance(c, ModulationCallback)
                                           for c in trainer.callbacks):
            raise RuntimeError("self.modulate() needs mmmod.integrations.lightning."
                               "ModulationCallback() in Trainer(callbacks=[...]) to observe the "
                               "logits (docs/integrations.md)")
        self.__dict__.setdefault(_PENDING, []).append((optimizer, logits, labels))


def val_acc_from_metrics(keys: Mapping[Any, str]) -> Callable[[Any, Any], dict]:
    """``epoch_inputs`` for MSLR: ``{"val_acc": {modality: trainer.callback_metrics[key]}}``,
    the accuracies the previous epoch's validation logged under ``keys`` (modality -> metric
    name); nothing before the first validation."""
    keys = dict(keys)

    def inputs(trainer, pl_module) -> dict:
        metrics = trainer.callback_metrics
        if not all(k in metrics for k in keys.values()):
            return {}
        return {"val_acc": {m: float(metrics[k]) for m, k in keys.items()}}  # once per epoch
    return inputs


class ModulationCallback(pl.Callback):
    """Observe handed-over logits after Lightning's ``zero_grad``, set the epoch, log.

    ``epoch_inputs(trainer, pl_module) -> dict``: keyword inputs of ``set_epoch`` at each
    training epoch's start (e.g. :func:`val_acc_from_metrics`). ``log``: log each step's
    coefficients as ``{prefix}coeff/<modality>`` (``log_scores``: the scores too, as
    ``{prefix}score/<modality>``) through ``pl_module.log`` (on_step; ``prog_bar`` passed on).
    """

    def __init__(self, epoch_inputs: Callable[[Any, Any], dict] | None = None, *,
                 log: bool = True, log_scores: bool = False, prog_bar: bool = False,
                 prefix: str = "mmmod/") -> None:
        if epoch_inputs is not None and not callable(epoch_inputs):
            raise TypeError(f"epoch_inputs must be callable (trainer, pl_module) -> dict, got "
                            f"{type(epoch_inputs).__name__}")
        self.epoch_inputs = epoch_inputs
        self.log, self.log_scores, self.prog_bar, self.prefix = log, log_scores, prog_bar, prefix
        self._logged_step: dict[int, int] = {}

    @staticmethod
    def modulated(trainer) -> list:
        """The ``ModulatedOptimizer`` behind each of the Trainer's optimizers that has one."""
        found = []
        for o in trainer.optimizers:
            try:
                found.append(unwrap(o))
            except TypeError:
                continue
        return found

    def _target(self, trainer, optimizer):
        if optimizer is not None:
            return unwrap(optimizer)
        mods = self.modulated(trainer)
        if len(mods) != 1:
            raise RuntimeError(f"the Trainer has {len(mods)} ModulatedOptimizer: pass "
                               f"optimizer= to self.modulate()")
        return mods[0]

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        inputs = self.epoch_inputs(trainer, pl_module) if self.epoch_inputs is not None else {}
        for opt in self.modulated(trainer):
            opt.set_epoch(trainer.current_epoch, **inputs)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        pending = pl_module.__dict__.pop(_PENDING, None)
        for optimizer, logits, labels in pending or ():
            self._target(trainer, optimizer).observe(logits, labels)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # logits handed over without a backward (a skipped batch) go with their batch
        pl_module.__dict__.pop(_PENDING, None)
        if not self.log:
            return
        for i, opt in enumerate(self.modulated(trainer)):
            if self._logged_step.get(i) == opt.step_count or not opt.coefficients:
                continue  # accumulating, or no step yet: nothing new to log
            self._logged_step[i] = opt.step_count
            tag = self.prefix if i == 0 else f"{self.prefix}{i}/"
            values = {f"{tag}coeff/{n}": k for n, k in opt.coefficients.items()}
            if self.log_scores:
                values.update({f"{tag}score/{n}": s for n, s in opt.scores.items()})
            pl_module.log_dict(values, on_step=True, on_epoch=False, prog_bar=self.prog_bar)

    def on_validation_start(self, trainer, pl_module) -> None:
        pl_module.__dict__.pop(_PENDING, None)
