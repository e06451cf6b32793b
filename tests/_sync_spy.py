"""The host-read spy of the sync-free tests: every way of pulling a tensor value into Python,
instrumented for calls made from mmmod's own files (tests/optim/test_sync_free.py,
tests/monitor/test_signals.py)."""
import os
import sys

import torch

from mmmod import functional
from _models import TwoEncoder, batch, make, train_step

READS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "cpu", "numpy")
# the Triton interpreter moves tensors to numpy by design; on a GPU the suite covers triton
MMMOD_DIR = os.path.dirname(functional.__file__)


def check_no_reads(monkeypatch, **kw):
    model = TwoEncoder()
    opt, names = make(model, torch.optim.AdamW(model.parameters(), lr=1e-3), **kw)
    train_step(model, opt, names, *batch())  # warm-up outside the instrumented region
    calls = spy_reads(monkeypatch)
    train_step(model, opt, names, *batch())
    monkeypatch.undo()
    assert calls == [], f"host reads during observe/step: {calls}"


def spy_reads(monkeypatch):
    """Instrument every host read by mmmod's code; returns the list the reads are appended to."""
    calls = []
    for attr in READS:
        orig = getattr(torch.Tensor, attr)

        def spy(self, *a, _orig=orig, _attr=attr, **k):
            caller = sys._getframe(1).f_code.co_filename
            if MMMOD_DIR in caller:  # the inner optimizer's own CPU reads are not ours
                calls.append(f"{_attr} in {caller}:{sys._getframe(1).f_lineno}")
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, attr, spy)
    monkeypatch.setattr(functional, "check_labels_in_range", lambda *a, **k: None)
    return calls
