"""Training-time imbalance signals (``signals=``): history columns equal to the values computed
eagerly from the same tensors, accumulation, loggers, bad input, no host read, DDP."""
import csv
import os

import pytest
import torch
from torch import nn

import mmmod
from mmmod.monitor import CSVLogger
from mmmod.monitor.signals import SIGNALS, check
from _models import TwoEncoder, batch, make

ALL = tuple(SIGNALS)


def _eager(model, names, xs, y):
    """Forward + backward by hand: the unimodal logits, and per modality the accuracy, the
    gradient sum of squares and the parameter sum of squares before any step."""
    out, feats = model(xs)
    zs = mmmod.fusion.concat_logits(model.head, feats)
    nn.functional.cross_entropy(out, y).backward()
    acc = torch.stack([(z.argmax(1) == y).double().mean() for z in zs])
    gsq = torch.stack([sum(p.grad.double().pow(2).sum() for p in enc.parameters())
                       for enc in model.encoders])
    psq = torch.stack([sum(p.detach().double().pow(2).sum() for p in enc.parameters())
                       for enc in model.encoders])
    return zs, acc, gsq, psq


@pytest.mark.parametrize("method", ["ogm_ge", "mlb", "none"])
def test_history_columns_equal_eager_values(method):
    torch.manual_seed(0)
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.1), method=method,
                      history=8, signals=ALL, backend="torch")
    want = []
    for t in range(3):
        xs, y = batch(g=torch.Generator().manual_seed(t))
        opt.zero_grad()
        zs, acc, gsq, psq = _eager(model, names, xs, y)
        opt.observe(dict(zip(names, zs)), y)
        opt.step()  # modulates the gradients: the columns are what the loss gave
        want.append((acc, gsq.sqrt(), gsq / psq))
    h = opt.history()
    assert h["acc"].shape == (3, 2)
    for t, (acc, gn, speed) in enumerate(want):
        torch.testing.assert_close(h["acc"][t].double(), acc)
        torch.testing.assert_close(h["grad_norm"][t].double(), gn, rtol=1e-5, atol=0)
        torch.testing.assert_close(h["speed"][t].double(), speed, rtol=1e-5, atol=0)
    rows = opt.history(format="rows")
    assert {f"{k}/{n}" for k in ("acc", "grad_norm", "speed") for n in names} <= set(rows[0])
    assert rows[1]["acc/visual"] == pytest.approx(float(want[1][0][1]))


def test_accumulated_observes_count_every_sample():
    torch.manual_seed(1)
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.1), history=4,
                      signals=("accuracy",), backend="torch")
    opt.zero_grad()
    hits, n = torch.zeros(2), 0
    for part, b in enumerate((4, 7)):
        xs, y = batch(b=b, g=torch.Generator().manual_seed(10 + part))
        out, feats = model(xs)
        zs = mmmod.fusion.concat_logits(model.head, feats)
        opt.observe(dict(zip(names, zs)), y)
        nn.functional.cross_entropy(out, y).backward()
        hits += torch.stack([(z.argmax(1) == y).sum() for z in zs]).float()
        n += b
    opt.step()
    h = opt.history()
    torch.testing.assert_close(h["acc"][0], hits / n)
    assert set(h) >= {"acc"} and "grad_norm" not in h and "speed" not in h


def test_signals_with_method_log_values_and_csv(tmp_path):
    """The signals share the extras path with a method's own columns (AGM's score_mean)."""
    torch.manual_seed(2)
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.1), method="agm",
                      signals=("grad_norm", "accuracy"), backend="torch")
    path = os.path.join(tmp_path, "log.csv")
    opt.add_logger(CSVLogger(path), every=2)
    for t in range(4):
        xs, y = batch(g=torch.Generator().manual_seed(t))
        opt.zero_grad()
        zs, acc, gsq, _ = _eager(model, names, xs, y)
        opt.observe(dict(zip(names, zs)), y)
        opt.step()
    opt.flush_logs()
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    for key in ("score_mean/audio", "acc/audio", "acc/visual", "grad_norm/visual"):
        assert key in rows[0], key
    assert "speed/audio" not in rows[0]
    assert float(rows[-1]["grad_norm/audio"]) == pytest.approx(float(gsq[0].sqrt()), rel=1e-5)
    assert float(rows[-1]["acc/visual"]) == pytest.approx(float(acc[1]))


def test_bad_signals_are_refused_by_name():
    model = TwoEncoder()
    with pytest.raises(ValueError, match="unknown signal 'acc'.*accuracy"):
        make(model, torch.optim.SGD(model.parameters(), lr=0.1), signals=("acc",))
    with pytest.raises(TypeError, match="signals must be"):
        make(model, torch.optim.SGD(model.parameters(), lr=0.1), signals=3)
    with pytest.raises(TypeError, match="signals must be names"):
        make(model, torch.optim.SGD(model.parameters(), lr=0.1), signals=["accuracy", 1])
    assert check("speed") == ("speed",)
    assert check(["speed", "accuracy", "speed"]) == ("accuracy", "speed")
    assert check(None) == ()


def test_signals_off_without_history_costs_nothing():
    """No recorder: no gradient pass is made (nothing to record)."""
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.1), signals=ALL,
                      backend="torch")
    xs, y = batch()
    opt.zero_grad()
    zs, *_ = _eager(model, names, xs, y)
    opt.observe(dict(zip(names, zs)), y)
    opt.step()
    assert opt._signals._sq is None and opt.recorder is None


def test_gradients_are_read_before_the_modulation():
    """OGM-GE scales the leader's gradient: the recorded norm is the unscaled one."""
    torch.manual_seed(3)
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.0), method="ogm",
                      alpha=5.0, history=2, signals=("grad_norm",), backend="torch",
                      param_filter="all")
    xs, y = batch(b=32, g=torch.Generator().manual_seed(5))
    opt.zero_grad()
    zs, _, gsq, _ = _eager(model, names, xs, y)
    opt.observe(dict(zip(names, zs)), y)
    opt.step()
    after = torch.stack([sum(p.grad.double().pow(2).sum() for p in enc.parameters())
                         for enc in model.encoders]).sqrt()
    k = opt._coeffs.double()
    assert (k < 1).any()  # something was modulated
    torch.testing.assert_close(after, gsq.sqrt() * k, rtol=1e-5, atol=0)
    torch.testing.assert_close(opt.history()["grad_norm"][0].double(), gsq.sqrt(), rtol=1e-5,
                               atol=0)


def test_closure_optimizer_records_the_last_evaluation():
    torch.manual_seed(4)
    model = TwoEncoder()
    opt, names = make(model, torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=2),
                      method="ogm", history=2, signals=ALL, backend="torch")
    xs, y = batch()
    seen = []

    def closure():
        opt.zero_grad()
        out, feats = model(xs)
        zs = mmmod.fusion.concat_logits(model.head, feats)
        opt.observe(dict(zip(names, zs)), y)
        loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        seen.append(torch.stack([(z.argmax(1) == y).float().mean() for z in zs]))
        return loss
    opt.step(closure)
    h = opt.history()
    torch.testing.assert_close(h["acc"][0], seen[-1])
    assert torch.isfinite(h["grad_norm"]).all() and torch.isfinite(h["speed"]).all()


@pytest.mark.parametrize("method", ["ogm_ge", "mlb", "none"])
def test_no_host_reads_with_signals(monkeypatch, method):
    from _sync_spy import check_no_reads as _check_no_reads
    _check_no_reads(monkeypatch, method=method, backend="torch", apply_to="grad", history=4,
                    signals=ALL)


# ---- data parallel --------------------------------------------------------------------------
WORLD, LOCAL_B, STEPS = 2, 5, 3


def _signals_run(model, opt, names, steps, rank=None, world=1):
    for t in range(steps):
        xs, y = _global_batch(t)
        if rank is not None:
            sl = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
            xs, y = [x[sl] for x in xs], y[sl]
        opt.zero_grad()
        out, feats = model(xs)
        zs = mmmod.fusion.concat_logits(
            model.module.head if hasattr(model, "module") else model.head, feats)
        opt.observe(dict(zip(names, zs)), y)
        nn.functional.cross_entropy(out, y).backward()
        opt.step()
    return opt.history()


def _global_batch(t):
    g = torch.Generator().manual_seed(100 + t)
    xs = [torch.randn(WORLD * LOCAL_B, 1 + i, 9, 9, generator=g) for i in range(2)]
    # labels skewed so the two ranks' halves have different accuracies
    return xs, torch.randint(0, 3, (WORLD * LOCAL_B,), generator=g)


def _make(model, enc, method):
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    return mmmod.ModulatedOptimizer(inner, {"audio": enc[0], "visual": enc[1]}, method=method,
                                    backend="torch", history=STEPS, signals=ALL)


def ddp_signals_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from _dist_utils import init
    init(rank, world, port)
    torch.manual_seed(0)
    base = TwoEncoder(classes=5)
    model = nn.parallel.DistributedDataParallel(base)
    out = {}
    opt = _make(model, base.encoders, "ogm_ge")
    out["ogm_ge"] = _signals_run(model, opt, ["audio", "visual"], STEPS, rank, world)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_signals_equal_one_process_on_the_concatenated_batch(tmp_path):
    from _dist_utils import spawn
    spawn(ddp_signals_worker, WORLD, str(tmp_path))
    torch.manual_seed(0)
    model = TwoEncoder(classes=5)
    want = _signals_run(model, _make(model, model.encoders, "ogm_ge"), ["audio", "visual"],
                        STEPS)
    for rank in range(WORLD):
        got = torch.load(os.path.join(tmp_path, f"rank{rank}.pt"))["ogm_ge"]
        torch.testing.assert_close(got["acc"], want["acc"], rtol=0, atol=0)
        torch.testing.assert_close(got["grad_norm"], want["grad_norm"], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got["speed"], want["speed"], rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(got["score"], want["score"], rtol=1e-5, atol=1e-6)
    # the accuracies really differ between the halves: the all-gather matters
    assert not torch.equal(got["acc"], torch.zeros_like(got["acc"]))


# ---- FSDP2: the norms of sharded tensors are summed over the shards ------------------------
def _fsdp_run(rank, world, steps=3):
    from _dist_utils import ShardModel
    torch.manual_seed(0)
    model = ShardModel(2)
    mapping = {"audio": model.encoders[0], "visual": model.encoders[1]}
    if rank is not None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))
        for enc in model.encoders:
            fully_shard(enc, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = mmmod.ModulatedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), mapping,
                                   method="ogm_ge", alpha=0.8, param_filter="all",
                                   backend="torch", history=steps, signals=ALL)
    for t in range(steps):
        xs, y = _global_batch(t)
        xs = [x[:, :1 + i] for i, x in enumerate(xs)]
        if rank is not None:
            sl = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
            xs, y = [x[sl] for x in xs], y[sl]
        opt.zero_grad()
        out, feats = model(xs)
        head = model.head
        w = head.weight.full_tensor() if hasattr(head.weight, "full_tensor") else head.weight
        b = head.bias.full_tensor() if hasattr(head.bias, "full_tensor") else head.bias
        with torch.no_grad():
            zs = [f @ w[:, 3 * i:3 * i + 3].T + b / 2 for i, f in enumerate(feats)]
        opt.observe(dict(zip(["audio", "visual"], zs)), y)
        nn.functional.cross_entropy(out, y).backward()
        opt.step()
    return opt.history()


def fsdp_signals_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from _dist_utils import init
    init(rank, world, port)
    torch.save(_fsdp_run(rank, world), os.path.join(out_dir, f"fsdp{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp2_signals_equal_one_process_on_the_concatenated_batch(tmp_path):
    from _dist_utils import spawn
    spawn(fsdp_signals_worker, WORLD, str(tmp_path))
    want = _fsdp_run(None, WORLD)
    for rank in range(WORLD):
        got = torch.load(os.path.join(tmp_path, f"fsdp{rank}.pt"))
        torch.testing.assert_close(got["acc"], want["acc"], rtol=0, atol=0)
        torch.testing.assert_close(got["grad_norm"], want["grad_norm"], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got["speed"], want["speed"], rtol=1e-4, atol=1e-10)


def test_copies_keep_the_signals():
    import copy
    import pickle
    torch.manual_seed(5)
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.1), history=2,
                      signals=ALL, backend="torch")
    for clone in (copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))):
        m2, o2 = clone
        assert o2.signals == ALL and o2.recorder is None  # the recorder belongs to the run
        from mmmod.monitor import Recorder, attach
        attach(o2, Recorder(names, 2))
        xs, y = batch()
        o2.zero_grad()
        zs, acc, gsq, _ = _eager(m2, names, xs, y)
        o2.observe(dict(zip(names, zs)), y)
        o2.step()
        # the copy's norms are of the copy's gradients
        torch.testing.assert_close(o2.history()["grad_norm"][0].double(), gsq.sqrt(), rtol=1e-5,
                                   atol=0)
