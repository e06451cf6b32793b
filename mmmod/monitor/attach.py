"""Give an existing ``ModulatedOptimizer`` a recorder (``history=`` does it at construction).

``attach(opt, recorder)`` installs ``recorder`` (or a new one of ``capacity`` rows) as the
optimizer's own: every later ``step()`` appends a row (no host read), ``opt.history()`` and
``opt.add_logger`` use it. Useful to share one pre-configured recorder (loggers already
added) or to switch history on after the optimizer was built.
"""
from __future__ import annotations

from .history import Recorder


def attach(opt, recorder: Recorder | None = None, capacity: int = 1024) -> Recorder:
    """Make every ``opt.step()`` append a row to ``recorder`` (made with ``capacity`` if None)."""
    if recorder is None:
        recorder = Recorder(opt.names, capacity)
    if list(recorder.names) != [str(n) for n in opt.names]:
        raise ValueError(f"recorder modalities {recorder.names} differ from the optimizer's "
                         f"{opt.names}")
    if opt.recorder is not None:
        raise ValueError("this optimizer already records its steps (history=N or an earlier "
                         "attach()); use opt.recorder")
    opt.run_state.recorder = recorder  # the holder a framework proxy shares (mmmod.optim.state)
    return recorder
