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
  live fused backend.
``overhead %`` = (t - t_inner) / t_inner. The forward + backward of the same model at the same
batch is timed once, and ``% of train step`` = (t - t_inner) / (t_fwd_bwd + t_inner): what the
modulation adds to a real training step. On CUDA the modulated step is also captured in a CUDA
graph (AdamW with ``capturable=True``) and the result reported.

    python -m benchmarks.bench_step [--quick|--smoke] [--batch N]
"""
from __future__ import annotations

import torch

from . import common, paper_eager, plain_torch, workloads

ALPHA = 0.8
N_CLASSES = 6
AUDIO_SHAPE = (1, 257, 188)
VISUAL_SHAPE = (3, 1, 224, 224)


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
        for b in names:
            if b in ("paper", "plain"):
                continue
            opt = ModulatedOptimizer(inner, enc, method="ogm_ge", alpha=ALPHA, backend=b)
            wrapped[b] = opt

            def mm_fn(opt=opt):
                opt.observe(logits, labels)
                opt.step()
            fns[f"mmmod:{b}"] = mm_fn
        for name, fn in fns.items():
            slow = name == "mmmod:torch" or args.smoke
            grads.reset()
            fn()  # optimizer state (AdamW moments) exists before timing
            grads.reset()
            syn = common.count_syncs(fn, device)
            if device.type == "cpu" and syn["elapsed_s"] > max(5.0, 3 * mt) and not args.smoke:
                t = {"median_s": syn["elapsed_s"], "reps": 1,
                     "method": "one call (under the sync counter): too slow to repeat"}
            else:
                t = common.time_fn(fn, device, reset=grads.reset, min_time=mt,
                                   min_reps=(1 if args.quick else 2) if slow else 3,
                                   warmup=0 if slow else 1)
            rows[name] = {**t, **syn}
            common.log(f"step {kind} {name}: {common.fmt_time(t['median_s'])} syncs {syn['syncs']}")
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
        results["optimizers"][kind] = {"train_step_s": t_train, "steps": rows}
    tab = render(results)
    print(tab)
    common.write_results("bench_step", device, args, results, tab)
    return results


def render(results) -> str:
    headers = ["optimizer", "step", "median", "overhead % of inner step",
               "% of train step", "syncs (added to inner)", "CUDA graph"]
    rows = []
    for kind, r in results["optimizers"].items():
        for name, s in r["steps"].items():
            cg = s.get("cuda_graph")
            rows.append([kind, name, common.fmt_time(s["median_s"]), s["overhead_pct"],
                         s["pct_of_train_step"], f"{s['syncs']} ({s['syncs_added']:+d})",
                         "n/a" if cg is None else ("yes" if cg["capturable"] else "no")])
    fb = results["fwd_bwd"]["median_s"]
    return (common.table(headers, rows) + f"\n\nbatch {results['batch']}; forward + backward "
            f"{common.fmt_time(fb)}; train step = forward + backward + inner step; syncs = host "
            "reads of tensor values per step (CPU AdamW reads its CPU step counters by design; "
            "mmmod on CPU range-checks CPU labels eagerly, free there)")


def main(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None,
                   help="batch for forward + backward (default 64; 8 with --quick on CPU)")
    args = p.parse_args(argv)
    with common.session(args):
        return run(args)


if __name__ == "__main__":
    main()
