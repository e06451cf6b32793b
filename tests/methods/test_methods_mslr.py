"""MSLR against a transcription of kkontras/MLB's Bias_Infusion_MSLR (docs/semantics.md, MSLR)."""
from collections import defaultdict

import numpy as np
import pytest
import torch

from mmmod import functional, methods
from mmmod.methods.mslr import MSLR

from _backends import LIVE_BACKENDS, device_for


class AuthorsMSLR:
    """Bias_Infusion_MSLR: _initialize_logs_n_utils, on_epoch_begin, on_backward_end (two
    modalities "c" and "g"; the agent's logs replaced by arguments)."""

    def __init__(self, init_learning_rate=None, keep_memory_epoch=5):
        self.init_learning_rate = init_learning_rate or {"c": 1, "g": 1}
        self.coeff_memory = defaultdict(list)
        self.keep_memory_epoch = keep_memory_epoch
        self.ratio = defaultdict(lambda: 1)

    def on_epoch_begin(self, current_epoch, acc_0, acc_1):
        if current_epoch < 1:
            return
        if current_epoch > self.keep_memory_epoch:
            ratio_0 = acc_0 / np.array(self.coeff_memory[0][-self.keep_memory_epoch:]).mean()
            ratio_1 = acc_1 / np.array(self.coeff_memory[1][-self.keep_memory_epoch:]).mean()
        else:
            ratio_0, ratio_1 = 1, 1
        self.ratio[0] = ratio_0
        self.ratio[1] = ratio_1
        self.coeff_memory[0].append(acc_0)
        self.coeff_memory[1].append(acc_1)

    def coefficients(self):
        return [self.ratio[0] * self.init_learning_rate["c"],
                self.ratio[1] * self.init_learning_rate["g"]]


@pytest.mark.parametrize("keep, rates", [(5, None), (3, {"c": 0.9, "g": 1.1}), (1, None)])
def test_mslr_matches_the_mlb_code_over_epochs(seed, keep, rates):
    rng = np.random.default_rng(seed)
    ref = AuthorsMSLR(rates, keep)
    m = MSLR(keep_memory_epoch=keep, base_rates=(rates["c"], rates["g"]) if rates else 1.0)
    state = m.init_state(2)
    for epoch in range(14):
        acc = [float(x) for x in rng.uniform(0.2, 0.9, 2)]
        ref.on_epoch_begin(epoch, *acc)
        m.on_epoch(state, epoch, names=["audio", "visual"],
                   val_acc={"audio": acc[0], "visual": acc[1]})
        k = m.coefficients(torch.tensor([3.0, 1.0]), alpha=0.0, beta_max=2.0, state=state)
        want = torch.tensor(ref.coefficients(), dtype=torch.float64)
        torch.testing.assert_close(state["ratio"] * state["base_rate"], want, rtol=1e-15, atol=0)
        assert torch.equal(k, want.float())
        if epoch > keep:  # the rule actually moved away from 1
            assert not torch.equal(state["ratio"], torch.ones(2, dtype=torch.float64))
    assert state["history"].shape == (13, 2)


def test_mslr_by_name_with_three_modalities_and_sequences():
    m = methods.get("mslr")
    st = m.init_state(3)
    names = ["a", "v", "t"]
    m.on_epoch(st, 0, names=names)  # epoch 0 needs no accuracies
    for e in range(1, 7):
        m.on_epoch(st, e, names=names, val_acc=[0.5, 0.5, 0.5 + 0.05 * e])
    k = functional.coefficients(torch.zeros(3), "mslr", state=st)
    last5 = [0.5 + 0.05 * e for e in range(1, 6)]
    assert k[:2].tolist() == [1.0, 1.0]
    assert k[2].item() == pytest.approx((0.5 + 0.3) / (sum(last5) / 5), rel=1e-7)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(), TypeError, r"needs the validation accuracy.*val_acc=\{'audio': \.\.\., 'visual'"),
    (dict(val_acc={"audio": 0.5}), ValueError, r"missing \['visual'\]"),
    (dict(val_acc={"audio": 0.5, "visual": 0.4, "text": 0.1}), ValueError, r"unknown \['text'\]"),
    (dict(val_acc={"audio": 0.5, "visual": float("nan")}), ValueError, "val_acc\\['visual'\\]"),
    (dict(val_acc={"audio": 0.5, "visual": -0.1}), ValueError, ">= 0"),
    (dict(val_acc=[0.5]), ValueError, "1 entries"),
    (dict(val_acc=0.5), TypeError, "must map modality names"),
    (dict(val_acc=[0.5, 0.5], lr=3), TypeError, "takes only val_acc"),
])
def test_mslr_bad_epoch_inputs_are_refused_before_anything_changes(kwargs, err, match):
    m = methods.get("mslr")
    st = m.init_state(2)
    before = {k: v.clone() for k, v in st.items()}
    with pytest.raises(err, match=match):
        m.on_epoch(st, 3, names=["audio", "visual"], **kwargs)
    assert all(torch.equal(before[k], st[k]) for k in st)


def test_mslr_options_are_validated():
    with pytest.raises(ValueError, match="keep_memory_epoch"):
        MSLR(keep_memory_epoch=0)
    with pytest.raises(ValueError, match="2 base rates for 3 modalities"):
        MSLR(base_rates=(1.0, 2.0)).init_state(3)
    m = methods.get("mslr")
    assert not m.needs_scores and m.default_filter == "all" and m.hyperparameters == ()


def test_mslr_nan_scores_still_skip_the_step():
    assert torch.isnan(functional.coefficients(torch.tensor([1.0, float("nan")]), "mslr")).all()


@pytest.mark.parametrize("backend", LIVE_BACKENDS)
def test_mslr_by_name_on_every_backend(backend):
    dev = device_for(backend)
    m = methods.get("mslr")
    st = m.init_state(2, dev)
    for e in range(8):
        m.on_epoch(st, e, names=["a", "v"], val_acc={"a": 0.4 + 0.01 * e, "v": 0.3})
    got = functional.coefficients(torch.ones(2, device=dev), "mslr", backend=backend, state=st)
    assert got.device.type == dev.type
    torch.testing.assert_close(got.cpu(), (st["ratio"] * st["base_rate"]).float().cpu(), rtol=0, atol=0)
