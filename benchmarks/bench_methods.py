"""AGM, MSLR and InfoReg: the authors' eager step (transcribed) against ``ModulatedOptimizer``.

Workload: bench_step's (the OGM-GE audio-visual model, two ResNet-18 encoders and a concat
fusion head; ``--smoke`` at 1/8 width), SGD (lr 1e-3, momentum 0.9, weight decay 1e-4), the
same saved gradients restored before every call. Per method, both contenders run the method's
whole step -- scores, coefficients, the gradient change -- then ``inner.step()``:

* ``paper``: the authors' code style, transcribed (Python loops over ``named_parameters``,
  per-sample score comprehensions, host reads of scores and coefficients):
  AGM (docs/semantics.md section 8; the scaling as BalanceBenchmark's ``AGMTrainer``: every
  encoder gradient of >= 2 dims times the coefficient), MSLR (section 9; MLB's
  ``Bias_Infusion_MSLR._equalize_gradients``: every encoder gradient times ratio x base rate,
  epoch 0), InfoReg (section 10; main.py lines 214-256: scores, beta, ``param.grad += beta
  (param - global_param)`` over ``zip(model.named_parameters(), global_model.named_parameters())``
  and the per-element Fisher accumulators of the Conv2d/Linear weights);
* ``mmmod:cpu``: ``opt.observe(logits, labels); opt.step()`` with ``backend="cpu"`` (the
  compiled CPU extension; InfoReg's correction is the fused ``mmmod::proximal_``).

Before timing, from the same parameters, optimizer state and gradients, each contender takes
one step and the parameters after it are compared (``agrees``: within ``RTOL`` relative to
each tensor's largest magnitude). InfoReg's logits get a label bonus on the audio side so audio
leads (the only branch main.py regulates) and the parameters are moved off their epoch-start
snapshot, so the correction is not zero.

    python -m benchmarks.bench_methods [--quick|--smoke] [--batch N]
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from . import common, workloads
from .bench_step import Grads, inputs, make_inner

N_CLASSES = 6
#: agreement bound of the parameters after one step (float32 rounding of k and of the update)
RTOL = 1e-5
METHODS = ("agm", "mslr", "inforeg")
NAMES = ("audio", "visual")
softmax = nn.Softmax(dim=1)
tanh = nn.Tanh()


# ---- the authors' steps, transcribed ------------------------------------------------------
class PaperAGM:
    """AGM_main.py 86-111 (scores, ratios, coefficient, running mean in Python floats) and the
    BalanceBenchmark-style scaling loop."""

    def __init__(self, alpha=1.5, cap=10.0):
        self.alpha, self.cap = alpha, cap
        self.mean = [0.0, 0.0]
        self.t = 0

    def step(self, model, logits, label):
        s = []
        for out in logits:
            p = softmax(out)
            s.append(sum([-math.log(max(p[i][label[i]].item(), 1e-8))
                          for i in range(out.size(0))]) / out.size(0))
        self.t += 1
        r_a, r_v = math.exp(s[1] - s[0]), math.exp(s[0] - s[1])
        eta_a, eta_v = (math.exp(self.mean[1] - self.mean[0]),
                        math.exp(self.mean[0] - self.mean[1]))
        k = [math.exp(self.alpha * min(eta_a - r_a, self.cap)),
             math.exp(self.alpha * min(eta_v - r_v, self.cap))]
        self.mean = [self.mean[m] * (self.t - 1) / self.t + s[m] / self.t for m in range(2)]
        for name, parms in model.named_parameters():
            layer = str(name).split('.')[1]
            for m, modality in enumerate(NAMES):
                if modality in layer and len(parms.grad.size()) > 1:
                    parms.grad *= k[m]
        return k


class PaperMSLR:
    """Bias_Infusion_MSLR: epoch 0, ratio 1, base rate 1 per modality; every encoder gradient
    times its learning-rate ratio."""

    def __init__(self):
        self.ratio = [1.0, 1.0]
        self.base = [1.0, 1.0]

    def step(self, model, logits, label):
        k = [self.ratio[m] * self.base[m] for m in range(2)]
        for name, parms in model.named_parameters():
            layer = str(name).split('.')[1]
            for m, modality in enumerate(NAMES):
                if modality in layer and parms.grad is not None:
                    parms.grad = parms.grad * k[m]
        return k


class PaperInfoReg:
    """main.py 214-256: score sums per sample, the audio branch's beta, the proximal term over
    both models' named parameters, the per-element Fisher accumulators."""

    def __init__(self, model, global_model, k_window=1.0):
        self.global_model = global_model
        self.k = k_window
        self.fim = {name: torch.zeros_like(mod.weight) for name, mod in model.named_modules()
                    if isinstance(mod, (nn.Conv2d, nn.Linear)) and "audio_net" in name}

    def step(self, model, logits, label):
        out_a, out_v = logits
        score_v = sum([softmax(out_v)[i][label[i]] for i in range(out_v.size(0))])
        score_a = sum([softmax(out_a)[i][label[i]] for i in range(out_a.size(0))])
        beta = 0
        if (score_a > score_v) and self.k > 0.04:
            beta = 0.95 * torch.exp(tanh(score_a - score_v))
        for (name, param), (_, gparam) in zip(model.named_parameters(),
                                              self.global_model.named_parameters()):
            if "audio_net" in name and param.grad is not None:
                param.grad += beta * (param - gparam)
        for name, module in model.named_modules():
            if name in self.fim:
                self.fim[name] += module.weight.grad * module.weight.grad
        return beta


# ---- harness ------------------------------------------------------------------------------
def _snapshot(model, inner):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(inner.state_dict())


def _restore(model, inner, saved):
    with torch.no_grad():
        for p, s in zip(model.parameters(), saved[0]):
            p.copy_(s)
    inner.load_state_dict(copy.deepcopy(saved[1]))


def _max_rel_diff(a, b):
    worst = 0.0
    for x, y in zip(a, b):
        scale = float(x.double().abs().max()) if x.numel() else 0.0
        d = float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
        if d > 0:
            worst = max(worst, d / max(scale, 1e-30))
    return worst


def run(args) -> dict:
    import mmmod
    from mmmod import ModulatedOptimizer

    device = common.pick_device(args.device)
    if device.type != "cpu":
        raise SystemExit("bench_methods compares against backend 'cpu': run it with --device cpu")
    live, why = mmmod.backends.status("cpu")
    if not live:
        raise SystemExit(f"bench_methods needs the CPU extension: {why}")
    mt = common.min_time(args, 2.0)
    batch = args.batch or (2 if args.smoke else 8 if args.quick else 64)
    torch.manual_seed(0)
    model = workloads.Wrapped(workloads.AVClassifier(N_CLASSES, 8 if args.smoke else 64)).to(device)
    enc = {"audio": model.module.audio_net, "visual": model.module.visual_net}
    audio, visual, labels = inputs(batch, device, args.smoke)
    with torch.no_grad():
        _, z_a, z_v = model(audio, visual)
    logits = [z_a.detach(), z_v.detach()]
    lead = [z_a.detach() + 3 * nn.functional.one_hot(labels, N_CLASSES), z_v.detach()]
    grads = Grads(model.parameters())
    inner = make_inner("sgd", model.parameters(), device)
    grads.reset()
    inner.step()  # momentum buffers exist before anything is compared or timed
    results = {"batch": batch, "methods": {}}
    for method in METHODS:
        zs = lead if method == "inforeg" else logits
        global_model = None
        if method == "inforeg":
            global_model = copy.deepcopy(model)  # main.py line 78, at the epoch start
        opt = ModulatedOptimizer(inner, enc, method=method, backend="cpu")
        opt.set_epoch(0)  # InfoReg: the snapshot, equal to global_model
        if method == "inforeg":
            with torch.no_grad():  # as if some steps of the epoch had run
                g = torch.Generator().manual_seed(1)
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g).to(p) * 1e-2)
        paper = {"agm": lambda: PaperAGM(), "mslr": lambda: PaperMSLR(),
                 "inforeg": lambda: PaperInfoReg(model, global_model)}[method]
        contender_state = {"paper": paper()}

        def paper_fn():
            contender_state["paper"].step(model, zs, labels)
            inner.step()

        def mm_fn():
            opt.observe(zs, labels)
            opt.step()

        # outputs checked before timing: one step each from the same state
        saved = _snapshot(model, inner)
        after = {}
        for name, fn in (("paper", paper_fn), ("mmmod:cpu", mm_fn)):
            _restore(model, inner, saved)
            grads.reset()
            contender_state["paper"] = paper()
            fn()
            after[name] = [p.detach().clone() for p in model.parameters()]
        _restore(model, inner, saved)
        diff = _max_rel_diff(after["paper"], after["mmmod:cpu"])
        changed = _max_rel_diff(saved[0], after["paper"]) > 0
        check = {"max_rel_diff": diff, "rtol": RTOL, "agrees": diff <= RTOL and changed}
        common.log(f"{method}: paper vs mmmod:cpu max rel diff {diff:.3g} agrees {check['agrees']}")
        rows = {}
        for name, fn in (("paper", paper_fn), ("mmmod:cpu", mm_fn)):
            grads.reset()
            syn = common.count_syncs(fn, device)
            t = common.time_fn(fn, device, reset=grads.reset, min_time=mt,
                               min_reps=1 if args.smoke else 3, warmup=0 if args.smoke else 1)
            rows[name] = {**t, **syn}
            common.log(f"{method} {name}: {common.fmt_time(t['median_s'])} syncs {syn['syncs']}")
        _restore(model, inner, saved)
        rows["mmmod:cpu"]["speedup_vs_paper"] = common.ratio(rows["paper"]["median_s"],
                                                             rows["mmmod:cpu"]["median_s"])
        results["methods"][method] = {"steps": rows, "check": check}
    # the step of the inner optimizer alone, for scale
    grads.reset()
    results["inner"] = common.time_fn(lambda: inner.step(), device, reset=grads.reset,
                                      min_time=mt, min_reps=1 if args.smoke else 3)
    tab = render(results)
    print(tab)
    common.write_results("bench_methods", device, args, results, tab)
    return results


def render(results) -> str:
    t_in = results["inner"]["median_s"]
    rows = []
    for method, r in results["methods"].items():
        for name, s in r["steps"].items():
            rows.append([method, name, common.fmt_time(s["median_s"]),
                         common.fmt_time(s["median_s"] - t_in), s["syncs"],
                         s.get("speedup_vs_paper"),
                         f"{r['check']['max_rel_diff']:.2g} ({'yes' if r['check']['agrees'] else 'NO'})"
                         if name != "paper" else ""])
    head = (f"batch {results['batch']}; SGD step alone {common.fmt_time(t_in)}; "
            f"method cost = step - SGD step\n\n")
    return head + common.table(["method", "contender", "step", "method cost", "host syncs",
                                "x vs paper", "agrees (max rel diff)"], rows)


def main(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None)
    args, _ = p.parse_known_args(argv)
    with common.session(args):
        return run(args)


if __name__ == "__main__":
    main()
