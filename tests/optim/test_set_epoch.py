"""``set_epoch`` never goes back: the method's per-epoch work (MSLR's accuracy history,
InfoReg's snapshot and traces) would run again for an epoch that has passed. Going back is
refused by name with nothing changed; repeating the current epoch stays a no-op; a loaded
checkpoint sets the epoch it continues from."""
import copy

import pytest
import torch

from mmmod import backends
from _models import TwoEncoder, batch, make, train_step

pytestmark = pytest.mark.filterwarnings("ignore:mmmod. no fused backend")

LIVE = [b for b in ("torch", "cpu") if backends.status(b)[0]]


def _inputs(method, e):
    return {"val_acc": [0.5 + 0.05 * e, 0.6]} if method == "mslr" else {}


@pytest.mark.parametrize("backend", LIVE)
@pytest.mark.parametrize("method", ["mslr", "inforeg", "ogm_ge"])
def test_going_back_is_refused_and_changes_nothing(backend, method):
    torch.manual_seed(0)
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.05), method=method,
                      backend=backend)
    for e in range(3):
        opt.set_epoch(e, **_inputs(method, e))
        train_step(model, opt, names, *batch())
    state = copy.deepcopy(opt._method_state)
    with pytest.raises(ValueError, match=r"set_epoch\(1\) after epoch 2.*backwards"):
        opt.set_epoch(1, **_inputs(method, 1))
    assert opt.epoch == 2
    assert state.keys() == opt._method_state.keys()
    assert all(torch.equal(v, opt._method_state[k]) for k, v in state.items())
    opt.set_epoch(2, **_inputs(method, 2))  # the same epoch again: no per-epoch work
    assert all(torch.equal(v, opt._method_state[k]) for k, v in state.items())
    opt.set_epoch(3, **_inputs(method, 3))


def test_a_loaded_checkpoint_continues_from_its_epoch():
    torch.manual_seed(0)
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.05), method="mslr",
                      backend="torch")
    opt.set_epoch(4, val_acc=[0.5, 0.6])
    train_step(model, opt, names, *batch())
    sd = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2, _ = make(model2, torch.optim.SGD(model2.parameters(), lr=0.05), method="mslr",
                   backend="torch")
    opt2.load_state_dict(sd)
    with pytest.raises(ValueError, match="backwards"):
        opt2.set_epoch(3, val_acc=[0.5, 0.6])
    opt2.set_epoch(5, val_acc=[0.55, 0.6])
    assert opt2._method_state["history"].shape[0] == 2
