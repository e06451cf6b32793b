"""Cost of the training-time imbalance signals (``ModulatedOptimizer(signals=...)``).

The demo's classifier (width 16, batch 64, CPU), one OGM-GE + SGD training step (forward,
backward, observe, step) with ``history`` on, with no signal, then with each signal and all
three. Configurations are interleaved round by round so that a busy host slows all alike; the
table gives each configuration's median step time over the rounds and its difference from
the run without signals. The signal work alone (the gradient / parameter norm pass, the
accuracy count and the row's extra columns) is timed separately, without the step around it.

    python benchmarks/bench_signals.py [--rounds 15] [--steps 20] [--threads 2]

Writes benchmarks/results/bench_signals_cpu.json and .md (date and host in them).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import mmmod
from mmmod.demo.models import AVClassifier

CONFIGS = {"none": (), "accuracy": ("accuracy",), "grad_norm": ("grad_norm",),
           "speed": ("speed",), "all": ("accuracy", "grad_norm", "speed")}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build(signals, seed=0):
    torch.manual_seed(seed)
    model = AVClassifier(8, "concat", 16)
    inner = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    opt = mmmod.ModulatedOptimizer(inner, {"audio": model.audio_net, "visual": model.visual_net},
                                   method="ogm_ge", alpha=0.8, history=4096, signals=signals)
    return model, opt


def step(model, opt, a, v, y):
    opt.zero_grad()
    out, feats = model(a, v)
    opt.observe(dict(zip(("audio", "visual"), model.split_logits(feats))), y)
    F.cross_entropy(out, y).backward()
    opt.step()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    a, v = torch.randn(64, 1, 32, 63, generator=g), torch.randn(64, 1, 3, 32, 32, generator=g)
    y = torch.randint(0, 8, (64,), generator=g)
    runs = {name: build(sig) for name, sig in CONFIGS.items()}
    for model, opt in runs.values():  # warm-up
        for _ in range(3):
            step(model, opt, a, v, y)
    times = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name, (model, opt) in runs.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(model, opt, a, v, y)
            times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
    # the signal work alone, on the "all" optimizer's gradients
    model, opt = runs["all"]
    sig = opt._signals
    zs = model.split_logits(model(a, v)[1])
    alone = {}
    for what, fn in (("accuracy count (observe)", lambda: sig.observe(zs, y)),
                     ("norm pass (grad + param)", sig.read_gradients),
                     ("row columns (values)", lambda: sig.values(None))):
        fn()
        best = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(200):
                fn()
            best.append((time.perf_counter() - t0) / 200 * 1e6)
        alone[what] = min(best)
    base = statistics.median(times["none"])
    rows = {name: {"median_ms": statistics.median(t), "min_ms": min(t),
                   "diff_ms": statistics.median(t) - base,
                   "diff_pct": 100 * (statistics.median(t) - base) / base}
            for name, t in times.items()}
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "threads": args.threads, "load_avg": os.getloadavg(), "torch": torch.__version__,
            "rounds": args.rounds, "steps": args.steps,
            "tensors": {"audio": sum(1 for _ in model.audio_net.parameters()),
                        "visual": sum(1 for _ in model.visual_net.parameters())}}
    out = {"meta": meta, "step": rows, "signal_work_us": alone}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "bench_signals_cpu.json"), "w") as f:
        json.dump(out, f, indent=1)
    lines = [f"# signals overhead ({meta['date']}, {meta['host']}, {args.threads} threads, "
             f"load {meta['load_avg'][0]:.1f})", "",
             "| signals | step median ms | difference ms | difference % |", "|---|---|---|---|"]
    lines += [f"| {n} | {r['median_ms']:.2f} | {r['diff_ms']:+.2f} | {r['diff_pct']:+.1f} |"
              for n, r in rows.items()]
    lines += ["", "| signal work alone | us (min of 7 x 200) |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in alone.items()]
    with open(os.path.join(RESULTS, "bench_signals_cpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
