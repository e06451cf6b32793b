"""Loggers never break a step's bookkeeping: an unwritable CSV path is refused at
``add_logger``; a logger failing later is warned about, its rows kept and retried, while the
step counter advances and the scores clear; an explicit flush re-raises. CSVLogger closes its
file (``close()``, a context manager, or when collected: no ResourceWarning). ``history=N``
reserves no N rows up front."""
import csv
import gc
import os
import tracemalloc
import warnings

import pytest
import torch

from mmmod.monitor import CallbackLogger, CSVLogger, Recorder, TensorBoardLogger
from _models import TwoEncoder, batch, make, train_step

pytestmark = pytest.mark.filterwarnings("ignore:mmmod. no fused backend")


def _opt(**kw):
    torch.manual_seed(0)
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.05), method="ogm_ge",
                      backend="torch", **kw)
    return model, opt, names


@pytest.mark.parametrize("where", ["under_a_file", "a_folder"])
def test_unwritable_csv_path_is_refused_at_add_logger(tmp_path, where):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    path = blocker / "sub" / "run.csv" if where == "under_a_file" else tmp_path
    model, opt, names = _opt()
    with pytest.raises((ValueError, PermissionError), match="CSVLogger"):
        opt.add_logger(CSVLogger(path), every=2)
    assert opt.recorder.loggers == []
    train_step(model, opt, names, *batch())  # the optimizer is untouched by the refusal
    assert opt.step_count == 1


class Flaky:
    """Fails its first ``fails`` writes, then records what it gets."""

    def __init__(self, fails):
        self.fails, self.rows = fails, []

    def write(self, rows):
        if self.fails:
            self.fails -= 1
            raise OSError("disk full")
        self.rows.extend(rows)


def test_a_failing_logger_warns_keeps_its_rows_and_the_step_completes():
    model, opt, names = _opt(history=16)
    flaky, good = Flaky(fails=2), []
    opt.add_logger(flaky, every=2)
    opt.register_log_hook(good.extend, every=2)
    for i in range(8):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_step(model, opt, names, *batch())
        assert opt.step_count == i + 1 and opt._score_sum is None and opt._observed == 0
        failed = i in (1, 3)  # deliveries at steps 2 and 4 fail (rows kept), step 6's succeeds
        assert any("disk full" in str(w.message) for w in caught) == failed
    assert [r["step"] for r in flaky.rows] == list(range(8))  # nothing lost, nothing twice
    assert [r["step"] for r in good] == list(range(8))  # the other logger unaffected
    assert len(opt.history()["step"]) == 8


def test_an_explicit_flush_reraises_after_delivering_the_others():
    model, opt, names = _opt(history=8)
    flaky, good = Flaky(fails=1), []
    opt.add_logger(flaky, every=100)
    opt.register_log_hook(good.extend, every=100)
    for _ in range(3):
        train_step(model, opt, names, *batch())
    with pytest.raises(OSError, match="disk full"):
        opt.flush_logs()
    assert len(good) == 3 and flaky.rows == []
    opt.flush_logs()
    assert [r["step"] for r in flaky.rows] == [0, 1, 2]


def test_a_failing_record_still_completes_the_bookkeeping(monkeypatch):
    model, opt, names = _opt(history=8)

    def broken(*a, **k):
        raise RuntimeError("recorder broke")
    monkeypatch.setattr(opt.recorder, "record", broken)
    with pytest.raises(RuntimeError, match="recorder broke"):
        train_step(model, opt, names, *batch())
    assert opt.step_count == 1 and opt._score_sum is None and opt._observed == 0
    monkeypatch.undo()
    train_step(model, opt, names, *batch())
    assert opt.step_count == 2


def test_csv_logger_closes_as_a_context_manager_and_on_close(tmp_path):
    path = tmp_path / "run.csv"
    with CSVLogger(path) as log:
        log.write([{"step": 0, "x": 1.0}])
        assert log._file is not None and not log._file.closed
        f = log._file
    assert f.closed and log._file is None
    log.write([{"step": 1, "x": 2.0}])  # a write after close appends under the same header
    log.close()
    with open(path, newline="") as fh:
        assert list(csv.reader(fh)) == [["step", "x"], ["0", "1.0"], ["1", "2.0"]]


def test_recorder_close_closes_the_csv_file(tmp_path):
    model, opt, names = _opt()
    log = CSVLogger(tmp_path / "run.csv")
    opt.add_logger(log, every=1)
    train_step(model, opt, names, *batch())
    f = log._file
    opt.recorder.close()
    assert f.closed and opt.recorder.loggers == []


def test_an_unclosed_csv_logger_gives_no_resource_warning(tmp_path):
    log = CSVLogger(tmp_path / "run.csv")
    log.write([{"step": 0}])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del log
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert os.path.getsize(tmp_path / "run.csv") > 0


def test_tensorboard_logger_is_a_context_manager():
    class Writer:
        def __init__(self):
            self.scalars, self.flushed = [], 0

        def add_scalar(self, tag, v, step):
            self.scalars.append((tag, v, step))

        def flush(self):
            self.flushed += 1
    w = Writer()
    with TensorBoardLogger(writer=w) as tb:
        tb.write([{"step": 3, "score/a": 1.0}])
    assert w.scalars == [("mmmod/score/a", 1.0, 3)] and w.flushed == 1


def test_history_n_reserves_no_rows_up_front():
    tracemalloc.start()
    try:
        rec = Recorder(["a", "b"], 5_000_000)
        size, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size < 1_000_000, size  # [None] * 5e6 alone would be 40 MB
    for i in range(3000):  # rows in blocks as steps come, contents unchanged
        rec.record(torch.tensor([i, -i], dtype=torch.float32), torch.ones(2), step=i)
    assert rec._buf.shape[0] < 5000
    h = rec.history()
    assert h["step"].tolist() == list(range(3000))
    assert h["score"][:, 0].tolist() == [float(i) for i in range(3000)]


def test_a_growing_ring_wraps_and_resizes_as_before():
    rec = Recorder(["a", "b"], 1500)
    got = []
    for i in range(4000):
        rec.record(torch.tensor([i, 0.0]), torch.ones(2))
        if i == 1200:
            rec.add_logger(CallbackLogger(got.extend), every=2000)  # grows the ring
    h = rec.history()
    assert h["score"][:, 0].tolist() == [float(i) for i in range(2000, 4000)]
    assert [r["step"] for r in got] == list(range(1201, 3201))
