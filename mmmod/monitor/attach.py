"""Record a ``ModulatedOptimizer``'s steps from outside it (interim wiring).

``attach(opt, recorder)`` wraps ``opt.observe``/``opt.zero_grad``/``opt.step`` on the instance
so that every step ends with one :meth:`Recorder.record`. The optimizer will take a
``history=`` argument and call the recorder itself; until then the demo and the tests use this.
It reads the optimizer's per-step tensors (no host read): the summed scores and the final
coefficients; under ``method="none"`` the scores gathered by ``observe`` and coefficients of 1.
"""
from __future__ import annotations

import torch

from .history import Recorder


def attach(opt, recorder: Recorder | None = None, capacity: int = 1024) -> Recorder:
    """Make every ``opt.step()`` append a row to ``recorder`` (made with ``capacity`` if None)."""
    if recorder is None:
        recorder = Recorder(opt.names, capacity)
    if list(recorder.names) != list(opt.names):
        raise ValueError(f"recorder modalities {recorder.names} differ from the optimizer's "
                         f"{opt.names}")
    if getattr(opt, "_mmmod_recorder", None) is not None:
        raise ValueError("this optimizer already has a recorder attached")
    observe, zero_grad, step = opt.observe, opt.zero_grad, opt.step
    samples = [0]  # samples observed since the last zero_grad/step (host metadata, no sync)

    def observe_and_count(logits, labels):
        observe(logits, labels)
        samples[0] += int(labels.shape[0])

    def zero_grad_and_reset(*args, **kwargs):
        zero_grad(*args, **kwargs)
        samples[0] = 0

    method = getattr(opt, "_method", None)  # the method object (registry), if this version has one
    modulates = method.modulates if method is not None else opt.method != "none"

    def step_and_record(closure=None):
        pending, before = opt._score_sum, opt._coeffs  # a method that does not modulate
        loss = step(closure)                           # computes no coefficients: keep its scores
        if not modulates:
            scores = pending
            coeffs = None if pending is None else torch.ones_like(pending, dtype=torch.float32)
        elif opt._coeffs is not before:  # this step computed coefficients
            scores, coeffs = opt._scores, opt._coeffs
        else:
            scores = coeffs = None
        if scores is not None:
            extra = None
            if method is not None and hasattr(method, "log_values"):
                extra = dict(method.log_values(opt._method_state)) or None  # e.g. running means
            recorder.record(scores, coeffs, extra=extra, step=opt.step_count - 1,
                            epoch=opt.epoch, samples=samples[0] * opt._world(),
                            modulated=modulates and opt.in_window())
        samples[0] = 0
        return loss

    opt.observe, opt.zero_grad, opt.step = observe_and_count, zero_grad_and_reset, step_and_record
    opt._mmmod_recorder = recorder
    return recorder
