"""mmmod.integrations.hf in a real transformers Trainer (evaluation every epoch leaves each
step's samples unchanged; resume_from_checkpoint is bitwise) and accelerate's prepare pattern
(accumulation scores every micro-batch; save_state / load_state is bitwise)."""
import types

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from _hf_imports import import_transformers  # noqa: E402

import_transformers()

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

import mmmod  # noqa: E402
from _models import TwoEncoder  # noqa: E402
from mmmod.integrations import hf  # noqa: E402

B, N = 8, 32


class AV(Dataset):
    def __init__(self, seed=0, n=N):
        g = torch.Generator().manual_seed(seed)
        self.a, self.v = torch.randn(n, 1, 9, 9, generator=g), torch.randn(n, 2, 9, 9, generator=g)
        self.y = torch.randint(0, 5, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"audio": self.a[i], "visual": self.v[i], "labels": self.y[i]}


def _model_and_optimizer(**kw):
    torch.manual_seed(0)
    model = TwoEncoder()
    opt = mmmod.ModulatedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                   {"audio": model.encoders[0], "visual": model.encoders[1]},
                                   method="ogm_ge", alpha=0.8, backend="torch", history=64, **kw)
    return model, opt


class ModulatedTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out, feats = model([inputs["audio"], inputs["visual"]])
        logits = mmmod.fusion.concat_logits(model.head, feats)
        hf.observe(self, {"audio": logits[0], "visual": logits[1]}, inputs["labels"])
        loss = nn.functional.cross_entropy(out, inputs["labels"])
        return (loss, {"logits": out}) if return_outputs else loss


def _args(out, epochs=2, **kw):
    base = dict(output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=B,
                per_device_eval_batch_size=B, learning_rate=0.05, lr_scheduler_type="constant",
                report_to="none", use_cpu=True, remove_unused_columns=False, logging_steps=1,
                save_strategy="no", seed=0, data_seed=0, disable_tqdm=True, max_grad_norm=0.0,
                dataloader_num_workers=0, label_names=["labels"])
    base.update(kw)
    return TrainingArguments(**base)


def _fit(out, eval_dataset=None, resume=None, epochs=2, **kw):
    model, opt = _model_and_optimizer()
    trainer = ModulatedTrainer(model=model, args=_args(out, epochs, **kw), train_dataset=AV(),
                               eval_dataset=eval_dataset, optimizers=(opt, None),
                               callbacks=[hf.ModulationCallback(log_scores=True)])
    trainer.train(resume_from_checkpoint=resume)
    return model, opt, trainer


def test_trainer_evaluation_does_not_leak_into_training(tmp_path):
    model, opt, trainer = _fit(tmp_path / "a", eval_dataset=AV(seed=1), eval_strategy="epoch")
    plain, plain_opt, _ = _fit(tmp_path / "b")
    h = opt.history()
    assert h["samples"].tolist() == [B] * 8  # evaluation batches never reach a step
    assert h["epoch"].tolist() == [0] * 4 + [1] * 4
    assert torch.equal(h["score"], plain_opt.history()["score"])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))
    logged = [r for r in trainer.state.log_history if "mmmod/coeff/audio" in r]
    assert len(logged) == 8 and "mmmod/score/visual" in logged[-1]
    assert logged[-1]["mmmod/coeff/visual"] == float(opt.coefficients["visual"])
    assert any("eval_loss" in r for r in trainer.state.log_history)


def test_trainer_resume_from_checkpoint_is_bitwise(tmp_path):
    straight, s_opt, _ = _fit(tmp_path / "s")
    _fit(tmp_path / "r", epochs=1, save_strategy="epoch")
    ckpt = next((tmp_path / "r").glob("checkpoint-*"))
    resumed, r_opt, _ = _fit(tmp_path / "r", resume=str(ckpt), save_strategy="no")
    assert r_opt.step_count == s_opt.step_count == 8 and r_opt.epoch == 1
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters()))
    assert torch.equal(r_opt._coeffs, s_opt._coeffs)


def test_callback_drops_the_scores_of_a_skipped_step():
    _, opt = _model_and_optimizer()
    opt.observe({"audio": torch.randn(4, 5), "visual": torch.randn(4, 5)}, torch.arange(4))
    wrapper = types.SimpleNamespace(optimizer=opt, step_was_skipped=False)  # AcceleratedOptimizer
    cb = hf.ModulationCallback()
    cb.on_optimizer_step(None, None, None, optimizer=wrapper)
    assert opt._observed == 1  # a step that ran keeps nothing to drop here
    wrapper.step_was_skipped = True
    cb.on_optimizer_step(None, None, None, optimizer=wrapper)
    assert opt._observed == 0


# ---- accelerate: prepare, then mmmod.unwrap for the mmmod calls ------------------------------
def _accelerate_run(steps, accumulate, save=None, load=None, skip=0):
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    set_seed(0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    model, opt = _model_and_optimizer()
    loader = DataLoader(AV(), batch_size=B, shuffle=False)
    model, prepared, loader = accelerator.prepare(model, opt, loader)
    mm = mmmod.unwrap(prepared)
    assert mm is opt
    if load is not None:
        accelerator.load_state(load)
    batches = list(loader)
    for i, batch in enumerate(batches[skip:skip + steps * accumulate]):
        with accelerator.accumulate(model):
            out, feats = model([batch["audio"], batch["visual"]])
            logits = mmmod.fusion.concat_logits(model.head, feats)
            mm.observe({"audio": logits[0], "visual": logits[1]}, batch["labels"])
            accelerator.backward(nn.functional.cross_entropy(out, batch["labels"]))
            prepared.step()
            prepared.zero_grad()
        if save is not None and i + 1 == save[1]:
            accelerator.save_state(save[0])
    return model, mm


def test_accelerate_accumulation_scores_every_micro_batch():
    model, mm = _accelerate_run(steps=2, accumulate=2)
    assert mm.history()["samples"].tolist() == [2 * B] * 2


def test_accelerate_save_and_load_state_is_bitwise(tmp_path):
    straight, s_mm = _accelerate_run(steps=4, accumulate=1, save=(str(tmp_path / "st"), 2))
    resumed, r_mm = _accelerate_run(steps=2, accumulate=1, load=str(tmp_path / "st"), skip=2)
    assert r_mm.step_count == s_mm.step_count == 4
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters()))
    assert torch.equal(r_mm._coeffs, s_mm._coeffs)
