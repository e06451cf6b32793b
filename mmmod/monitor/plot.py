"""``mmmod plot RUN``: each modality's score and coefficient over training, the papers' figure.

RUN is a CSV written by :class:`~mmmod.monitor.CSVLogger`, a TensorBoard folder written by
:class:`~mmmod.monitor.TensorBoardLogger` (every sub-folder holding event files is one run), or
the demo's ``results.json`` (the runs of its first seed, or ``--seed``). Each run gets a block of
panels: the score on top (per sample when the log knows how many samples each step summed over,
titled and scaled by the method's score: p(true class) in [0, 1] for OGM/MLB, NLL for AGM), the
coefficient below with the steps outside the modulation window shaded and skipped steps marked,
then one panel per further per-modality column of the log (a method's ``log_values`` such as
InfoReg's ``beta`` or MSLR's ``ratio``, or any ``<name>/<modality>`` signal). Runs are wrapped
into a grid of ``--cols`` blocks per row. matplotlib is imported only here, and pyplot never (no
global backend switch).
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
    extras: dict = field(default_factory=dict)  # {key: {modality: values}}: other columns
    score_kind: str | None = None   # "prob", "nll", ... (the method's Method.score); None: unknown

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
    if v in ("True", "False", "true", "false"):  # a flag written by a generic CSV writer
        return int(v in ("True", "true"))
    x = float(v)
    return int(x) if x.is_integer() and "." not in v and "e" not in v.lower() else x


def run_from_rows(rows: list[dict], label: str, score_kind: str | None = None) -> Run:
    """A run from rows keyed as the recorder writes them (``step``, ``score/<m>``, ...)."""
    if not rows:
        raise ValueError(f"{label}: no rows")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    names = [k.split("/", 1)[1] for k in keys if k.startswith("score/")]
    if not names:
        raise ValueError(f"{label}: no score/<modality> columns (got {keys})")
    missing = [f"coeff/{n}" for n in names if f"coeff/{n}" not in keys]
    if missing:
        raise ValueError(f"{label}: no {missing[0]} column")

    def num(r, key):
        try:
            return _num(r.get(key))
        except (TypeError, ValueError):
            raise ValueError(f"{label}: column {key!r} holds {r.get(key)!r}, not a number") from None
    rows = sorted(rows, key=lambda r: num(r, "step") or 0)

    def col(key, cast=float):
        if key not in keys:
            return None
        vals = [num(r, key) for r in rows]
        return None if all(v is None for v in vals) else [None if v is None else cast(v) for v in vals]

    def required(key):
        v = col(key)
        if v is None:
            raise ValueError(f"{label}: column {key!r} is empty (no value in {len(rows)} rows)")
        return v
    step = col("step", int) or list(range(len(rows)))
    extras: dict = {}
    for k in keys:  # other per-modality columns: <name>/<modality>
        base, _, mod = k.partition("/")
        if base not in ("score", "coeff") and mod in names:
            v = col(k)
            if v is not None:
                extras.setdefault(base, {})[mod] = v
    if score_kind is None and "method" in keys:
        score_kind = score_kind_of(str(rows[0].get("method")))
    return Run(label=label, names=names, step=step,
               score={n: required(f"score/{n}") for n in names},
               coeff={n: required(f"coeff/{n}") for n in names},
               samples=col("samples", int), modulated=col("modulated", bool),
               skipped=col("skipped", bool), extras=extras,
               score_kind=score_kind if score_kind is not None else score_kind_of(label))


def score_kind_of(name: str) -> str | None:
    """The score of the method a run label or method name names (``Method.score``), or None.
    A label such as the demo's ``agm_seed0`` names its method by its first part."""
    from .. import methods
    aliases = {"baseline": "none", "multiloss": "none"}  # the demo's runs without modulation
    known = sorted(set(methods.names()) | set(aliases), key=len, reverse=True)
    for m in known:
        if name == m or (name.startswith(m) and name[len(m)] in "_-./ "):
            return methods.get(aliases.get(m, m)).score
    return None


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
        try:
            res = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(res, dict):
        raise ValueError(f"{path}: expected a JSON object with 'runs' (as 'mmmod demo' writes), "
                         f"got a {type(res).__name__}")
    return runs_from_results(res.get("runs"), seed, path)


def runs_from_results(runs: list[dict] | None, seed: int | None = None,
                      path: str = "results") -> list[Run]:
    """The demo's run dicts (``RunResult.to_dict()``) of one seed as plot runs."""
    if not runs:
        raise ValueError(f"{path}: no 'runs' (not a results.json written by 'mmmod demo')")
    if not isinstance(runs, list):
        raise ValueError(f"{path}: 'runs' must be a list of runs, got {type(runs).__name__} {runs!r}")
    for i, r in enumerate(runs):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: run #{i} is a {type(r).__name__}, not an object")
        for key, types in (("method", str), ("seed", int)):
            if not isinstance(r.get(key), types) or isinstance(r.get(key), bool):
                raise ValueError(f"{path}: run #{i} has no {key!r} ({types.__name__}), got "
                                 f"{r.get(key)!r}")
        if not isinstance(r.get("steps") or {}, dict):
            raise ValueError(f"{path}: run #{i} ({r['method']}): 'steps' must be an object of "
                             f"columns")
    seed = runs[0]["seed"] if seed is None else seed
    out = []
    for r in runs:
        if r["seed"] != seed:
            continue
        st = r.get("steps") or {}
        where = f"{path}: run {r['method']} (seed {seed})"
        lengths = {len(v) if isinstance(v, list) else -1 for v in st.values()}
        if -1 in lengths or len(lengths) > 1:
            raise ValueError(f"{where}: 'steps' must map each column to a list, all of one length")
        kind = score_kind_of(r["method"])
        if any(k.startswith("score/") for k in st):   # the recorder's columns
            n = lengths.pop()
            rows = [{k: v[i] for k, v in st.items()} for i in range(n)]
            run = run_from_rows(rows, r["method"], kind)
        elif "score_audio" in st:   # demo output written before the recorder: mean scores
            names = [k[len("score_"):] for k in st if k.startswith("score_")]
            n = len(st[f"score_{names[0]}"])
            run = Run(label=r["method"], names=names, step=list(range(n)),
                      score={m: st[f"score_{m}"] for m in names},
                      coeff={m: st.get(f"coef_{m}") or [None] * n for m in names}, samples=[1] * n,
                      score_kind=kind)
        else:
            raise ValueError(f"{where} has no per-step values")
        curves = r.get("curves") or {}
        run.curves = curves if isinstance(curves, dict) else {}
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


SCORE_TITLES = {"prob": ("p(true class)", (0.0, 1.0)),
                "nll": ("NLL of the true class", None)}


def _score_label(run: Run, mean: bool) -> tuple[str, tuple | None]:
    """The score panel's title and y range for the run's score kind."""
    what, ylim = SCORE_TITLES.get(run.score_kind, (None, None))
    if what is None:
        what = "score" if run.score_kind is None else f"{run.score_kind} score"
    if not mean:
        return f"sum of {what} over the step's samples", None
    return f"mean {what}", ylim


def grid(n_runs: int, panels: int, cols: int) -> tuple[int, int]:
    """(rows, columns) of axes for ``n_runs`` blocks of ``panels`` stacked axes, at most
    ``cols`` blocks side by side."""
    c = max(1, min(cols, n_runs))
    return panels * math.ceil(n_runs / c), c


def panels_of(run: Run) -> list[str]:
    return ["score", "coeff"] + list(run.extras)


def plot_modulation(runs: list[Run], path: str, smooth_k: int = 10, dpi: int = 110,
                    cols: int = 4) -> str:
    """Per run a block of panels: score, coefficient, then each further per-modality column;
    at most ``cols`` blocks per row. Writes ``path``."""
    if not runs:
        raise ValueError("no runs to plot")
    from matplotlib.figure import Figure
    panels = max(len(panels_of(r)) for r in runs)
    nrows, ncols = grid(len(runs), panels, cols)
    fig = Figure(figsize=(4.2 * ncols, 2.6 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for j, run in enumerate(runs):
        col, top = j % ncols, (j // ncols) * panels
        block = [axes[top + i, col] for i in range(len(panels_of(run)))]
        for ax in block:
            ax.set_visible(True)
        for ax in block[:-1]:
            ax.sharex(block[-1])
            ax.tick_params(labelbottom=False)
        block[-1].set_xlabel("step")
        means = run.mean_scores()
        what, ylim = _score_label(run, means is not None)
        ax = block[0]
        for i, n in enumerate(run.names):
            ax.plot(run.step, smooth(means[n] if means else run.score[n], smooth_k), label=n,
                    color=COLORS[i % len(COLORS)])
        if ylim:
            ax.set_ylim(*ylim)
        ax.set_title(f"{run.label}: score ({what})", fontsize=9)
        ax.legend(loc="best", fontsize=8)
        ax = block[1]
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
        ax.legend(loc="best", fontsize=8)
        for ax, (key, series) in zip(block[2:], run.extras.items()):
            for i, n in enumerate(run.names):
                if n in series:
                    ax.plot(run.step, smooth(series[n], 1), label=n, color=COLORS[i % len(COLORS)],
                            lw=0.8)
            ax.set_title(f"{run.label}: {key}", fontsize=9)
            ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    _save(fig, path, dpi)
    return path


def _figure(nrows, ncols, w, h):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w * ncols, h * nrows))
    return fig, fig.subplots(nrows, ncols, squeeze=False, sharex="col")


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
    axes[1].set_title("unimodal-head test accuracy, not the linear probe (" + ", ".join(
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


def check_output(path: str) -> None:
    """Refuse, before anything is drawn, an output path that cannot be written: a folder, or
    one under a regular file."""
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise ValueError(f"-o {path}: is a folder; give the PNG file to write")
    parent = os.path.dirname(full)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent) if os.path.dirname(parent) != parent else ""
    if parent and not os.path.isdir(parent):
        raise ValueError(f"-o {path}: {parent} is a file, not a folder")


# ---- command line ----------------------------------------------------------------------------
def build_parser(prog: str = "mmmod plot") -> argparse.ArgumentParser:
    from .._cli import DefaultsOnce
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].strip("`"),
                                formatter_class=DefaultsOnce)
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="a CSV log, a TensorBoard folder, or the demo's results.json (or its folder)")
    p.add_argument("-o", "--out", default=None,
                   help="PNG to write (default: modulation.png beside the first RUN)")
    p.add_argument("--smooth", type=int, default=10, help="trailing mean over K steps of the score")
    p.add_argument("--prefix", default="mmmod", help="TensorBoard tag prefix")
    p.add_argument("--seed", type=int, default=None, help="results.json: which seed's runs")
    p.add_argument("--cols", type=int, default=4, help="runs side by side before wrapping")
    p.add_argument("--score-kind", default=None,
                   help="what the logged score is, e.g. prob or nll (default: the method's, when "
                        "the log or its name says which)")
    p.add_argument("--dpi", type=int, default=110, help="resolution of the PNG")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def fail(msg: str) -> int:
        print(f"mmmod plot: {msg}", file=sys.stderr)
        return 2
    if not 1 <= args.dpi <= 2000:
        return fail(f"--dpi must be in 1..2000, got {args.dpi}")
    if args.cols < 1:
        return fail(f"--cols must be >= 1, got {args.cols}")
    first = args.runs[0]
    out = args.out or os.path.join(first if os.path.isdir(first) else os.path.dirname(first) or ".",
                                   "modulation.png")
    try:
        check_output(out)
        runs = [r for path in args.runs for r in load(path, args.prefix, args.seed)]
    except (OSError, ValueError, ImportError) as e:
        return fail(str(e))
    if args.score_kind:
        for r in runs:
            r.score_kind = args.score_kind
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return fail("matplotlib is not installed (pip install matplotlib)")
    try:
        written = [plot_modulation(runs, out, args.smooth, args.dpi, args.cols)]
        acc = plot_accuracy(runs, os.path.splitext(out)[0] + "_accuracy.png", args.dpi)
    except (OSError, ValueError) as e:  # a full disk, a figure too large to render, ...
        return fail(f"cannot write {out}: {e}")
    if acc:
        written.append(acc)
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
