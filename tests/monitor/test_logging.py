"""mmmod.monitor: the per-step history, its loggers and the plot command.

The recorder is the optimizer's own (``ModulatedOptimizer(..., history=N)``; ``attach`` installs
one into an existing optimizer), so these tests run real training steps.
"""
import csv
import math
import os
import subprocess
import sys

import pytest
import torch

import mmmod
from mmmod import functional
from mmmod.monitor import CallbackLogger, CSVLogger, Recorder, TensorBoardLogger, attach
from mmmod.monitor import plot as mplot
from _models import TwoEncoder, batch, make, train_step

READS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "cpu", "numpy")
MMMOD_DIR = os.path.dirname(functional.__file__)


def _train(method, steps, capacity=64, m=2, seed=0, nan_at=(), epochs_at=None, **kw):
    """Run ``steps`` real steps; return (optimizer, recorder, per-step values read directly)."""
    torch.manual_seed(seed)
    model = TwoEncoder(m=m)
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), m=m,
                      method=method, backend="torch", history=capacity, **kw)
    rec = opt.recorder
    g = torch.Generator().manual_seed(seed)
    truth = []
    for i in range(steps):
        if epochs_at is not None:
            opt.set_epoch(epochs_at(i))
        xs, y = batch(b=5 + i % 3, m=m, g=g)
        opt.zero_grad()
        out, feats = model(xs)
        z = mmmod.fusion.concat_logits(model.head, feats)
        if i in nan_at:  # a NaN logit of modality 0 seen by observe() only: the step is skipped
            z[0] = z[0].clone()
            z[0][0, 0] = float("nan")
        opt.observe(dict(zip(names, z)), y)
        pending = opt._score_sum.clone()
        torch.nn.functional.cross_entropy(out, y).backward()
        opt.step()
        if method == "none":  # no coefficients: the scores observe() gathered, k = 1
            s, k = pending, torch.ones(m)
        else:
            s = torch.stack(list(opt.scores.values())).clone()
            k = torch.stack(list(opt.coefficients.values())).clone()
        truth.append({"step": i, "epoch": opt.epoch, "samples": y.numel(), "scores": s,
                      "coeffs": k, "modulated": method != "none" and opt.in_window(),
                      "skipped": not bool(torch.isfinite(k).all())})
    return opt, rec, truth


def _assert_history_equals(h, truth):
    assert h["step"].tolist() == [t["step"] for t in truth]
    assert h["epoch"].tolist() == [t["epoch"] for t in truth]
    assert h["samples"].tolist() == [t["samples"] for t in truth]
    assert h["modulated"].tolist() == [t["modulated"] for t in truth]
    assert h["skipped"].tolist() == [t["skipped"] for t in truth]
    # bit-for-bit: the ring stores float32, the optimizer's scores and coefficients are float32
    torch.testing.assert_close(h["score"], torch.stack([t["scores"] for t in truth]).float(),
                               rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(h["coeff"], torch.stack([t["coeffs"] for t in truth]).float(),
                               rtol=0, atol=0, equal_nan=True)


# ---- the history equals the per-step values --------------------------------------------------
@pytest.mark.parametrize("method", ["ogm_ge", "ogm", "mlb", "none"])
def test_history_equals_per_step_values(method):
    opt, rec, truth = _train(method, 9, epochs_at=lambda i: i // 3, modulation_ends=1)
    h = rec.history()
    assert set(h) == {"step", "epoch", "samples", "modulated", "skipped", "score", "coeff"}
    assert h["score"].shape == (9, 2) and h["score"].dtype == torch.float32
    assert h["score"].device.type == "cpu"
    _assert_history_equals(h, truth)
    if method != "none":  # the window (epochs 0-1) shows in the modulated column
        assert h["modulated"].tolist() == [True] * 6 + [False] * 3
    rows = rec.history(format="rows")
    assert len(rows) == 9 and rows[4]["step"] == 4 and rows[4]["samples"] == truth[4]["samples"]
    assert rows[4]["score/visual"] == h["score"][4, 1].item()
    assert rows[4]["coeff/audio"] == h["coeff"][4, 0].item()


def test_ring_keeps_the_last_capacity_steps_and_more_modalities():
    _, rec, truth = _train("mlb", 13, capacity=5, m=3)
    h = rec.history()
    assert len(rec) == 5 and rec.count == 13
    _assert_history_equals(h, truth[-5:])
    assert [r["step"] for r in rec.history(format="rows")] == [8, 9, 10, 11, 12]
    assert "score/text" in rec.history(format="rows")[0]


def test_skipped_flag_matches_the_optimizer():
    opt, rec, truth = _train("ogm_ge", 6, nan_at=(2, 4))
    h = rec.history()
    assert h["skipped"].tolist() == [False, False, True, False, True, False]
    assert int(h["skipped"].sum()) == opt.skipped_steps == 2
    assert torch.isnan(h["coeff"][2]).all() and torch.isnan(h["score"][2, 0])
    _assert_history_equals(h, truth)


def test_extra_state_is_recorded_per_step():
    rec = Recorder(["audio", "visual"], 4)
    vals = []
    for i in range(6):
        run_mean = torch.tensor([0.1 * i, 0.2 * i + 1])
        extra = {"running_mean": run_mean, "temperature": torch.tensor(1.0 + i, dtype=torch.float64),
                 "grid": torch.arange(6.0).reshape(2, 3) * i}
        rec.record(torch.tensor([i, 2.0 * i]), torch.tensor([1.0, 0.5]), extra=extra)
        vals.append(extra)
    h = rec.history()
    assert h["running_mean"].shape == (4, 2) and h["grid"].shape == (4, 2, 3)
    torch.testing.assert_close(h["running_mean"], torch.stack([v["running_mean"] for v in vals[2:]]))
    torch.testing.assert_close(h["temperature"], torch.tensor([3.0, 4.0, 5.0, 6.0]))
    torch.testing.assert_close(h["grid"], torch.stack([v["grid"] for v in vals[2:]]))
    row = rec.history(format="rows")[-1]
    assert row["running_mean/visual"] == pytest.approx(2.0) and row["temperature"] == 6.0
    assert row["grid/5"] == 25.0 and "grid/6" not in row


def test_bad_input_is_refused_before_anything_is_written():
    rec = Recorder(["audio", "visual"], 3)
    s, k = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.0])
    rec.record(s, k, extra={"rho": torch.tensor([1.0, 2.0])})
    before = rec.history()
    bad = [
        ((torch.ones(3), k), {}, ValueError, "scores must have shape \\(2,\\)"),
        ((s, torch.ones(2, 1)), {}, ValueError, "coeffs must have shape"),
        ((s.tolist(), k), {}, TypeError, "scores must be a tensor"),
        ((s, k), {"extra": {"rho": torch.ones(3)}}, ValueError, "keep the keys and shapes"),
        ((s, k), {"extra": {}}, ValueError, "keep the keys and shapes"),
        ((s, k, torch.ones(2)), {"extra": {"rho": s}}, ValueError, "skipped must be a 0-d"),
        ((s, k), {"extra": {"score": s}}, ValueError, "extra key 'score'"),
        ((s, k), {"extra": {"rho": s.to("meta")}}, ValueError, "extra\\['rho'\\] is on meta"),
        ((s.to("meta"), k), {}, ValueError, "recorder's device cpu"),
        ((s, k.to(torch.complex64)), {}, TypeError, "coeffs must be real"),
    ]
    for args, kw, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            rec.record(*args, **kw)
    assert rec.count == 1
    after = rec.history()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    for cap in (-1, 1.5, True):
        with pytest.raises(ValueError, match="capacity"):
            Recorder(["a", "b"], cap)
    with pytest.raises(ValueError, match="unique"):
        Recorder(["a", "a"])
    with pytest.raises(ValueError, match="every"):
        rec.add_logger(CallbackLogger(print), every=0)
    with pytest.raises(TypeError, match="write"):
        rec.add_logger(object())


def test_capacity_zero_keeps_nothing_and_costs_no_buffer():
    rec = Recorder(["audio", "visual"], 0)
    rec.record(torch.ones(2), torch.ones(2))
    assert rec._buf is None and len(rec) == 0
    h = rec.history()
    assert h["score"].shape == (0, 2) and h["step"].shape == (0,)
    assert rec.history(format="rows") == []


# ---- loggers ---------------------------------------------------------------------------------
def test_hooks_get_rows_every_n_steps_in_order():
    got, per_row = [], []
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.05), method="ogm_ge",
                      backend="torch")
    rec = attach(opt, Recorder(names, 0))  # history off: the logger alone sizes the ring
    rec.register_log_hook(got.append, every=4)
    rec.add_logger(CallbackLogger(per_row.append, per_row=True), every=3)
    assert rec.capacity == 4
    for _ in range(10):
        train_step(model, opt, names, *batch())
    assert [len(r) for r in got] == [4, 4] and len(per_row) == 9
    rec.flush()
    assert [len(r) for r in got] == [4, 4, 2] and len(per_row) == 10
    flat = [r for rows in got for r in rows]
    assert [r["step"] for r in flat] == list(range(10)) == [r["step"] for r in per_row]
    assert flat[-4:] == rec.history(format="rows")  # the ring holds the last 4 steps
    assert all(isinstance(v, (int, float, bool)) for v in flat[0].values())
    rec.flush()
    assert [len(r) for r in got] == [4, 4, 2]  # nothing new, nothing resent


def test_logger_every_larger_than_the_ring_grows_it_without_losing_rows():
    rec = Recorder(["a", "b"], 3)
    for i in range(5):
        rec.record(torch.tensor([i, -i], dtype=torch.float32), torch.ones(2))
    got = []
    handle = rec.register_log_hook(got.extend, every=7)
    assert rec.capacity == 7
    assert [r["step"] for r in rec.history(format="rows")] == [2, 3, 4]  # kept across the resize
    for i in range(5, 14):
        rec.record(torch.tensor([i, -i], dtype=torch.float32), torch.ones(2))
    assert [r["step"] for r in got] == list(range(5, 12))
    handle.remove()  # delivers the rest, then detaches
    assert [r["step"] for r in got] == list(range(5, 14))
    assert [r["score/b"] for r in got] == [-float(i) for i in range(5, 14)]
    rec.record(torch.zeros(2), torch.ones(2))
    assert len(got) == 9


def test_csv_log_reads_back_equal_to_the_history(tmp_path):
    path = tmp_path / "sub" / "run.csv"
    opt, rec, truth = _train("ogm_ge", 7, nan_at=(3,))
    # attach a fresh recorder with a CSV logger to a second run of the same steps
    opt2, rec2, truth2 = _train_with_loggers(lambda rec: rec.add_logger(CSVLogger(path), every=3))
    rec2.close()
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "epoch", "samples", "modulated", "skipped", "score/audio",
                             "score/visual", "coeff/audio", "coeff/visual"]
    hist = rec2.history(format="rows")
    assert len(rows) == len(hist) == 7
    for r, h in zip(rows, hist):
        for key, v in h.items():
            x = float(r[key])
            assert (math.isnan(x) and math.isnan(float(v))) or x == float(v), (key, r[key], v)
    run = mplot.load_csv(str(path))
    assert run.names == ["audio", "visual"] and run.step == list(range(7))
    assert run.skipped == [t["skipped"] for t in truth2] and any(run.skipped)


def _train_with_loggers(add, steps=7, method="ogm_ge"):
    torch.manual_seed(0)
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.05), method=method,
                      backend="torch")
    rec = attach(opt, Recorder(names, 16))
    add(rec)
    g = torch.Generator().manual_seed(0)
    truth = []
    for i in range(steps):
        xs, y = batch(g=g)
        opt.zero_grad()
        out, feats = model(xs)
        z = mmmod.fusion.concat_logits(model.head, feats)
        if i == 3:  # NaN seen by observe() only: a skipped step, the weights stay finite
            z[0] = z[0].clone()
            z[0][0, 0] = float("nan")
        opt.observe(dict(zip(names, z)), y)
        torch.nn.functional.cross_entropy(out, y).backward()
        opt.step()
        truth.append({"skipped": not bool(torch.isfinite(opt._coeffs).all())})
    return opt, rec, truth


def test_csv_append_refuses_other_columns(tmp_path):
    path = tmp_path / "log.csv"
    log = CSVLogger(path)
    log.write([{"step": 0, "score/a": 1.0}])
    log.close()
    again = CSVLogger(path, append=True)
    again.write([{"step": 1, "score/a": 2.0}])
    again.close()
    assert path.read_text().splitlines() == ["step,score/a", "0,1.0", "1,2.0"]
    with pytest.raises(ValueError, match="cannot append"):
        CSVLogger(path, append=True).write([{"step": 2, "score/b": 1.0}])


def test_tensorboard_events_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    log_dir = tmp_path / "tb" / "ogm_ge"
    _, rec, _ = _train_with_loggers(lambda rec: rec.add_logger(TensorBoardLogger(log_dir), every=2),
                                    steps=5)
    rec.close()
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"mmmod/score/audio", "mmmod/score/visual", "mmmod/coeff/audio",
            "mmmod/coeff/visual", "mmmod/skipped", "mmmod/modulated"} <= tags
    h = rec.history()
    for m, name in enumerate(rec.names):
        for kind, col in (("score", h["score"]), ("coeff", h["coeff"])):
            evs = acc.Scalars(f"mmmod/{kind}/{name}")
            assert [e.step for e in evs] == h["step"].tolist()
            got = torch.tensor([e.value for e in evs])
            torch.testing.assert_close(got, col[:, m], rtol=0, atol=0, equal_nan=True)
    assert [e.value for e in acc.Scalars("mmmod/skipped")] == [0, 0, 0, 1, 0]
    # and the plot command reads the folder (one run per sub-folder with events)
    runs = mplot.load(str(tmp_path / "tb"))
    assert [r.label for r in runs] == ["ogm_ge"] and runs[0].step == list(range(5))
    out = tmp_path / "tb.png"
    assert mplot.main([str(tmp_path / "tb"), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_logger_takes_an_existing_writer():
    calls = []

    class Writer:
        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))
    log = TensorBoardLogger(writer=Writer(), prefix="mod/")
    log.write([{"step": 7, "epoch": None, "skipped": True, "score/a": 0.5}])
    assert calls == [("mod/skipped", 1.0, 7), ("mod/score/a", 0.5, 7)]
    log.close()  # not owned: no close() needed on the writer
    with pytest.raises(ValueError, match="exactly one"):
        TensorBoardLogger()
    with pytest.raises(TypeError, match="add_scalar"):
        TensorBoardLogger(writer=object())


def test_tensorboard_logger_without_the_package_says_so(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        TensorBoardLogger(tmp_path)


# ---- no host read per step with logging on --------------------------------------------------
def _spy_reads(monkeypatch):
    calls = []
    for attr in READS:
        orig = getattr(torch.Tensor, attr)

        def spy(self, *a, _orig=orig, _attr=attr, **k):
            frame = sys._getframe(1)
            if MMMOD_DIR in frame.f_code.co_filename:  # the inner optimizer's reads are not ours
                calls.append(f"{_attr} in {os.path.basename(frame.f_code.co_filename)}:"
                             f"{frame.f_lineno}")
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, attr, spy)
    monkeypatch.setattr(functional, "check_labels_in_range", lambda *a, **k: None)
    return calls


@pytest.mark.parametrize("method", ["ogm_ge", "mlb", "none"])
def test_no_host_read_per_step_one_per_flush(monkeypatch, tmp_path, method):
    model = TwoEncoder()
    opt, names = make(model, torch.optim.AdamW(model.parameters(), lr=1e-3), method=method,
                      backend="torch")
    rec = attach(opt, Recorder(names, 8))
    got = []
    rec.register_log_hook(got.append, every=4)
    rec.add_logger(CSVLogger(tmp_path / "log.csv"), every=4)
    train_step(model, opt, names, *batch())  # warm-up outside the instrumented region
    calls = _spy_reads(monkeypatch)
    for i in range(2, 4):
        train_step(model, opt, names, *batch())
        assert calls == [], f"host reads during step {i}: {calls}"
    train_step(model, opt, names, *batch())  # the 4th recorded step flushes both loggers
    assert len(calls) == 1 and calls[0].startswith("tolist in history.py"), calls
    assert [len(r) for r in got] == [4]
    calls.clear()
    train_step(model, opt, names, *batch())
    assert calls == []
    rec.history()
    assert len(calls) == 1 and calls[0].startswith("cpu in history.py"), calls
    monkeypatch.undo()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_record_does_not_synchronize():
    """CUDA's sync debug mode raises on any host synchronisation inside record()."""
    dev = torch.device("cuda")
    rec = Recorder(["audio", "visual"], 4)
    got = []
    rec.register_log_hook(got.extend, every=4)
    s = torch.rand(2, device=dev)
    flag = torch.tensor(True, device=dev)
    rec.record(s, s, extra={"rho": s})  # first call allocates the ring
    torch.cuda.set_sync_debug_mode("error")
    try:
        rec.record(s * 2, s, skipped=flag, extra={"rho": s}, step=1, modulated=True)
        rec.record(s, s * float("nan"), extra={"rho": s}, step=2)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert got == []
    rec.record(s, s, extra={"rho": s})  # the 4th row: the flush reads the host once
    assert [r["skipped"] for r in got] == [False, True, True, False]
    h = rec.history()
    torch.testing.assert_close(h["score"][1], (s * 2).cpu())
    assert h["step"].tolist() == [0, 1, 2, 3]


# ---- plots and packaging ---------------------------------------------------------------------
def test_plot_command_writes_a_png_from_a_csv(tmp_path):
    path = tmp_path / "run.csv"
    _, rec, _ = _train_with_loggers(lambda rec: rec.add_logger(CSVLogger(path), every=5))
    rec.close()
    out = tmp_path / "fig" / "curves.png"
    r = subprocess.run([sys.executable, "-m", "mmmod", "plot", str(path), "-o", str(out),
                        "--smooth", "3"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert str(out) in r.stdout
    # default output: modulation.png beside the log
    assert mplot.main([str(path)]) == 0 and (tmp_path / "modulation.png").exists()


def test_plot_command_errors(tmp_path, capsys):
    assert mplot.main([str(tmp_path / "missing.csv")]) == 2
    bad = tmp_path / "bad.csv"
    bad.write_text("step,loss\n0,1.0\n")
    assert mplot.main([str(bad)]) == 2
    assert "no score/<modality> columns" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert mplot.main([str(tmp_path / "empty")]) == 2


def test_plot_helpers():
    assert mplot.smooth([1.0, 3.0, None, 5.0], 2)[:2] == [1.0, 2.0]
    assert math.isnan(mplot.smooth([1.0, None], 2)[1]) and mplot.smooth([1.0, 3.0, 5.0], 2)[2] == 4.0
    assert mplot._spans([0, 1, 2, 3, 4], [True, False, False, True, False]) == [(1, 2), (4, 4)]
    run = mplot.run_from_rows([{"step": "1", "score/a": "2.0", "score/b": "4", "coeff/a": "1",
                                "coeff/b": "nan", "samples": "4"}], "r")
    assert run.mean_scores() == {"a": [0.5], "b": [1.0]} and math.isnan(run.coeff["b"][0])


def test_import_mmmod_imports_no_plotting_or_tensorboard():
    code = ("import sys, mmmod, mmmod.monitor, mmmod.monitor.plot, mmmod.demo, mmmod.demo.cli, "
            "mmmod.__main__; bad = [m for m in ('matplotlib', 'tensorboard', "
            "'torch.utils.tensorboard') if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_record_costs_little_per_step():
    """A loose guard on the per-step cost on CPU (measured ~15 us; see docs/logging.md)."""
    import time
    rec = Recorder(["audio", "visual"], 1024)
    s, k = torch.rand(2), torch.rand(2)
    rec.record(s, k)
    t0 = time.perf_counter()
    for _ in range(2000):
        rec.record(s, k)
    per = (time.perf_counter() - t0) / 2000
    assert per < 500e-6, f"record() took {per * 1e6:.0f} us"


def test_method_log_values_are_recorded_as_extra():
    """A method's per-step state (AGM's running score means) lands in the history each step."""
    from mmmod import methods
    if "agm" not in methods.names():
        pytest.skip("no AGM method in this version")
    torch.manual_seed(0)
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.05), method="agm",
                      backend="torch")
    rec = attach(opt, Recorder(names, 8))
    means = []
    for _ in range(5):
        train_step(model, opt, names, *batch())
        means.append(opt._method.log_values(opt._method_state)["score_mean"].clone())
    h = rec.history()
    assert h["score_mean"].shape == (5, 2)
    torch.testing.assert_close(h["score_mean"], torch.stack(means).float(), rtol=0, atol=0)
    assert not torch.equal(h["score_mean"][0], h["score_mean"][-1])  # it moves with training
    assert "score_mean/audio" in rec.history(format="rows")[0]


def test_history_is_off_by_default_and_validated():
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.1), method="ogm")
    assert opt.recorder is None
    with pytest.raises(RuntimeError, match="history is off"):
        opt.history()
    for bad, exc in ((-1, ValueError), (2.5, TypeError), ("8", TypeError)):
        with pytest.raises(exc, match="history"):
            make(model, torch.optim.SGD(model.parameters(), lr=0.1), method="ogm", history=bad)


def test_log_hook_on_the_optimizer_gets_every_step_once():
    torch.manual_seed(0)
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.05), method="mlb",
                      backend="torch")
    got = []
    handle = opt.register_log_hook(got.extend, every=3)
    g = torch.Generator().manual_seed(1)
    coeffs = []
    for i in range(7):
        xs, y = batch(b=4, g=g)
        train_step(model, opt, names, xs, y)
        coeffs.append([float(v) for v in opt.coefficients.values()])
    assert [r["step"] for r in got] == list(range(6))  # two flushes of 3 rows
    opt.flush_logs()
    assert [r["step"] for r in got] == list(range(7))
    for row, k in zip(got, coeffs):
        assert [row[f"coeff/{n}"] for n in names] == pytest.approx(k, rel=0, abs=0)
    handle.remove()


def test_attach_refuses_a_second_recorder():
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.1), method="ogm", history=4)
    with pytest.raises(ValueError, match="already records"):
        attach(opt, Recorder(names, 4))
