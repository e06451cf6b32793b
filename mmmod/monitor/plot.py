"""``mmmod plot RUN``: each modality's score and coefficient over training, the papers' figure.

RUN is a CSV written by :class:`~mmmod.monitor.CSVLogger`, a TensorBoard folder written by
:class:`~mmmod.monitor.TensorBoardLogger` (every sub-folder holding event files is one run), or
the demo's ``results.json`` (the runs of its first seed, or ``--seed``). The figure has one
column per run: the score on top (the mean probability of the true class when the log knows how
many samples each step summed over, else the summed score), the coefficient below with the
steps outside the modulation window shaded and skipped steps marked. matplotlib is imported
only here, and pyplot never (no global backend switch).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass, field

COLORS = ("tab:orange", "tab:blue", "tab:green", "tab:red", "tab:purple", "tab:brown")


@dataclass
class Run:
    """One training run's per-step curves (lists aligned with ``step``)."""
    label: str
    names: list
    step: list
    score: dict
    coeff: dict
    samples: list | None = None     # samples each score sums over; None: unknown
    modulated: list | None = None   # inside the modulation window
    skipped: list | None = None
    curves: dict = field(default_factory=dict)  # the demo's per-epoch accuracies

    def mean_scores(self) -> dict | None:
        """score / samples per modality, or None when the sample counts are not known."""
        if not self.samples or any(not n or n <= 0 for n in self.samples):
            return None
        return {m: [s / n for s, n in zip(v, self.samples)] for m, v in self.score.items()}


# ---- reading ---------------------------------------------------------------------------------
def _num(v):
    if v is None or v == "":
        return None
    if isinstance(v, (int, float)):
        return v
    x = float(v)
    return int(x) if x.is_integer() and "." not in v and "e" not in v.lower() else x


def run_from_rows(rows: list[dict], label: str) -> Run:
    """A run from rows keyed as the recorder writes them (``step``, ``score/<m>``, ...)."""
    if not rows:
        raise ValueError(f"{label}: no rows")
    keys = list(rows[0])
    names = [k.split("/", 1)[1] for k in keys if k.startswith("score/")]
    if not names:
        raise ValueError(f"{label}: no score/<modality> columns (got {keys})")
    missing = [f"coeff/{n}" for n in names if f"coeff/{n}" not in keys]
    if missing:
        raise ValueError(f"{label}: no {missing[0]} column")
    rows = sorted(rows, key=lambda r: _num(r.get("step")) or 0)

    def col(key, cast=float):
        if key not in keys:
            return None
        vals = [_num(r.get(key)) for r in rows]
        return None if all(v is None for v in vals) else [None if v is None else cast(v) for v in vals]
    step = col("step", int) or list(range(len(rows)))
    return Run(label=label, names=names, step=step,
               score={n: col(f"score/{n}") for n in names},
               coeff={n: col(f"coeff/{n}") for n in names},
               samples=col("samples", int), modulated=col("modulated", bool),
               skipped=col("skipped", bool))


def load_csv(path: str) -> Run:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return run_from_rows(rows, os.path.splitext(os.path.basename(path))[0])


def load_tensorboard(folder: str, prefix: str = "mmmod") -> list[Run]:
    """Every folder under ``folder`` holding event files with ``<prefix>/score/*`` scalars."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as e:
        raise ImportError("reading a TensorBoard folder needs the tensorboard package: "
                          "pip install tensorboard") from e
    runs = []
    for d, _, files in sorted(os.walk(folder)):
        if not any("tfevents" in f for f in files):
            continue
        acc = EventAccumulator(d, size_guidance={"scalars": 0})  # 0: keep every event
        acc.Reload()
        by_step: dict[int, dict] = {}
        for tag in acc.Tags().get("scalars", []):
            if not tag.startswith(prefix + "/"):
                continue
            key = tag[len(prefix) + 1:]
            for ev in acc.Scalars(tag):
                by_step.setdefault(ev.step, {"step": ev.step})[key] = ev.value
        if not any(k.startswith("score/") for r in by_step.values() for k in r):
            continue
        keys = list(dict.fromkeys(k for r in by_step.values() for k in r))
        rows = [{k: r.get(k) for k in keys} for _, r in sorted(by_step.items())]
        rel = os.path.relpath(d, folder)
        runs.append(run_from_rows(rows, os.path.basename(os.path.abspath(folder)) if rel == "."
                                  else rel))
    if not runs:
        raise ValueError(f"{folder}: no TensorBoard events with {prefix}/score/* scalars")
    return runs


def load_results_json(path: str, seed: int | None = None) -> list[Run]:
    """The demo's runs of one seed (default: the first) from its ``results.json``."""
    with open(path) as f:
        res = json.load(f)
    return runs_from_results(res.get("runs"), seed, path)


def runs_from_results(runs: list[dict] | None, seed: int | None = None,
                      path: str = "results") -> list[Run]:
    """The demo's run dicts (``RunResult.to_dict()``) of one seed as plot runs."""
    if not runs:
        raise ValueError(f"{path}: no 'runs' (not a results.json written by 'mmmod demo')")
    seed = runs[0]["seed"] if seed is None else seed
    out = []
    for r in runs:
        if r["seed"] != seed:
            continue
        st = r.get("steps") or {}
        if any(k.startswith("score/") for k in st):   # the recorder's columns
            n = len(st["score/" + next(k for k in st if k.startswith("score/")).split("/", 1)[1]])
            rows = [{k: v[i] for k, v in st.items()} for i in range(n)]
            run = run_from_rows(rows, r["method"])
        elif "score_audio" in st:   # demo output written before the recorder: mean scores
            names = [k[len("score_"):] for k in st if k.startswith("score_")]
            n = len(st[f"score_{names[0]}"])
            run = Run(label=r["method"], names=names, step=list(range(n)),
                      score={m: st[f"score_{m}"] for m in names},
                      coeff={m: st[f"coef_{m}"] for m in names}, samples=[1] * n)
        else:
            raise ValueError(f"{path}: run {r['method']} (seed {seed}) has no per-step values")
        run.curves = r.get("curves") or {}
        out.append(run)
    if not out:
        raise ValueError(f"{path}: no run with seed {seed} (seeds: "
                         f"{sorted(set(r['seed'] for r in runs))})")
    return out


def load(path: str, prefix: str = "mmmod", seed: int | None = None) -> list[Run]:
    """Runs from a CSV file, a TensorBoard folder or a demo ``results.json``."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "results.json")) and not _has_events(path):
            return load_results_json(os.path.join(path, "results.json"), seed)
        return load_tensorboard(path, prefix)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.endswith(".json"):
        return load_results_json(path, seed)
    if path.endswith(".csv"):
        return [load_csv(path)]
    if "tfevents" in os.path.basename(path):
        return load_tensorboard(os.path.dirname(path) or ".", prefix)
    raise ValueError(f"{path}: expected a .csv log, a results.json or a TensorBoard folder")


def _has_events(folder: str) -> bool:
    return any("tfevents" in f for _, _, fs in os.walk(folder) for f in fs)


# ---- drawing ---------------------------------------------------------------------------------
def smooth(xs: list, k: int) -> list:
    """Trailing mean over the last k finite values (k <= 1: unchanged); None/NaN stay gaps."""
    if k <= 1:
        return [math.nan if x is None else x for x in xs]
    out, window = [], []
    for x in xs:
        if x is None or x != x:
            out.append(math.nan)
            continue
        window.append(x)
        if len(window) > k:
            window.pop(0)
        out.append(sum(window) / len(window))
    return out


def _spans(steps, flags):
    """Contiguous [first, last] step ranges where flags is False."""
    spans, start, prev = [], None, None
    for s, f in zip(steps, flags):
        if f is False and start is None:
            start = s
        if f is not False and start is not None:
            spans.append((start, prev))
            start = None
        prev = s
    if start is not None:
        spans.append((start, prev))
    return spans


def _figure(nrows, ncols, w, h):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w * ncols, h * nrows))
    return fig, fig.subplots(nrows, ncols, squeeze=False, sharex="col")


def plot_modulation(runs: list[Run], path: str, smooth_k: int = 10, dpi: int = 110) -> str:
    """Score (top) and coefficient (bottom) per modality, one column per run; writes ``path``."""
    if not runs:
        raise ValueError("no runs to plot")
    fig, axes = _figure(2, len(runs), 4.2, 3.1)
    for j, run in enumerate(runs):
        means = run.mean_scores()
        ax = axes[0, j]
        for i, n in enumerate(run.names):
            ax.plot(run.step, smooth(means[n] if means else run.score[n], smooth_k), label=n,
                    color=COLORS[i % len(COLORS)])
        if means:
            ax.set_ylim(0, 1)
        ax.set_title(f"{run.label}: " + ("score (mean p(true class))" if means
                                         else "score (sum of p(true class))"), fontsize=9)
        ax.legend(loc="lower right", fontsize=8)
        ax = axes[1, j]
        for i, n in enumerate(run.names):
            ax.plot(run.step, smooth(run.coeff[n], 1), label=n, color=COLORS[i % len(COLORS)],
                    lw=0.8)
        ax.axhline(1.0, color="grey", lw=0.5, ls=":")
        modulates = run.modulated is None or any(run.modulated)
        if run.modulated and modulates:  # a run that never modulates (baseline) is not shaded
            for a, b in _spans(run.step, run.modulated):
                ax.axvspan(a, b, color="grey", alpha=0.15, lw=0)
        if run.skipped and any(run.skipped):
            for s, f in zip(run.step, run.skipped):
                if f:
                    ax.axvline(s, color="red", lw=0.6, alpha=0.6)
        note = ("" if run.modulated is None or all(run.modulated) else
                " (not applied)" if not modulates else " (shaded: not applied)")
        ax.set_title(f"{run.label}: coefficient k{note}", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    _save(fig, path, dpi)
    return path


def plot_accuracy(runs: list[Run], path: str, dpi: int = 110) -> str | None:
    """The demo's per-epoch multimodal and unimodal-head accuracies (runs that carry them)."""
    runs = [r for r in runs if r.curves.get("epoch")]
    if not runs:
        return None
    fig, axes = _figure(1, 2, 5.0, 3.8)
    axes = axes[0]
    for r in runs:
        c = r.curves
        line, = axes[0].plot(c["epoch"], [100 * x for x in c["fused"]], marker=".", label=r.label)
        for n, ls in zip(r.names[::-1], ("-", "--", ":", "-.")):
            if f"{n}_head" in c:
                axes[1].plot(c["epoch"], [100 * x for x in c[f"{n}_head"]], color=line.get_color(),
                             ls=ls, label=f"{r.label} {n}")
    axes[0].set_title("multimodal test accuracy")
    axes[1].set_title("unimodal head test accuracy (" + ", ".join(
        f"{n} {ls}" for n, ls in zip(runs[0].names[::-1], ("solid", "dashed", "dotted"))) + ")",
        fontsize=9)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, path, dpi)
    return path


def _save(fig, path, dpi):
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=dpi)


# ---- command line ----------------------------------------------------------------------------
def build_parser(prog: str = "mmmod plot") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].strip("`"),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="a CSV log, a TensorBoard folder, or the demo's results.json (or its folder)")
    p.add_argument("-o", "--out", default=None,
                   help="PNG to write (default: modulation.png beside the first RUN)")
    p.add_argument("--smooth", type=int, default=10, help="trailing mean over K steps of the score")
    p.add_argument("--prefix", default="mmmod", help="TensorBoard tag prefix")
    p.add_argument("--seed", type=int, default=None, help="results.json: which seed's runs")
    p.add_argument("--dpi", type=int, default=110)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runs = [r for path in args.runs for r in load(path, args.prefix, args.seed)]
    except (OSError, ValueError, ImportError) as e:
        print(f"mmmod plot: {e}", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("mmmod plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return 2
    first = args.runs[0]
    out = args.out or os.path.join(first if os.path.isdir(first) else os.path.dirname(first) or ".",
                                   "modulation.png")
    written = [plot_modulation(runs, out, args.smooth, args.dpi)]
    acc = plot_accuracy(runs, os.path.splitext(out)[0] + "_accuracy.png", args.dpi)
    if acc:
        written.append(acc)
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
