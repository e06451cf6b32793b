"""Hugging Face ``Trainer``: ``ModulationCallback`` and :func:`observe` for ``compute_loss``.

The Trainer wraps the optimizer given in ``Trainer(optimizers=(opt, None))`` in accelerate's
``AcceleratedOptimizer`` (which forwards no mmmod method) and never calls the optimizer's
``zero_grad`` (it zeroes the model's gradients), so: observe from ``compute_loss`` with
:func:`observe` (which reaches the ``ModulatedOptimizer`` through the wrapper and records
nothing during evaluation, which runs under ``torch.no_grad()``), and add the callback, which
calls ``set_epoch`` at each epoch's start, drops the scores of a step that the gradient scaler
skipped and of anything observed around an evaluation, and adds each logged step's
coefficients to the Trainer's logs. See docs/integrations.md.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from transformers import TrainerCallback

from ..optim.proxies import unwrap

__all__ = ["ModulationCallback", "observe", "val_acc_from_log"]


def observe(trainer, logits: Any, labels: torch.Tensor) -> None:
    """``compute_loss``'s one line: observe this (micro-)batch on the Trainer's
    ``ModulatedOptimizer``. Nothing while evaluating (grad mode off) or before the Trainer
    built its optimizer (``trainer.evaluate()`` alone)."""
    if trainer.optimizer is None or not torch.is_grad_enabled():
        return
    unwrap(trainer.optimizer).observe(logits, labels)


def val_acc_from_log(keys: Mapping[Any, str]) -> Callable[[Any, Any], dict]:
    """``epoch_inputs`` for MSLR: ``{"val_acc": {modality: value}}`` from the latest
    evaluation in ``state.log_history`` that logged every key of ``keys`` (modality -> metric
    name, e.g. ``"eval_acc_audio"``); nothing before the first evaluation."""
    keys = dict(keys)

    def inputs(args, state) -> dict:
        for row in reversed(state.log_history):
            if all(k in row for k in keys.values()):
                return {"val_acc": {m: float(row[k]) for m, k in keys.items()}}
        return {}
    return inputs


class ModulationCallback(TrainerCallback):
    """Epoch, stale scores and logging for a ``ModulatedOptimizer`` inside a ``Trainer``.

    ``epoch_inputs(args, state) -> dict``: keyword inputs of ``set_epoch`` at each epoch's
    start (e.g. :func:`val_acc_from_log`). ``log``: add ``{prefix}coeff/<modality>`` (and with
    ``log_scores`` ``{prefix}score/<modality>``) to each log of the Trainer (one host read per
    log) -- in ``logs`` as later callbacks see it and in ``state.log_history``.
    """

    def __init__(self, epoch_inputs: Callable[[Any, Any], dict] | None = None, *,
                 log: bool = True, log_scores: bool = False, prefix: str = "mmmod/") -> None:
        if epoch_inputs is not None and not callable(epoch_inputs):
            raise TypeError(f"epoch_inputs must be callable (args, state) -> dict, got "
                            f"{type(epoch_inputs).__name__}")
        self.epoch_inputs = epoch_inputs
        self.log, self.log_scores, self.prefix = log, log_scores, prefix

    def on_epoch_begin(self, args, state, control, optimizer=None, **kwargs):
        opt = unwrap(optimizer)
        inputs = self.epoch_inputs(args, state) if self.epoch_inputs is not None else {}
        # state.epoch is epoch + (steps done) / (steps per epoch): whole at an epoch's start,
        # fractional when resuming inside one
        opt.set_epoch(int(state.epoch + 1e-9) if state.epoch else 0, **inputs)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # accelerate's GradScaler skipped the inner step(): the scores it would have used
        if getattr(optimizer, "step_was_skipped", False):
            unwrap(optimizer).drop_scores()

    def on_evaluate(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            unwrap(optimizer).drop_scores()

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if not self.log or optimizer is None or logs is None or "loss" not in logs:
            return  # only the training logs
        opt = unwrap(optimizer)
        values = {f"{self.prefix}coeff/{n}": float(k) for n, k in opt.coefficients.items()}
        if self.log_scores:
            values.update({f"{self.prefix}score/{n}": float(s) for n, s in opt.scores.items()})
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)
