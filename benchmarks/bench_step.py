"""Whole optimizer step: ``ModulatedOptimizer`` (observe + step) against the inner step alone.

Model: the OGM-GE audio-visual model, two ResNet-18 encoders (conv weights modulated: 40
tensors, 22.3 M elements) and a concat-fusion head, CREMA-D sizes (6 classes; audio spectrogram
[1, 257, 188], one 224x224 visual frame), batch 64. Inner optimizers: SGD (lr 1e-3, momentum
0.9, weight decay 1e-4: the official script) and AdamW (lr 1e-4, weight decay 1e-2).

Per optimizer, timed with the same gradients restored before every call:
* ``inner``: ``inner.step()`` alone;
* ``paper``: the official eager scores + coefficients + OGM-GE loop, then ``inner.step()``;
* ``plain``: the plain-torch rewrite, then ``inner.step()``;
* ``mmmod:<backend>``: ``opt.observe(logits, labels); opt.step()`` for ``torch`` and every
  live fused backend;
* ``mmmod:<backend> fused``: the same with ``fused=True`` (modulation inside the inner update,
  docs/fused.md), for every live compiled backend (``torch`` only under ``--smoke``: its
  reference takes seconds per step);
* ``mmmod:<backend> ogm`` and ``mmmod:<backend> ogm fused``: method OGM (no noise, no
  statistics pass), unfused and fused, for the same backends.
Before timing, every fused contender is checked against its unfused counterpart: from the same
parameters and optimizer state, fresh wrappers take one step each and the parameters and the
optimizer state are compared (bit for bit on the CPU for SGD and Adam/AdamW; ``ADAM_ULPS``
is the bound Adam/AdamW is held to, docs/fused.md). The targets of the fused update are
reported under the table: OGM-GE + SGD fused over unfused, OGM + SGD fused over the inner step
alone, from round-robin medians (inner, mmmod:<backend> [ogm] [fused] called in turn).
``overhead %`` = (t - t_inner) / t_inner. The forward + backward of the same model at the same
batch is timed once, and ``% of train step`` = (t - t_inner) / (t_fwd_bwd + t_inner): what the
modulation adds to a real training step. On CUDA the modulated step is also captured in a CUDA
graph (AdamW with ``capturable=True``) and the result reported.

    python -m benchmarks.bench_step [--quick|--smoke] [--batch N]
"""
from __future__ import annotations

import copy

import torch

from . import common, paper_eager, plain_torch, workloads

ALPHA = 0.8
N_CLASSES = 6
AUDIO_SHAPE = (1, 257, 188)
VISUAL_SHAPE = (3, 1, 224, 224)
# fused vs unfused after one step: SGD must be bitwise; Adam/AdamW within this many float32 ulps
# of each tensor's largest magnitude (bitwise on the CPU: docs/fused.md, tests/kernels/test_fused_update.py)
ADAM_ULPS = 0


def make_inner(kind, params, device):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    kw = {"capturable": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, **kw)


def inputs(batch, device, smoke, seed=0):
    g = torch.Generator().manual_seed(seed)
    a_shape = (1, 32, 24) if smoke else AUDIO_SHAPE
    v_shape = (3, 1, 32, 32) if smoke else VISUAL_SHAPE
    audio = torch.randn(batch, *a_shape, generator=g).to(device)
    visual = torch.randn(batch, *v_shape, generator=g).to(device)
    labels = torch.randint(0, N_CLASSES, (batch,), generator=g).to(device)
    return audio, visual, labels


class Grads:
    """A saved set of gradients for every parameter, restored in place before each call."""

    def __init__(self, params, seed=0):
        self.params = list(params)
        g = torch.Generator().manual_seed(seed)
        self.saved = [(torch.randn(p.shape, generator=g) * 1e-3).to(p.device) for p in self.params]
        self.reset()

    def reset(self):
        for p in self.params:
            if p.grad is None:
                p.grad = torch.empty_like(p)
        torch._foreach_copy_([p.grad for p in self.params], self.saved)


def try_capture(fn, device) -> dict:
    """Capture ``fn`` in a CUDA graph after a side-stream warm-up; report what happened."""
    try:
        s = torch.cuda.Stream(device)
        s.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize(device)
        return {"capturable": True}
    except Exception as e:  # noqa: BLE001 - reported, not raised
        torch.cuda.synchronize(device)
        return {"capturable": False, "error": f"{type(e).__name__}: {e}"[:400]}


def _optimizer_tensors(inner, params):
    """Every parameter and every tensor of its optimizer state, in a fixed order."""
    out = []
    for p in params:
        out.append(("param", p))
        for key in sorted(inner.state.get(p, {})):
            v = inner.state[p][key]
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                out.append((key, v))
    return out


@torch.no_grad()
def check_fused(inner, params, grads, make_opt, logits, labels, kind) -> dict:
    """One step of a fresh unfused wrapper and one of a fresh fused wrapper from the same
    parameters and optimizer state (the same noise stream: both at step 0); the largest
    difference of the parameters and the state after it, in float32 ulps of each tensor's
    largest magnitude. Parameters and state are restored afterwards."""
    params = list(params)
    saved_p = [p.detach().clone() for p in params]
    saved_s = copy.deepcopy(inner.state_dict())
    after = []
    for fused in (False, True):
        for p, s in zip(params, saved_p):
            p.copy_(s)
        inner.load_state_dict(copy.deepcopy(saved_s))
        grads.reset()
        opt = make_opt(fused)
        with torch.enable_grad():  # observe() under no_grad is an evaluation pass: recorded nothing
            opt.observe(logits, labels)
        opt.step()
        after.append([(k, t.detach().clone()) for k, t in _optimizer_tensors(inner, params)])
    for p, s in zip(params, saved_p):
        p.copy_(s)
    inner.load_state_dict(saved_s)
    grads.reset()
    a, b = after
    same_keys = [k for k, _ in a] == [k for k, _ in b]
    bitwise = same_keys and all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b))
    ulps = 0.0
    if same_keys:
        for (_, x), (_, y) in zip(a, b):
            scale = x.double().abs().max() if x.numel() else torch.zeros((), dtype=torch.float64)
            d = (x.double() - y.double()).abs().max() if x.numel() else scale
            if float(d) > 0:
                ulps = max(ulps, float(d / (torch.finfo(torch.float32).eps
                                            * scale.clamp_min(1e-30))))
    bound = 0 if kind == "sgd" else ADAM_ULPS
    return {"bitwise_vs_unfused": bitwise, "max_ulps_vs_unfused": ulps,
            "ulps_bound": bound, "same_state_keys": same_keys,
            "agrees": same_keys and (bitwise if bound == 0 else ulps <= bound)}


def run(args) -> dict:
    from mmmod import ModulatedOptimizer

    device = common.pick_device(args.device)
    names = common.contenders(device, args.backends)
    mt = common.min_time(args, 2.0)
    batch = args.batch or (2 if args.smoke else 8 if (args.quick and device.type == "cpu") else 64)
    torch.manual_seed(0)
    # --smoke: the same network at 1/8 width (so the torch reference stays fast)
    model = workloads.Wrapped(workloads.AVClassifier(N_CLASSES, 8 if args.smoke else 64)).to(device)
    enc = {"audio": model.module.audio_net, "visual": model.module.visual_net}
    conv_names = ("audio", "visual")
    test = workloads.WORKLOADS["resnet18_conv"].dim_test()
    audio, visual, labels = inputs(batch, device, args.smoke)

    # forward + backward once for the logits the scores use, then timed on its own
    def fwd_bwd():
        model.zero_grad(set_to_none=False)
        out, z_a, z_v = model(audio, visual)
        torch.nn.functional.cross_entropy(out, labels).backward()
        return z_a.detach(), z_v.detach()

    model.train()
    z_a, z_v = fwd_bwd()
    logits = [z_a, z_v]
    t_fb = common.time_fn(fwd_bwd, device, min_time=0 if not args.smoke else 0,
                          min_reps=1 if args.smoke else 2 if device.type == "cpu" else 10,
                          warmup=0 if device.type == "cpu" else 2)
    common.log(f"forward+backward at batch {batch}: {common.fmt_time(t_fb['median_s'])}")
    grads = Grads(model.parameters())
    results = {"batch": batch, "fwd_bwd": t_fb, "optimizers": {}}
    for kind in ("sgd", "adamw"):
        inner = make_inner(kind, model.parameters(), device)
        rows = {}
        fns = {"inner": lambda: inner.step()}
        if "paper" in names:
            def paper_fn():
                paper_eager.full_step(model, logits, labels, ALPHA, conv_names, test, True)
                inner.step()
            fns["paper"] = paper_fn
        if "plain" in names:
            modulator = plain_torch.Modulator()
            conv = [[p for p in e.parameters() if p.dim() == 4] for e in enc.values()]

            def plain_fn():
                plain_torch.full_step(modulator, [[p.grad for p in ps] for ps in conv], logits,
                                      labels, ALPHA, True)
                inner.step()
            fns["plain"] = plain_fn
        wrapped = {}
        fused_of = {}  # fused contender name -> make_opt(fused) building its wrappers
        for b in names:
            if b in ("paper", "plain"):
                continue
            # the torch backend's fused update is its per-tensor reference: seconds per step
            variants = [("ogm_ge", False)]
            if b != "torch" or args.smoke:
                variants += [("ogm_ge", True), ("ogm", False), ("ogm", True)]
            for method, fused in variants:
                def make_opt(f, method=method, b=b):
                    return ModulatedOptimizer(inner, enc, method=method, alpha=ALPHA, backend=b,
                                              fused=f)
                try:
                    opt = make_opt(fused)
                except (ValueError, RuntimeError) as e:
                    common.log(f"step {kind} mmmod:{b} {method} fused={fused}: skipped ({e})")
                    continue
                name = f"mmmod:{b}" + ("" if method == "ogm_ge" else f" {method}") + (
                    " fused" if fused else "")
                if method == "ogm_ge" and not fused:
                    wrapped[b] = opt
                if fused:
                    fused_of[name] = make_opt

                def mm_fn(opt=opt):
                    opt.observe(logits, labels)
                    opt.step()
                fns[name] = mm_fn
        for name, fn in fns.items():
            slow = name == "mmmod:torch" or args.smoke
            grads.reset()
            fn()  # optimizer state (AdamW moments) exists before timing
            chk = None
            if name in fused_of:  # outputs checked before timing
                chk = check_fused(inner, model.parameters(), grads, fused_of[name], logits,
                                  labels, kind)
                common.log(f"step {kind} {name}: vs unfused bitwise {chk['bitwise_vs_unfused']}"
                           f", max {chk['max_ulps_vs_unfused']:.3g} ulps, agrees {chk['agrees']}")
            grads.reset()
            syn = common.count_syncs(fn, device)
            if device.type == "cpu" and syn["elapsed_s"] > max(5.0, 3 * mt) and not args.smoke:
                t = {"median_s": syn["elapsed_s"], "reps": 1,
                     "method": "one call (under the sync counter): too slow to repeat"}
            else:
                t = common.time_fn(fn, device, reset=grads.reset, min_time=mt,
                                   min_reps=(1 if args.quick else 2) if slow else 3,
                                   warmup=0 if slow else 1)
            rows[name] = {**t, **syn, **({"check": chk} if chk else {})}
            common.log(f"step {kind} {name}: {common.fmt_time(t['median_s'])} syncs {syn['syncs']}")
        # the fused update's comparison group timed again round-robin (one call of each per
        # round, gradients restored before each): a shared host's load then weighs on every
        # contender alike, so the ratios of these medians are the ones reported
        group = ["inner"] + [n for n in fns if n.startswith("mmmod:") and n != "mmmod:torch"
                             and not n.startswith("mmmod:torch ")]
        if len(group) > 1 and not args.smoke:
            inter = interleaved(fns, group, grads, device, mt * len(group),
                                min_rounds=3 if args.quick else 7)
            for name, t in inter.items():
                rows[name]["interleaved"] = t
                common.log(f"step {kind} {name} (interleaved): "
                           f"{common.fmt_time(t['median_s'])} over {t['reps']} rounds")
        t_in = rows["inner"]["median_s"]
        t_train = t_fb["median_s"] + t_in
        s_in = rows["inner"]["syncs"]
        for r in rows.values():
            r["syncs_added"] = r["syncs"] - s_in
            r["overhead_pct"] = 100 * (r["median_s"] - t_in) / t_in
            r["pct_of_train_step"] = 100 * (r["median_s"] - t_in) / t_train
        if device.type == "cuda":
            for b in wrapped:
                # a graph replays its kernels' arguments: the noise counter must live on the
                # device (capturable=True); the CUDA extension refuses that, which is reported
                opt = ModulatedOptimizer(inner, enc, method="ogm_ge", alpha=ALPHA, backend=b,
                                         capturable=True)

                def cap(opt=opt):
                    opt.observe(logits, labels)
                    opt.step()
                grads.reset()
                rows[f"mmmod:{b}"]["cuda_graph"] = try_capture(cap, device)
        results["optimizers"][kind] = {"train_step_s": t_train, "steps": rows,
                                       "fused_ratios": fused_ratios(rows)}
    tab = render(results)
    print(tab)
    common.write_results("bench_step", device, args, results, tab)
    return results


def interleaved(fns, names, grads, device, min_time, min_rounds=7, max_rounds=200) -> dict:
    """Median seconds per call of each of ``names``, timed in rounds (each round calls every
    contender once, in order, gradients restored before each call, outside the timed region)."""
    import time
    samples = {n: [] for n in names}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() - start < min_time
                                  and rounds < max_rounds):
        for n in names:
            grads.reset()
            common.sync(device)
            t0 = time.perf_counter()
            fns[n]()
            common.sync(device)
            samples[n].append(time.perf_counter() - t0)
        rounds += 1
    return {n: common._summary(v, "time.perf_counter per call, round-robin over the fused "
                               "comparison group, gradients restored")
            for n, v in samples.items()}


def _median(row) -> float:
    """The interleaved median where measured (see ``interleaved``), else the row's own."""
    return row.get("interleaved", row)["median_s"]


def fused_ratios(rows) -> dict:
    """Per backend with fused rows: OGM-GE fused / OGM-GE unfused and OGM fused / inner step
    (the fused update's targets: <= 0.7 and <= 1.15), medians of this run."""
    out = {}
    t_in = _median(rows["inner"])
    for name, r in rows.items():
        if not (name.startswith("mmmod:") and name.endswith(" fused")):
            continue
        base = name[:-len(" fused")]
        b = base.split()[0][len("mmmod:"):]
        e = out.setdefault(b, {})
        if base == f"mmmod:{b}" and base in rows:
            e["ogm_ge_fused_over_unfused"] = _median(r) / _median(rows[base])
        if base == f"mmmod:{b} ogm":
            e["ogm_fused_over_inner"] = _median(r) / t_in
            if base in rows:
                e["ogm_fused_over_unfused"] = _median(r) / _median(rows[base])
        e["interleaved"] = "interleaved" in r
    return out


def _check_cell(s) -> str:
    c = s.get("check")
    if c is None:
        return "-"
    if c["bitwise_vs_unfused"]:
        return "bitwise"
    return f"{c['max_ulps_vs_unfused']:.2g} ulps" + ("" if c["agrees"] else " (NO)")


def render(results) -> str:
    headers = ["optimizer", "step", "median", "median (round-robin)", "overhead % of inner step",
               "% of train step", "syncs (added to inner)", "fused vs unfused", "CUDA graph"]
    rows = []
    notes = []
    for kind, r in results["optimizers"].items():
        for name, s in r["steps"].items():
            cg = s.get("cuda_graph")
            rr = s.get("interleaved")
            rows.append([kind, name, common.fmt_time(s["median_s"]),
                         common.fmt_time(rr["median_s"]) if rr else "-", s["overhead_pct"],
                         s["pct_of_train_step"], f"{s['syncs']} ({s['syncs_added']:+d})",
                         _check_cell(s),
                         "n/a" if cg is None else ("yes" if cg["capturable"] else "no")])
        for b, e in r.get("fused_ratios", {}).items():
            parts = []
            if "ogm_ge_fused_over_unfused" in e:
                parts.append(f"OGM-GE fused / unfused {e['ogm_ge_fused_over_unfused']:.2f}x "
                             f"(target <= 0.7)")
            if "ogm_fused_over_inner" in e:
                parts.append(f"OGM fused / inner step {e['ogm_fused_over_inner']:.2f}x "
                             f"(target <= 1.15)")
            if parts:
                notes.append(f"* {kind}, `{b}`: " + "; ".join(parts))
    fb = results["fwd_bwd"]["median_s"]
    return (common.table(headers, rows) + f"\n\nbatch {results['batch']}; forward + backward "
            f"{common.fmt_time(fb)}; train step = forward + backward + inner step; syncs = host "
            "reads of tensor values per step (CPU AdamW reads its CPU step counters by design; "
            "mmmod on CPU range-checks CPU labels eagerly, free there); fused vs unfused = one "
            "step of each from the same state, checked before timing (parameters and optimizer "
            f"state; ulps of float32 normwise; SGD must be bitwise, Adam within {ADAM_ULPS} ulps)"
            + ("\n\nFused update, ratios of medians in this run (the round-robin medians where "
               "measured: inner, mmmod:<backend> [ogm] [fused] called in turn, so that the "
               "host's load weighs on each alike):\n" + "\n".join(notes)
               if notes else ""))


def main(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None,
                   help="batch for forward + backward (default 64; 8 with --quick on CPU)")
    args = p.parse_args(argv)
    with common.session(args):
        return run(args)


if __name__ == "__main__":
    main()
