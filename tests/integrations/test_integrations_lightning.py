"""mmmod.integrations.lightning in a real Trainer: automatic and manual optimization score every
batch (twice the batch with accumulation), proxy calls reach the optimizer, ckpt_path resume is
bitwise, a GradScaler-skipped step leaves no stale scores, 2-process DDP replicas agree."""
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("lightning")

import torch  # noqa: E402

import mmmod  # noqa: E402
from _lightning_models import B, Net, loader, plain_loop, trainer  # noqa: E402
from mmmod.integrations.lightning import ModulationCallback, val_acc_from_metrics  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent


def _same_params(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_automatic_optimization_scores_every_micro_batch(accumulate, direct):
    """Through the callback, and with self.optimizers().observe() in training_step (observed
    before Lightning's zero_grad: the core keeps scores whose backward has not run)."""
    model = Net(direct=direct)
    t = trainer(accumulate_grad_batches=accumulate, callbacks=[] if direct else None)
    t.fit(model, loader())
    opt = mmmod.unwrap(model.trainer.optimizers[0])
    h = opt.history()
    assert h["samples"].tolist() == [B * accumulate] * (8 // accumulate)
    assert h["epoch"].tolist() == [0] * (4 // accumulate) + [1] * (4 // accumulate)
    ref, ref_opt = plain_loop(accumulate=accumulate)
    assert torch.equal(h["score"], ref_opt.history()["score"])
    assert _same_params(model, ref)


def test_manual_optimization_through_the_proxy():
    """self.optimizers() is a LightningOptimizer: set_epoch and observe on it reach the
    real optimizer (the window closes after epoch 0)."""
    for proxy_calls in (False, True):
        model = Net(manual=True, proxy_calls=proxy_calls, modulation_ends=0)
        trainer().fit(model, loader())
        opt = mmmod.unwrap(model.trainer.optimizers[0])
        h = opt.history()
        assert opt.epoch == 1 and h["epoch"].tolist() == [0] * 4 + [1] * 4
        assert h["modulated"].tolist() == [True] * 4 + [False] * 4
        assert h["samples"].tolist() == [B] * 8
        ref, _ = plain_loop(modulation_ends=0)
        assert _same_params(model, ref)


def test_coefficients_logged_and_mslr_val_acc(tmp_path):
    model = Net("mslr")
    cb = ModulationCallback(val_acc_from_metrics({"audio": "val_acc_audio",
                                                  "visual": "val_acc_visual"}), log_scores=True)
    t = trainer(callbacks=[cb], max_epochs=3)
    t.fit(model, loader(), loader(seed=1))
    opt = mmmod.unwrap(t.optimizers[0])
    assert {"mmmod/coeff/audio", "mmmod/coeff/visual", "mmmod/score/audio"} <= set(t.callback_metrics)
    assert torch.equal(t.callback_metrics["mmmod/coeff/visual"], opt.coefficients["visual"])
    # validation's modulate() under no_grad recorded nothing: every step saw one batch
    assert opt.history()["samples"].tolist() == [B] * 12
    # MSLR got each finished validation's accuracies at epochs 1 and 2
    assert opt._method_state["history"].shape[0] == 2


def test_ckpt_path_resume_is_bitwise(tmp_path):
    straight = Net()
    trainer(max_epochs=2).fit(straight, loader())
    first = Net()
    t = trainer(tmp_path, max_epochs=1)
    t.fit(first, loader())
    t.save_checkpoint(tmp_path / "e0.ckpt")
    resumed = Net()
    t2 = trainer(tmp_path, max_epochs=2)
    t2.fit(resumed, loader(), ckpt_path=tmp_path / "e0.ckpt")
    assert _same_params(straight, resumed)
    a, b = mmmod.unwrap(straight.trainer.optimizers[0]), mmmod.unwrap(t2.optimizers[0])
    assert a.step_count == b.step_count == 8 and torch.equal(a._coeffs, b._coeffs)


def test_grad_scaler_skip_leaves_no_stale_scores():
    from lightning.pytorch.plugins.precision import MixedPrecision
    model = Net(inf_at=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)  # Lightning picks none on CPU
    t = trainer(plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], max_epochs=1)
    t.fit(model, loader())
    opt = mmmod.unwrap(t.optimizers[0])
    h = opt.history()
    assert opt.step_count == 3  # the overflowing step was skipped
    assert h["samples"].tolist() == [B] * 3  # and its batch's scores were not added to the next
    assert scaler.get_scale() == 2.0 ** 7


def test_ddp_two_processes_replicas_identical(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), str(HERE.parents[1])]),
               OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(HERE / "_lightning_models.py"), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(p, q) for p, q in zip(r0["params"], r1["params"]))
    assert torch.equal(r0["coeff"], r1["coeff"])
    assert r0["samples"].tolist() == [2 * B] * 4  # the global batch: both ranks' samples
