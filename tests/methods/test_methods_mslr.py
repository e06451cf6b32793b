"""MSLR against a transcription of kkontras/MLB's Bias_Infusion_MSLR (tests/_mslr_official.py;
docs/semantics.md, MSLR)."""

import numpy as np
import pytest
import torch

from mmmod import functional, methods
from mmmod.methods.mslr import MSLR

from _backends import LIVE_BACKENDS, device_for
from _mslr_official import AuthorsMSLR


@pytest.mark.parametrize("keep, rates", [(5, None), (3, {"c": 0.9, "g": 1.1}), (1, None)])
def test_mslr_matches_the_mlb_code_over_epochs(seed, keep, rates):
    rng = np.random.default_rng(seed)
    ref = AuthorsMSLR(None, rates or {"c": 1, "g": 1}, keep)  # no model: the rule alone
    m = MSLR(keep_memory_epoch=keep, base_rates=(rates["c"], rates["g"]) if rates else 1.0)
    state = m.init_state(2)
    for epoch in range(14):
        acc = [float(x) for x in rng.uniform(0.2, 0.9, 2)]
        ref.on_epoch_begin(epoch, {"val": {"acc": {"c": acc[0], "g": acc[1]}}})
        m.on_epoch(state, epoch, names=["audio", "visual"],
                   val_acc={"audio": acc[0], "visual": acc[1]})
        k = m.coefficients(torch.tensor([3.0, 1.0]), alpha=0.0, beta_max=2.0, state=state)
        # on_backward_end's coefficients (its gradient scaling needs a model)
        want = torch.tensor([ref.ratio[0] * ref.init_learning_rate["c"],
                             ref.ratio[1] * ref.init_learning_rate["g"]], dtype=torch.float64)
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
