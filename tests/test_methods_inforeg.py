"""InfoReg against a transcription of GeWu-Lab/InfoReg_CVPR2025 main.py (docs/semantics.md,
InfoReg): same model, data and SGD steps -> same gradients, parameters and window."""
import copy as cp

import pytest
import torch
import torch.nn as nn

from mmmod import functional, methods
from mmmod.methods.inforeg import snapshot_key
from mmmod.reference.proximal import proximal_

from _backends import LIVE_BACKENDS, device_for


class TwoEncoders(nn.Module):
    def __init__(self, d_a=6, d_v=5, classes=4):
        super().__init__()
        self.audio_net = nn.Sequential(nn.Linear(d_a, 8), nn.ReLU(), nn.Linear(8, 8))
        self.visual_net = nn.Sequential(nn.Linear(d_v, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head_audio = nn.Linear(8, classes)
        self.head_video = nn.Linear(8, classes)

    def forward(self, x_a, x_v):
        # a label-revealing skip path makes audio lead from the first step (the only branch of
        # main.py that regulates anything)
        out_a = self.head_audio(self.audio_net(x_a)) + x_a[:, :4]
        out_v = self.head_video(self.visual_net(x_v))
        return out_a, out_v, out_a + out_v


def batches(seed, epochs, steps):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs * steps):
        y = torch.randint(0, 4, (6,), generator=g)
        onehot = nn.functional.one_hot(y, 6).float() * 3
        x_a = onehot + 0.3 * torch.randn(6, 6, generator=g)
        x_v = torch.randn(6, 5, generator=g)
        out.append((x_a, x_v, y))
    return out


def authors_train(model, data, epochs, steps, lr=0.05):
    """main.py train_epoch, lines 58-78 (window k, epoch snapshot), 214-243 (scores, beta,
    proximal term), 256 and 317-318 (Fisher trace of the audio encoder), 341 (trace list);
    the per-loss gradient recording passes (lines 171-211) only log and are left out."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    softmax, tanh = nn.Softmax(dim=1), nn.Tanh()
    criterion = nn.CrossEntropyLoss()
    audio_trace_list, log = [], []
    it = iter(data)
    for epoch in range(epochs):
        if epoch == 0:
            k = 1
        else:
            tr1 = sum(audio_trace_list[-10:]) / 10
            tr2 = sum(audio_trace_list[-11:-1]) / 10
            k = (tr1 - tr2) / tr1
        global_model = cp.deepcopy(model)
        fim_audio = {name: torch.zeros_like(mod.weight) for name, mod in model.named_modules()
                     if isinstance(mod, (nn.Conv2d, nn.Linear)) and "audio_net" in name}
        for _ in range(steps):
            x_a, x_v, label = next(it)
            opt.zero_grad()
            out_a, out_v, out = model(x_a, x_v)
            loss, loss_out_v, loss_out_a = (criterion(out, label), criterion(out_v, label),
                                            criterion(out_a, label))
            loss_out_v.backward(retain_graph=True)
            loss_out_a.backward(retain_graph=True)
            loss.backward()
            score_v = sum([softmax(out_v)[i][label[i]] for i in range(out_v.size(0))])
            score_a = sum([softmax(out_a)[i][label[i]] for i in range(out_a.size(0))])
            if (score_a > score_v) and k > 0.04:
                gap = tanh(score_a - score_v)
                beta = 0.95 * torch.exp(gap)
                beta2 = 0
            elif (score_v < score_a) and k > 0.04:  # sic: the same test as above (dead branch)
                gap = tanh(score_v - score_a)
                beta2 = 0.1 * torch.exp(gap)
                beta = 0
            else:
                beta = 0
                beta2 = 0
            with torch.no_grad():
                for model_param, global_model_param in zip(model.parameters(), global_model.parameters()):
                    if any(model_param is p for p in model.audio_net.parameters()):
                        model_param.grad += beta * (model_param - global_model_param)
                    if any(model_param is p for p in model.visual_net.parameters()):
                        model_param.grad += beta2 * (model_param - global_model_param)
            for name, module in model.named_modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)) and "audio_net" in name:
                    fim_audio[name] += (module.weight.grad * module.weight.grad)
            log.append(dict(grads=[p.grad.clone() for p in model.parameters()],
                            beta=float(beta.detach()) if torch.is_tensor(beta) else float(beta),
                            score_a=score_a.item(), score_v=score_v.item()))
            opt.step()
        fim_trace_audio = 0
        for name in fim_audio:
            fim_audio[name] = fim_audio[name].mean().item()
            fim_trace_audio += fim_audio[name]
        audio_trace_list.append(fim_trace_audio)
        log.append(dict(k=k))
    return log, audio_trace_list


def mmmod_train(model, data, epochs, steps, lr=0.05, method=None):
    """What ModulatedOptimizer does with the InfoReg hooks (docs/semantics.md, InfoReg)."""
    m = method or methods.get("inforeg")
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    params = [list(model.audio_net.parameters()), list(model.visual_net.parameters())]
    state = m.init_state(2)
    log, it = [], iter(data)
    for epoch in range(epochs):
        m.on_epoch(state, epoch, names=["audio", "visual"], params=params)
        window = state["window"].clone()
        for _ in range(steps):
            x_a, x_v, label = next(it)
            opt.zero_grad()
            out_a, out_v, out = model(x_a, x_v)
            criterion(out_v, label).backward(retain_graph=True)
            criterion(out_a, label).backward(retain_graph=True)
            criterion(out, label).backward()
            s = functional.scores([out_a, out_v], label, backend="torch")
            k = functional.coefficients(s, m.name, state=state)
            assert torch.equal(k, torch.ones(2))
            m.correct_grads_(params, [[p.grad for p in ps] for ps in params], state)
            log.append(dict(grads=[p.grad.clone() for p in model.parameters()],
                            beta=state["beta"].clone()))
            opt.step()
        log.append(dict(window=window))
    m.on_epoch(state, epochs, names=["audio", "visual"], params=params)  # closes the last epoch
    return log, state


@pytest.mark.parametrize("epochs, steps", [(3, 4), (1, 6)])
def test_inforeg_matches_main_py_when_audio_leads(seed, epochs, steps):
    torch.manual_seed(seed)
    model = TwoEncoders()
    ours = cp.deepcopy(model)
    data = batches(seed, epochs, steps)
    ref_log, traces = authors_train(model, data, epochs, steps)
    our_log, state = mmmod_train(ours, data, epochs, steps)
    assert len(ref_log) == len(our_log)
    regulated = 0
    for r, o in zip(ref_log, our_log):
        if "k" in r:
            assert float(o["window"][0]) == float(r["k"] > 0.04)
            continue
        assert r["score_a"] > r["score_v"], "test data must make audio lead"
        torch.testing.assert_close(float(o["beta"][0]), r["beta"], rtol=1e-6, atol=0)
        assert float(o["beta"][1]) == 0.0
        regulated += r["beta"] > 0
        for gr, go in zip(r["grads"], o["grads"]):
            torch.testing.assert_close(go, gr, rtol=1e-5, atol=1e-7)
    assert regulated > 0
    for p, q in zip(model.parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state["traces"][:, 0], torch.tensor(traces, dtype=torch.float64),
                               rtol=1e-5, atol=0)


def test_inforeg_regulates_a_leading_visual_encoder_where_main_py_cannot():
    """main.py's elif repeats the first test (score_v < score_a), so the visual encoder is never
    regulated; mmmod regulates whichever modality strictly leads (documented deviation)."""
    s = torch.tensor([2.0, 5.0])
    st = methods.get("inforeg").init_state(2)
    functional.coefficients(s, "inforeg", alpha=0.95, state=st)
    assert float(st["beta"][0]) == 0.0
    assert float(st["beta"][1]) == pytest.approx(0.95 * torch.exp(torch.tanh(torch.tensor(3.0))).item())
    functional.coefficients(torch.tensor([5.0, 5.0]), "inforeg", state=st)  # tie: nobody leads
    assert torch.equal(st["beta"], torch.zeros(2))


def test_inforeg_many_modalities_gap_to_the_runner_up():
    st = methods.get("inforeg").init_state(3)
    st["window"].copy_(torch.tensor([1.0, 1.0, 0.0]))
    functional.coefficients(torch.tensor([1.0, 4.0, 3.5]), "inforeg", alpha=0.5, state=st)
    assert st["beta"][0] == 0 and st["beta"][2] == 0
    assert float(st["beta"][1]) == pytest.approx(0.5 * torch.exp(torch.tanh(torch.tensor(0.5))).item())
    functional.coefficients(torch.tensor([1.0, 3.0, 3.5]), "inforeg", alpha=0.5, state=st)
    assert torch.equal(st["beta"], torch.zeros(3))  # the leader is outside its window


def authors_window(trace_list):
    tr1 = sum(trace_list[-10:]) / 10
    tr2 = sum(trace_list[-11:-1]) / 10
    return (tr1 - tr2) / tr1 > 0.04


def test_window_detector_matches_main_py_on_long_histories(seed):
    g = torch.Generator().manual_seed(seed)
    # rising, then flat, then falling traces: the window opens and closes
    traces = torch.cat([torch.linspace(1, 5, 8), torch.full((6,), 5.0), torch.linspace(5, 1, 10)])
    traces = (traces * (1 + 0.01 * torch.rand(traces.shape, generator=g))).double()
    m = methods.get("inforeg")
    st = m.init_state(2)
    p = [[torch.zeros(3)], [torch.zeros(2)]]
    m.on_epoch(st, 0, names=["a", "v"], params=p)
    seen = set()
    for e in range(1, len(traces) + 1):
        st["fisher"].copy_(torch.stack([traces[e - 1], traces[e - 1] * 0.5]))
        m.on_epoch(st, e, names=["a", "v"], params=p)
        want = authors_window([float(x) for x in traces[:e]])
        assert bool(st["window"][0]) == want, e
        seen.add(want)
    assert seen == {True, False}


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 0), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
def test_proximal_reference_dtypes_noncontiguous_none_and_empty(seed, dtype, tol):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(5, 7, generator=g).to(dtype), torch.randn(13, generator=g).to(dtype),
          torch.randn(0, 3).to(dtype), torch.randn(4, 6, generator=g).to(dtype)]
    snaps = [p + 0.1 * torch.randn(p.shape, generator=g).to(dtype) for p in ps]
    grads = [torch.randn(7, 5, generator=g).to(dtype).t(), torch.randn(13, generator=g).to(dtype),
             torch.randn(0, 3).to(dtype), None]
    want = [None if gr is None else (gr.float() + 0.7 * (p.float() - s.float())).to(dtype)
            for gr, p, s in zip(grads, ps, snaps)]
    inc = proximal_(grads, ps, snaps, torch.tensor(0.7))
    for gr, w in zip(grads, want):
        if gr is not None:
            torch.testing.assert_close(gr, w, rtol=tol, atol=tol)
    want_inc = sum(w.float().square().mean().double() for w in want[:1])  # only >= 2-d with grads
    torch.testing.assert_close(inc, want_inc, rtol=1e-6, atol=0)


def test_inforeg_snapshot_is_taken_lazily_and_resumes_bitwise(seed):
    torch.manual_seed(seed)
    model = TwoEncoders()
    data = batches(seed, 2, 3)
    log_a, st_a = mmmod_train(cp.deepcopy(model), data, 2, 3)
    # a run that never calls on_epoch(0): the first step takes the snapshot
    m = methods.get("inforeg")
    st = m.init_state(2)
    params = [list(model.audio_net.parameters()), list(model.visual_net.parameters())]
    before = [p.detach().clone() for ps in params for p in ps]
    for ps in params:
        for p in ps:
            p.grad = torch.zeros_like(p)
    m.correct_grads_(params, [[p.grad for p in ps] for ps in params], st)
    assert torch.equal(st[snapshot_key(0, 0)], before[0])
    # the method state is plain tensors: a copy continues bitwise
    clone = {k: v.clone() for k, v in st_a.items()}
    for s in (st_a, clone):
        functional.coefficients(torch.tensor([3.0, 1.0]), "inforeg", state=s)
    assert set(clone) == set(st_a) and all(torch.equal(clone[k], st_a[k]) for k in st_a)


def test_on_epoch_needs_params():
    with pytest.raises(TypeError, match="needs params"):
        methods.get("inforeg").on_epoch(methods.get("inforeg").init_state(2), 0, names=["a", "v"])
    m = methods.get("inforeg")
    assert m.shard_safe and m.whole_tensor_stats and m.corrects_grads


@pytest.mark.parametrize("backend", LIVE_BACKENDS)
def test_inforeg_by_name_on_every_backend(backend):
    dev = device_for(backend)
    st = methods.get("inforeg").init_state(2, dev)
    k = functional.coefficients(torch.tensor([3.0, 1.0], device=dev), "inforeg",
                                backend=backend, state=st)
    assert torch.equal(k.cpu(), torch.ones(2)) and float(st["beta"][0]) > 0


def test_optimizer_skips_the_scaling_pass_for_inforeg(monkeypatch):
    """InfoReg's coefficients are always 1: the optimizer runs its correction but no scaling
    pass over the gradients (and no update snapshot), with the same result."""
    import mmmod
    from mmmod.optim import update
    calls = []
    real = mmmod.functional.modulate_
    monkeypatch.setattr(mmmod.functional, "modulate_", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(update, "snapshot", lambda *a, **k: calls.append(2))
    enc = [torch.nn.Linear(3, 4), torch.nn.Linear(2, 4)]
    params = [p for e in enc for p in e.parameters()]
    opt = mmmod.ModulatedOptimizer(torch.optim.SGD(params, lr=0.1), {"a": enc[0], "b": enc[1]},
                                   method="inforeg", backend="torch", apply_to="update")
    opt.set_epoch(0)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.observe({"a": torch.tensor([[4.0, 0.0]]), "b": torch.tensor([[0.0, 0.0]])}, torch.tensor([0]))
    opt.step()
    assert calls == [] and torch.equal(opt._coeffs, torch.ones(2))


@pytest.mark.parametrize("bad", ["shape", "dtype", "missing"])
def test_checkpoint_with_a_snapshot_that_does_not_fit_is_refused_before_anything_changes(bad):
    """A loaded InfoReg snapshot must match its parameter (shape, dtype, present for every
    selected tensor once any is): refused at load_state_dict, naming the modality and tensor,
    with the optimizer and its inner state untouched."""
    import mmmod
    torch.manual_seed(0)
    enc = [torch.nn.Linear(3, 4), torch.nn.Linear(2, 4)]
    params = [p for e in enc for p in e.parameters()]
    opt = mmmod.ModulatedOptimizer(torch.optim.SGD(params, lr=0.1, momentum=0.9),
                                   {"a": enc[0], "b": enc[1]}, method="inforeg", backend="torch")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.observe({"a": torch.tensor([[4.0, 0.0]]), "b": torch.tensor([[0.0, 0.0]])},
                torch.tensor([0]))
    opt.step()
    sd = cp.deepcopy(opt.state_dict())
    key = snapshot_key(1, 0)
    snap = sd["mmmod"]["method_state"][key]
    if bad == "shape":
        sd["mmmod"]["method_state"][key] = snap[:, :1].clone()
    elif bad == "dtype":
        sd["mmmod"]["method_state"][key] = snap.double()
    else:
        del sd["mmmod"]["method_state"][key]
    sd["mmmod"]["step_count"] = 7
    before = cp.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="snapshot of tensor 0 of modality 'b'"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["mmmod"]["step_count"] == before["mmmod"]["step_count"] == 1
    for k, v in before["mmmod"]["method_state"].items():
        assert torch.equal(after["mmmod"]["method_state"][k], v), k
    for i, st in before["state"].items():
        assert torch.equal(after["state"][i]["momentum_buffer"], st["momentum_buffer"])
