"""``mmmod demo``: train baseline, OGM-GE and MLB on the built-in audio-visual data and compare.

With no arguments nothing is downloaded: a procedurally generated data set (``demo.data``) is
rendered, the three methods are trained with the same budget, seeds and initialisation, and a
table of multimodal test accuracy, each modality's linear-probe accuracy and wall time is
printed. ``--out`` (default ./demo_out) receives ``results.json`` with every number, one CSV
log per run in ``logs/`` (``--tensorboard`` adds TensorBoard event folders in ``tensorboard/``),
and the plots ``scores_coefficients.png`` (drawn from the optimizer's recorded history, as
``mmmod plot`` draws it) and ``accuracy.png``. ``--data DIR --dataset cremad|ks|ave`` trains on
a real data set instead (see ``mmmod.data``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace

import torch

from . import imbalance
from .._cli import DefaultsOnce
from .data import SyntheticConfig, class_signatures, make_dataset
from .models import FUSIONS
from .train import DEMO_ALPHA, TrainConfig, demo_methods, objective, train_one

DEFAULT_METHODS = ("baseline", "ogm_ge", "mlb")


def build_parser(prog: str = "mmmod demo") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsOnce)
    p.add_argument("--method", "--methods", dest="method", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated methods from {', '.join(demo_methods())} ('none' is "
                        f"'baseline'), or 'all'")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default: 15 on the built-in data, 30 on --data)")
    p.add_argument("--alpha", type=float, default=None,
                   help=f"modulation strength (default per method: {DEMO_ALPHA})")
    p.add_argument("--beta-max", type=float, default=2.0, help="MLB's beta_max")
    p.add_argument("--fusion", default="concat", choices=FUSIONS,
                   help="how the two encoders' features are fused: concat (one linear layer on "
                        "the concatenation, as in the papers), sum (one linear head per "
                        "modality, logits summed), film or gated")
    p.add_argument("--backend", default="auto", help="mmmod backend: auto, torch, cpu, cuda, triton")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (seed, seed+1, ...)")
    p.add_argument("--out", default="demo_out", help="output folder for results.json and plots")
    p.add_argument("--data", default=None, help="folder of a real data set (see --dataset)")
    p.add_argument("--dataset", default="synthetic", choices=("synthetic", "cremad", "ks", "ave"),
                   help="which data set --data holds")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"),
                   help="the inner torch optimizer: SGD with momentum 0.9 (the papers') or Adam")
    p.add_argument("--lr", type=float, default=None, help="learning rate (sgd 0.01, adam 1e-3)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--apply-to", default="grad", choices=("grad", "update"),
                   help="scale the gradient (the papers) or the inner optimizer's update")
    p.add_argument("--modulation-starts", type=int, default=0,
                   help="first modulated epoch (0-based)")
    p.add_argument("--modulation-ends", default="auto",
                   help="last modulated epoch (0-based, inclusive), 'none', or 'auto': the first "
                        "half of training for OGM/OGM-GE (as the official script), all for MLB")
    p.add_argument("--width", type=int, default=16, help="encoder base width (small ResNets)")
    p.add_argument("--resnet18", action="store_true", help="the paper's ResNet-18 encoders")
    p.add_argument("--n-train", type=int, default=None, help="built-in data: training samples")
    p.add_argument("--n-test", type=int, default=None, help="built-in data: test samples")
    p.add_argument("--image-size", type=int, default=None, help="frame size (real data: 112)")
    p.add_argument("--n-frames", type=int, default=None, help="frames per clip (real data: 3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    p.add_argument("--signals", default="",
                   help="comma-separated training-time signals to record per step (accuracy, "
                        "grad_norm, speed; docs/diagnostics.md)")
    p.add_argument("--no-report", action="store_true",
                   help="skip the imbalance report (Shapley contributions and linear probes "
                        "before and after training; about 10%% of a default run's time)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log each run's scores/coefficients to OUT/tensorboard/ "
                        "(needs the tensorboard package)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _methods(spec: str) -> list[str]:
    known = demo_methods()
    ms = list(known) if spec == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    ms = ["baseline" if m == "none" else m for m in ms]  # the registry's name of no modulation
    for m in ms:
        if m not in known:
            raise SystemExit(f"mmmod demo: unknown method {m!r}; choose from {', '.join(known)}")
    return ms


def _signals(spec: str) -> tuple:
    from ..monitor.signals import check
    try:
        return check([s.strip() for s in spec.split(",") if s.strip()])
    except (TypeError, ValueError) as e:
        raise SystemExit(f"mmmod demo: --signals: {e}")


def _real_data(args):
    from ..data import load
    kw = {"image_size": args.image_size or 112, "n_frames": args.n_frames or 3, "cache": True}
    train = load(args.dataset, args.data, "train", **kw)
    test = load(args.dataset, args.data, "test", **kw)
    if len(train) == 0 or len(test) == 0:
        raise SystemExit(f"mmmod demo: no usable samples in {args.data} (train {len(train)}, "
                         f"test {len(test)}, skipped {train.skipped + test.skipped})")
    return train, test, max(train.n_classes, test.n_classes)


def _mean_sd(xs):
    xs = [x for x in xs if x == x]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(runs: list[dict]) -> dict:
    out = {}
    for m in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == m]
        out[m] = {
            "seeds": [r["seed"] for r in rs],
            "fused_acc": _mean_sd([r["fused_acc"] for r in rs]),
            "audio_probe": _mean_sd([r["probe_acc"]["audio"] for r in rs]),
            "visual_probe": _mean_sd([r["probe_acc"]["visual"] for r in rs]),
            "audio_head": _mean_sd([r["head_acc"]["audio"] for r in rs]),
            "visual_head": _mean_sd([r["head_acc"]["visual"] for r in rs]),
            "wall_s": _mean_sd([r["wall_s"] for r in rs]),
        }
    return out


def format_table(summary: dict) -> str:
    def cell(ms, scale=100.0, fmt="{:.1f}"):
        m, s = ms
        txt = fmt.format(m * scale)
        return txt + (" ± " + fmt.format(s * scale) if s == s and s > 0 else "")

    head = ("method", "multimodal acc %", "audio probe %", "visual probe %", "train time s",
            "training loss")
    rows = [(m, cell(v["fused_acc"]), cell(v["audio_probe"]), cell(v["visual_probe"]),
             cell(v["wall_s"], 1.0, "{:.0f}"), objective(m)) for m, v in summary.items()]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep] + [line(r) for r in rows])


def plot(runs: list[dict], out_dir: str) -> list[str]:
    """The first seed's score/coefficient curves (from each run's recorded history) and
    accuracy curves, drawn by :mod:`mmmod.monitor.plot`."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    from ..monitor import plot as mplot
    first = mplot.runs_from_results(runs)
    files = [mplot.plot_modulation(first, os.path.join(out_dir, "scores_coefficients.png"))]
    acc = mplot.plot_accuracy(first, os.path.join(out_dir, "accuracy.png"))
    return files + ([acc] if acc else [])


def _loggers(args, method: str, seed: int) -> list:
    from ..monitor import CSVLogger, TensorBoardLogger
    run = f"{method}_seed{seed}"
    out = [CSVLogger(os.path.join(args.out, "logs", f"{run}.csv"))]
    if args.tensorboard:
        out.append(TensorBoardLogger(os.path.join(args.out, "tensorboard", run)))
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    methods = _methods(args.method)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("mmmod demo: --device cuda but CUDA is not available")
    real = args.data is not None
    if real and args.dataset == "synthetic":
        raise SystemExit("mmmod demo: --data needs --dataset cremad, ks or ave")
    if args.dataset != "synthetic" and not real:
        raise SystemExit(f"mmmod demo: --dataset {args.dataset} needs --data DIR")
    epochs = args.epochs if args.epochs is not None else (30 if real else 15)
    lr = args.lr if args.lr is not None else (0.01 if args.optimizer == "sgd" else 1e-3)
    tcfg = TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=lr, optimizer=args.optimizer,
                       alpha=args.alpha, beta_max=args.beta_max, fusion=args.fusion,
                       width=args.width, resnet18=args.resnet18, backend=args.backend,
                       device=args.device, modulation_starts=args.modulation_starts,
                       modulation_ends=args.modulation_ends, apply_to=args.apply_to,
                       progress=not args.quiet, imbalance=not args.no_report,
                       signals=_signals(args.signals))
    os.makedirs(args.out, exist_ok=True)
    if args.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise SystemExit("mmmod demo: --tensorboard needs the tensorboard package "
                             "(pip install tensorboard)")
    seeds = [args.seed + i for i in range(max(1, args.seeds))]
    t_start = time.perf_counter()
    runs, data_info = [], {}
    if real:
        train, test, n_classes = _real_data(args)
        data_info = {"dataset": args.dataset, "root": os.path.abspath(args.data),
                     "n_train": len(train), "n_test": len(test), "classes": train.classes,
                     "skipped": train.skipped + test.skipped}
        print(f"{args.dataset}: {len(train)} train / {len(test)} test clips, {n_classes} classes")
    for seed in seeds:
        if not real:
            dcfg = SyntheticConfig(seed=seed)
            over = {k: v for k, v in (("n_train", args.n_train), ("n_test", args.n_test),
                                      ("image_size", args.image_size),
                                      ("n_frames", args.n_frames)) if v is not None}
            dcfg = replace(dcfg, **over)
            t0 = time.perf_counter()
            train, test = make_dataset(dcfg)
            n_classes = dcfg.n_classes
            data_info = {"dataset": "synthetic", "config": dcfg.to_dict(),
                         "classes": class_signatures(dcfg)}
            if not args.quiet:
                print(f"seed {seed}: rendered {len(train)} train / {len(test)} test clips "
                      f"in {time.perf_counter() - t0:.1f}s")
        for m in methods:
            r = train_one(m, train, test, tcfg, seed=seed, n_classes=n_classes,
                          desc=f"{m} (seed {seed})", loggers=_loggers(args, m, seed))
            runs.append(r.to_dict())
            if not args.quiet:
                print(f"  {m:9s} seed {seed}: multimodal {100 * r.fused_acc:.1f}%  audio probe "
                      f"{100 * r.probe_acc['audio']:.1f}%  visual probe "
                      f"{100 * r.probe_acc['visual']:.1f}%  ({r.wall_s:.0f}s)")
    total = time.perf_counter() - t_start
    summary = summarize(runs)
    table = format_table(summary)
    print()
    print(table)
    print(f"\nseeds {seeds}, {epochs} epochs, fusion {args.fusion}, total {total:.0f}s "
          f"(probe = linear probe of the frozen encoder)")
    imbalance_report = imbalance.report(runs)
    if imbalance_report is not None:
        print(f"\nimbalance before and after training (seed {seeds[0]}; Shapley values of the "
              f"test accuracy and loss over the two modalities, mmmod.diagnostics):\n")
        print(imbalance_report)
    result = {"argv": sys.argv[1:] if argv is None else list(argv), "methods": methods,
              "seeds": seeds, "train_config": tcfg.to_dict(), "data": data_info,
              "summary": summary, "table": table, "total_s": total,
              "environment": {"torch": torch.__version__, "python": platform.python_version(),
                              "threads": torch.get_num_threads(), "device": args.device},
              "runs": runs}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    files = [] if args.no_plots else plot(runs, args.out)
    if imbalance_report is not None and not args.no_plots and files:
        files.append(os.path.join(args.out, "imbalance.png"))
        imbalance_report.figure(files[-1])
    print(f"wrote {os.path.join(args.out, 'results.json')}" + "".join(f", {p}" for p in files))
    return 0
