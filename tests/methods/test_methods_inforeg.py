"""InfoReg against a transcription of GeWu-Lab/InfoReg_CVPR2025 main.py (docs/semantics.md,
InfoReg): same model, data and SGD steps -> same gradients, parameters and window."""
import copy as cp

import pytest
import torch
import torch.nn as nn

from mmmod import functional, methods
from mmmod.methods.inforeg import snapshot_key
from mmmod.reference.proximal import proximal_

from _backends import HOST_BACKENDS, LIVE_BACKENDS, device_for


CLASSES = 4


class LateFusion(nn.Module):
    """Encoders + a concat head (the authors' `head`, bias shared as bias / M between the
    modalities' halves) + unimodal heads (`head_audio`, `head_video` of models/basic_model.py
    @ 4df625a). A label-revealing skip into one modality's logits makes it lead."""

    def __init__(self, widths=(6, 5), leader=0, feat=8):
        super().__init__()
        self.leader = leader
        self.nets = nn.ModuleList(nn.Sequential(nn.Linear(w, feat), nn.ReLU(), nn.Linear(feat, feat))
                                  for w in widths)
        self.head = nn.Linear(feat * len(widths), CLASSES)
        self.unimodal_heads = nn.ModuleList(nn.Linear(feat, CLASSES) for _ in widths)
        self.feat = feat

    def skip(self, xs, m):
        return 2.0 * xs[m][:, :CLASSES] if m == self.leader else 0.0

    def forward(self, *xs):
        """(concat-split logits per modality, unimodal-head logits per modality, fused logits):
        main.py @ ea7b9d5 lines 361-363 score the split, @ 41d887f line 139 the unimodal heads."""
        fs = [net(x) for net, x in zip(self.nets, xs)]
        m = len(fs)
        f = self.feat
        split = [torch.mm(fs[i], torch.transpose(self.head.weight[:, i * f:(i + 1) * f], 0, 1))
                 + self.head.bias / m + self.skip(xs, i) for i in range(m)]
        uni = [h(fi) + self.skip(xs, i) for i, (h, fi) in enumerate(zip(self.unimodal_heads, fs))]
        out = self.head(torch.cat(fs, 1)) + sum(self.skip(xs, i) for i in range(m))
        return split, uni, out


def batches(seed, n, widths=(6, 5), leader=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randint(0, CLASSES, (6,), generator=g)
        xs = []
        for i, w in enumerate(widths):
            x = 0.3 * torch.randn(6, w, generator=g)
            if i == leader:
                x[:, :CLASSES] += nn.functional.one_hot(y, CLASSES).float() * 3
            xs.append(x)
        out.append((xs, y))
    return out


def logits_of(revision, split, uni):
    # ea7b9d5 scores and trains the concat split; 41d887f the model's unimodal heads
    return split if revision == "2025-11" else uni


def sgd(model):
    # main.py: optim.SGD(lr=0.002, momentum=0.9, weight_decay=1e-4); a larger lr here so that
    # the traces move within a few steps
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


def authors_train(model, data, epochs, steps, revision):
    """The training loop of main.py, transcribed: @ ea7b9d5 (revision "2025-11") lines
    236-243 (window k from the audio trace), 259 (deepcopy), 361-380 (split logits, losses),
    456-461 (backward v, a, fused; scores), 465-495 (beta, beta2, proximal term), 507-514
    (Fisher of the encoders' Conv2d/Linear weights), 543 (step), 570-577 and 594-595 (traces),
    693-694 (trace lists start with ten zeros); @ 41d887f ("2025-03") the same loop with lines
    64-72, 139 (unimodal heads), 222-234 (threshold 0.04, the visual branch's test repeating
    the audio one), 437-438. The per-loss gradient recording passes only log and are left out.
    With a third modality (not in the authors' code) the strict leader over the others is
    regulated with the last constant (docs/semantics.md, InfoReg)."""
    opt = sgd(model)
    softmax, tanh = nn.Softmax(dim=1), nn.Tanh()
    criterion = nn.CrossEntropyLoss()
    M = len(model.nets)
    thr = 0.05 if revision == "2025-11" else 0.04
    consts = (0.95, 0.1) if revision == "2025-11" else (0.95, 0.0)
    trace_lists = [[0] * 10 for _ in range(M)]
    log = []
    it = iter(data)
    for epoch in range(epochs):
        audio_trace_list = trace_lists[0]
        if epoch == 0:
            k = 1
        else:
            tr1 = sum(audio_trace_list[-10:]) / 10
            tr2 = sum(audio_trace_list[-11:-1]) / 10
            k = (tr1 - tr2) / tr1
        global_model = cp.deepcopy(model)
        fims = [{name: torch.zeros_like(mod.weight) for name, mod in model.nets[i].named_modules()
                 if isinstance(mod, (nn.Conv2d, nn.Linear))} for i in range(M)]
        for _ in range(steps):
            xs, label = next(it)
            opt.zero_grad()
            split, uni, out = model(*xs)
            outs = logits_of(revision, split, uni)
            loss = criterion(out, label)
            uni_losses = [criterion(o, label) for o in outs]
            for lo in reversed(uni_losses):  # loss_out_v, then loss_out_a, then loss
                lo.backward(retain_graph=True)
            loss.backward()
            scores = [sum([softmax(o)[i][label[i]] for i in range(o.size(0))]) for o in outs]
            betas = [0] * M
            if M == 2:
                score_a, score_v = scores
                if (score_a > score_v) and k > thr:
                    gap = tanh(score_a - score_v)
                    betas[0] = 0.95 * torch.exp(gap)
                elif revision == "2025-11" and (score_a < score_v) and k > thr:
                    gap = tanh(score_v - score_a)
                    betas[1] = 0.1 * torch.exp(gap)
                # 2025-03: `elif (score_v < score_a)` repeats the first test: never taken
            else:
                for i in range(M):
                    runner_up = max(scores[j] for j in range(M) if j != i)
                    if scores[i] > runner_up and k > thr:
                        betas[i] = consts[min(i, 1)] * torch.exp(tanh(scores[i] - runner_up))
            with torch.no_grad():
                for i in range(M):
                    for model_param, global_model_param in zip(model.nets[i].parameters(),
                                                               global_model.nets[i].parameters()):
                        model_param.grad += betas[i] * (model_param - global_model_param)
            for i in range(M):
                for name, module in model.nets[i].named_modules():
                    if isinstance(module, (nn.Conv2d, nn.Linear)):
                        fims[i][name] += (module.weight.grad * module.weight.grad)
            log.append(dict(beta=[float(b) for b in betas]))
            opt.step()
        for i in range(M):
            fim_trace = 0
            for name in fims[i]:
                fim_trace += fims[i][name].mean().item()
            trace_lists[i].append(fim_trace)
        log.append(dict(k=k))
    return log, [t[10:] for t in trace_lists]


def mmmod_train(model, data, epochs, steps, revision, backend, first_epoch=0, method=None):
    """The same loop with ModulatedOptimizer (the user's loop: same losses, same backward
    order; the method sees only the gradients, the scores and the epochs)."""
    import mmmod
    name = method or ("inforeg" if revision == "2025-11" else "inforeg_2025_03")
    M = len(model.nets)
    names = ["audio", "visual", "text"][:M]
    opt = mmmod.ModulatedOptimizer(sgd(model), dict(zip(names, model.nets)), method=name,
                                   backend=backend)
    criterion = nn.CrossEntropyLoss()
    log, it = [], iter(data)
    for epoch in range(first_epoch, first_epoch + epochs):
        opt.set_epoch(epoch)
        window = opt._method_state["window"].clone()
        for _ in range(steps):
            xs, label = next(it)
            opt.zero_grad()
            split, uni, out = model(*xs)
            outs = logits_of(revision, split, uni)
            opt.observe(dict(zip(names, outs)), label)
            for lo in reversed([criterion(o, label) for o in outs]):
                lo.backward(retain_graph=True)
            criterion(out, label).backward()
            opt.step()
            log.append(dict(beta=opt._method_state["beta"].clone()))
        log.append(dict(window=window))
    opt.set_epoch(first_epoch + epochs)  # closes the last epoch
    return log, opt


@pytest.fixture(scope="module", autouse=True)
def earlier_revision():
    methods.register(methods.inforeg.InfoReg(revision="2025-03", name="inforeg_2025_03"),
                     replace=True)
    yield
    methods.unregister("inforeg_2025_03")


# every backend on two modalities with each leader; three modalities on the reference
PARITY_CASES = [(b, (6, 5), leader) for b in HOST_BACKENDS for leader in (0, 1)] + \
    [("torch", (6, 5, 7), 1)]


@pytest.mark.parametrize("revision", ["2025-11", "2025-03"])
@pytest.mark.parametrize("backend, widths, leader", PARITY_CASES)
def test_inforeg_matches_both_revisions_of_main_py(seed, backend, revision, widths, leader):
    """16 epochs of 4 steps with the authors' loop and with mmmod: the same betas every step,
    the same windows every epoch, the same traces and parameters to the parity tolerance;
    with a visual leader the current code regulates it with 0.1, the earlier never."""
    epochs, steps = 16, 4
    torch.manual_seed(seed)
    model = LateFusion(widths, leader)
    ours = cp.deepcopy(model)
    data = batches(seed, epochs * steps, widths, leader)
    ref_log, traces = authors_train(model, data, epochs, steps, revision)
    our_log, opt = mmmod_train(ours, data, epochs, steps, revision, backend)
    assert len(ref_log) == len(our_log)
    regulated = [0] * len(widths)
    for r, o in zip(ref_log, our_log):
        if "k" in r:
            thr = 0.05 if revision == "2025-11" else 0.04
            assert torch.equal(o["window"], torch.full((len(widths),), float(r["k"] > thr)))
            continue
        torch.testing.assert_close(o["beta"], torch.tensor(r["beta"], dtype=torch.float32),
                                   rtol=1e-6, atol=0)
        for i, b in enumerate(r["beta"]):
            regulated[i] += b > 0
    if revision == "2025-03" and leader != 0:
        assert regulated[leader] == 0  # the earlier code never regulates a non-audio leader
    else:
        assert regulated[leader] > 0, regulated
    for p, q in zip(model.parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt._method_state["traces"].T,
                               torch.tensor(traces, dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_one_based_epochs_train_as_zero_based(seed, backend):
    """A loop numbering its epochs from 1: the first set_epoch(1) opens the first epoch (no
    all-zero trace, window open), so the run equals the 0-based one step for step."""
    torch.manual_seed(seed)
    model = LateFusion((6, 5), 1)
    data = batches(seed, 5 * 3, (6, 5), 1)
    log0, opt0 = mmmod_train(cp.deepcopy(model), data, 5, 3, "2025-11", backend)
    log1, opt1 = mmmod_train(cp.deepcopy(model), data, 5, 3, "2025-11", backend, first_epoch=1)
    for a, b in zip(log0, log1):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert float(log1[0]["beta"][1]) > 0  # the first epoch is regulated
    assert torch.equal(opt0._method_state["traces"], opt1._method_state["traces"])
    assert opt1._method_state["traces"].shape[0] == 5 and bool((opt1._method_state["traces"] > 0).all())


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_modulation_window_gates_the_correction_not_the_trace(seed, backend):
    """modulation_ends=0: epoch 0 is corrected, epoch 1 is not (gradients reach the inner
    optimizer as backward left them, the history says modulated=False), and the Fisher trace
    of epoch 1 is still recorded (the window of a later epoch reads it)."""
    import mmmod
    torch.manual_seed(seed)
    model = LateFusion((6, 5), 0)
    seen = []

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            seen.append([p.grad.clone() for p in model.nets.parameters()])
            return super().step(closure)

    opt = mmmod.ModulatedOptimizer(Spy(model.parameters(), lr=0.05), {"a": model.nets[0], "v": model.nets[1]},
                                   method="inforeg", backend=backend, modulation_ends=0, history=64)
    crit = nn.CrossEntropyLoss()
    changed = []
    for epoch, chunk in enumerate([batches(seed, 3), batches(seed + 1, 3)]):
        opt.set_epoch(epoch)
        for xs, y in chunk:
            opt.zero_grad()
            split, _, out = model(*xs)
            opt.observe(dict(zip(["a", "v"], split)), y)
            (crit(out, y) + sum(crit(z, y) for z in split)).backward()
            raw = [p.grad.clone() for p in model.nets.parameters()]
            opt.step()
            changed.append((epoch, any(not torch.equal(r, s) for r, s in zip(raw, seen[-1]))))
    assert [c for e, c in changed if e == 1] == [False] * 3
    assert any(c for e, c in changed if e == 0)  # the first epoch's steps after the first move
    h = opt.history()
    assert h["modulated"].tolist() == [True] * 3 + [False] * 3
    opt.set_epoch(2)
    assert bool((opt._method_state["traces"][1] > 0).all())


def test_revisions_and_arguments():
    from mmmod.methods.inforeg import InfoReg
    cur, old = InfoReg(), InfoReg(revision="2025-03")
    assert cur.threshold == 0.05 and old.threshold == 0.04
    assert cur.modality_constants(0.95, 3) == [0.95, pytest.approx(0.1, abs=1e-16), pytest.approx(0.1, abs=1e-16)]
    assert old.modality_constants(0.95, 2) == [0.95, 0.0]
    assert cur.modality_constants(0.5, 2)[1] == pytest.approx(0.5 * 0.1 / 0.95)
    with pytest.raises(ValueError, match="revision"):
        InfoReg(revision="2024")
    with pytest.raises(ValueError, match="window_from"):
        InfoReg(window_from=-1)
    with pytest.raises(ValueError, match="window_from=2"):
        InfoReg(window_from=2).init_state(2)
    with pytest.raises(ValueError, match="constants"):
        InfoReg(constants=(0.0, 1.0))
    st = InfoReg(constants=(1.0, 1.0), window_from="own").init_state(2)
    InfoReg(constants=(1.0, 1.0)).coefficients(torch.tensor([2.0, 5.0]), alpha=0.95, beta_max=2.0, state=st)
    assert float(st["beta"][1]) == pytest.approx(0.95 * torch.exp(torch.tanh(torch.tensor(3.0))).item())
    functional.coefficients(torch.tensor([5.0, 5.0]), "inforeg", state=st)  # tie: nobody leads
    assert torch.equal(st["beta"], torch.zeros(2))


def test_inforeg_many_modalities_gap_to_the_runner_up():
    st = methods.get("inforeg").init_state(3)
    st["window"].copy_(torch.tensor([1.0, 1.0, 0.0]))
    functional.coefficients(torch.tensor([1.0, 4.0, 3.5]), "inforeg", alpha=0.95, state=st)
    assert st["beta"][0] == 0 and st["beta"][2] == 0
    assert float(st["beta"][1]) == pytest.approx(0.1 * torch.exp(torch.tanh(torch.tensor(0.5))).item())
    functional.coefficients(torch.tensor([1.0, 3.0, 3.5]), "inforeg", alpha=0.95, state=st)
    assert torch.equal(st["beta"], torch.zeros(3))  # the leader is outside its window


def authors_window(trace_list, threshold=0.05):
    trace_list = [0] * 10 + trace_list  # main.py @ ea7b9d5 lines 693-694
    tr1 = sum(trace_list[-10:]) / 10
    tr2 = sum(trace_list[-11:-1]) / 10
    return (tr1 - tr2) / tr1 > threshold


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


def test_inforeg_snapshot_is_taken_lazily_and_resumes_bitwise(seed, backend="torch"):
    torch.manual_seed(seed)
    model = LateFusion()
    _, opt = mmmod_train(cp.deepcopy(model), batches(seed, 6), 2, 3, "2025-11", backend)
    # a run that never calls on_epoch: the first step takes the snapshot
    m = methods.get("inforeg")
    st = m.init_state(2)
    params = [list(n.parameters()) for n in model.nets]
    before = [p.detach().clone() for ps in params for p in ps]
    for ps in params:
        for p in ps:
            p.grad = torch.zeros_like(p)
    m.correct_grads_(params, [[p.grad for p in ps] for ps in params], st)
    assert torch.equal(st[snapshot_key(0, 0)], before[0])
    # the method state is plain tensors: a copy continues bitwise
    st_a = opt._method_state
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
