"""See what the modulation does during training: per-step history, loggers, plots.

- :class:`Recorder`: a sync-free device ring buffer of each step's scores, coefficients,
  skipped flag and extra state; :meth:`Recorder.history` reads it on the host when asked.
- Loggers (:class:`CSVLogger`, :class:`TensorBoardLogger`, :class:`CallbackLogger`, or any
  object with ``write(rows)``) receive the rows every ``every`` steps, in one host read.
- ``python -m mmmod plot RUN`` (:mod:`mmmod.monitor.plot`) draws the score / coefficient
  curves per modality from a CSV log, a TensorBoard folder or the demo's ``results.json``.

Named ``monitor`` rather than ``logging`` so that no ``import logging`` anywhere -- a script run
from inside the package folder, a tool that puts ``mmmod/`` on ``sys.path`` -- can pick it up
instead of the standard library. Nothing here imports matplotlib or tensorboard until a plot is
drawn or a TensorBoard logger is made.
"""
from .attach import attach
from .history import Recorder, RemovableHandle
from .loggers import CallbackLogger, CSVLogger, TensorBoardLogger

__all__ = ["Recorder", "RemovableHandle", "CSVLogger", "TensorBoardLogger", "CallbackLogger",
           "attach"]
