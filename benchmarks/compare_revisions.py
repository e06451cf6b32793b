"""Time two checkouts of mmmod against each other: the quick suite, alternating A, B, A, B, ...

    python -m benchmarks.compare_revisions --a /tmp/bench-old --b . --rounds 5 --threads 2

``--a`` and ``--b`` are source trees with their CPU extension built in place (``setup.py
build_ext --inplace``). Each round runs ``python -m benchmarks.run_all --quick --device cpu``
(each tree's own harness) in a fresh subprocess per tree, that tree first on ``PYTHONPATH`` and
as the working directory, with the same environment and thread count (``--threads``, also
``OMP_NUM_THREADS``/``MKL_NUM_THREADS``) for both; the order within a round is A then B. Every
timed contender (every ``median_s`` in the suite's JSON files, named by its path there) gets
one time per round per tree. Per contender the report gives the median over rounds of each
side, the ratio B/A and the run-to-run spread: each side's (max - min) / median over its
rounds; the spread used for the verdict is the larger of the two. A contender is flagged
``slower`` only when B/A - 1 exceeds that spread, ``faster`` when A/B - 1 does.

Before timing, ``benchmarks/revision_probe.py`` runs in both trees (seeded steps of every
method on the ``torch`` and ``cpu`` backends, unfused and fused) and the results are compared
tensor by tensor; the methods in ``--same-methods`` must agree (``--rtol``), the others are
reported (their semantics may have changed on purpose between the revisions). Each suite run
also checks its contenders' outputs itself (the ``agrees`` fields): any ``false`` is reported.

Writes ``<out>/<name>.json`` (environment, both commits, every round's times, the probe's
comparison, the summary) and ``<out>/<name>.md`` (the table). The table logic
(:func:`summarize`, :func:`markdown`) takes plain per-round dictionaries and is tested on
synthetic timings (tests/project/test_compare_revisions.py).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterable, Mapping, Sequence

from .host import cpu_name

HERE = os.path.dirname(os.path.abspath(__file__))
PROBE = os.path.join(HERE, "revision_probe.py")
#: contender names that run mmmod's code (the rest are baselines: the paper's code, plain torch,
#: the inner optimizer alone, memory copies), used to separate a regression from host noise
LIBRARY_CONTENDERS = ("torch", "cpu", "cuda", "triton")
#: methods whose results must not change between the compared revisions (by default)
SAME_METHODS = "none,ogm,ogm_ge,mlb"


# ---- collecting the suite's timings --------------------------------------------------------
def _label(item: Any, index: int) -> str:
    """A list element's name in a contender key: its identifying scalar fields, else its index."""
    if isinstance(item, Mapping):
        fields = [f"{k}={item[k]}" for k in ("workload", "mode", "numel", "B", "C", "M", "name")
                  if k in item and not isinstance(item[k], (Mapping, list))]
        if fields:
            return ",".join(fields)
    return str(index)


def timings(doc: Any, prefix: str = "") -> dict[str, float]:
    """Every ``median_s`` in one benchmark JSON document, keyed by its path (``env`` skipped)."""
    out: dict[str, float] = {}
    if isinstance(doc, Mapping):
        if isinstance(doc.get("median_s"), (int, float)):
            out[prefix] = float(doc["median_s"])
        for k, v in doc.items():
            if k != "env":
                out.update(timings(v, f"{prefix}/{k}" if prefix else str(k)))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.update(timings(v, f"{prefix}/{_label(v, i)}"))
    return out


def disagreements(doc: Any, prefix: str = "") -> list[str]:
    """Paths whose ``agrees`` field is false (the suite's own output checks)."""
    bad = []
    if isinstance(doc, Mapping):
        if doc.get("agrees") is False:
            bad.append(prefix)
        for k, v in doc.items():
            if k != "env":
                bad += disagreements(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            bad += disagreements(v, f"{prefix}/{_label(v, i)}")
    return bad


def collect(out_dir: str, tag: str = "cpu") -> tuple[dict[str, float], list[str]]:
    """(contender -> seconds, disagreeing paths) over every ``*_<tag>.json`` of one suite run."""
    times: dict[str, float] = {}
    bad: list[str] = []
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(f"_{tag}.json"):
            with open(os.path.join(out_dir, name)) as f:
                doc = json.load(f)
            bench = name[: -len(f"_{tag}.json")]
            times.update({f"{bench}/{k}": v for k, v in timings(doc).items()})
            bad += [f"{bench}/{p}" for p in disagreements(doc)]
    return times, bad


def is_library(key: str) -> bool:
    """Whether a contender key times mmmod's code (``mmmod:...`` or a backend's name)."""
    parts = key.split("/")
    return any(p.startswith("mmmod:") or p in LIBRARY_CONTENDERS for p in parts)


# ---- the comparison ------------------------------------------------------------------------
def spread(values: Sequence[float]) -> float:
    """Run-to-run spread of one side: (max - min) / median; 0 for a single round."""
    m = statistics.median(values)
    return (max(values) - min(values)) / m if m > 0 else 0.0


def summarize(rounds_a: Sequence[Mapping[str, float]], rounds_b: Sequence[Mapping[str, float]]
              ) -> dict[str, Any]:
    """Per contender: medians, ratio B/A, spreads and the verdict (see the module docstring).

    ``rounds_a``/``rounds_b``: one ``{contender: seconds}`` per round. A contender missing from
    some rounds is compared over the rounds that have it; one present on one side only is
    listed under ``only_a``/``only_b``.
    """
    keys_a = set().union(*rounds_a) if rounds_a else set()
    keys_b = set().union(*rounds_b) if rounds_b else set()
    rows = []
    for key in sorted(keys_a & keys_b):
        a = [r[key] for r in rounds_a if key in r]
        b = [r[key] for r in rounds_b if key in r]
        med_a, med_b = statistics.median(a), statistics.median(b)
        sp_a, sp_b = spread(a), spread(b)
        sp = max(sp_a, sp_b)
        ratio = med_b / med_a if med_a > 0 else float("inf")
        if ratio - 1 > sp:
            verdict = "slower"
        elif med_b > 0 and med_a / med_b - 1 > sp:
            verdict = "faster"
        else:
            verdict = "within spread"
        rows.append({"contender": key, "library": is_library(key), "rounds_a": len(a),
                     "rounds_b": len(b), "median_a_s": med_a, "median_b_s": med_b,
                     "ratio_b_over_a": ratio, "min_a_s": min(a), "max_a_s": max(a),
                     "min_b_s": min(b), "max_b_s": max(b), "spread_a": sp_a, "spread_b": sp_b,
                     "spread": sp, "verdict": verdict})
    slower = [r["contender"] for r in rows if r["verdict"] == "slower"]
    return {"rows": rows, "only_a": sorted(keys_a - keys_b), "only_b": sorted(keys_b - keys_a),
            "slower": slower, "slower_library": [k for k in slower if is_library(k)],
            "faster": [r["contender"] for r in rows if r["verdict"] == "faster"]}


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f}" if s < 0.01 else f"{s * 1e3:.2f}" if s < 1 else f"{s * 1e3:.0f}"


def markdown(summary: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """The report: header (commits, host, load), the verdict, then one row per contender."""
    a, b = meta.get("a", {}), meta.get("b", {})
    lines = [f"# {meta.get('title', 'Revision comparison')}", "",
             f"A = `{a.get('commit', '?')}` ({a.get('path', '?')}), B = `{b.get('commit', '?')}` "
             f"({b.get('path', '?')}); suite `{meta.get('suite', '?')}`, {meta.get('rounds', '?')} "
             f"rounds alternating A, B (completed: {meta.get('rounds_done', meta.get('rounds', '?'))}); "
             f"{meta.get('date', '?')} to {meta.get('finished', '?')}; host {meta.get('host', '?')} "
             f"({meta.get('cpu', '?')}, nproc {meta.get('nproc', '?')}), torch {meta.get('torch', '?')}, "
             f"{meta.get('threads', '?')} threads.", ""]
    loads = meta.get("loadavg")
    if loads:
        lines += [f"Load average (1 min) before/after each run: {loads}.", ""]
    if meta.get("wall"):
        lines += [f"{meta['wall']}.", ""]
    if meta.get("note"):
        lines += [str(meta["note"]), ""]
    if meta.get("agreement"):
        lines += [f"Agreement before timing: {meta['agreement']}", ""]
    rows = summary["rows"]
    lib = [r for r in rows if r["library"]]
    lines += [f"**Verdict:** {len(summary['slower_library'])} of {len(lib)} mmmod contenders slower "
              f"than A beyond the run-to-run spread"
              + (f" ({', '.join(summary['slower_library'])})" if summary["slower_library"] else "")
              + f"; {len(summary['slower']) - len(summary['slower_library'])} of "
              f"{len(rows) - len(lib)} baseline contenders (not mmmod's code: host drift) slower "
              f"beyond it; {len(summary['faster'])} contenders faster beyond it.", "",
              "Times are each side's median over rounds of the suite's per-run median (ms); spread "
              "= (max - min) / median over rounds, the larger side's; flagged `slower` only when "
              "B/A - 1 exceeds it.", "",
              "| contender | mmmod | A median ms | B median ms | B/A | A min-max ms | B min-max ms "
              "| spread | verdict |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['contender']} | {'yes' if r['library'] else ''} | {_ms(r['median_a_s'])} | "
                     f"{_ms(r['median_b_s'])} | {r['ratio_b_over_a']:.3f} | {_ms(r['min_a_s'])}-"
                     f"{_ms(r['max_a_s'])} | {_ms(r['min_b_s'])}-{_ms(r['max_b_s'])} | "
                     f"{r['spread'] * 100:.0f} % | {r['verdict']} |")
    for side in ("a", "b"):
        only = summary[f"only_{side}"]
        if only:
            lines += ["", f"Timed in {side.upper()} only: " + ", ".join(f"`{k}`" for k in only)]
    return "\n".join(lines) + "\n"


# ---- running the trees ---------------------------------------------------------------------
def tree_env(tree: str, threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([tree] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                  if p])
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def commit(tree: str) -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=tree,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run_suite(tree: str, out_dir: str, threads: int | None, suite: Sequence[str],
              python: str = sys.executable) -> dict[str, Any]:
    """One suite run in a fresh subprocess: wall time, loads, timings and disagreements."""
    cmd = [python, "-m", "benchmarks.run_all", *suite, "--device", "cpu", "--out", out_dir]
    if threads:
        cmd += ["--threads", str(threads)]
    before = _load1()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=tree_env(tree, threads), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"the suite failed in {tree} (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    times, bad = collect(out_dir)
    return {"wall_s": wall, "load_before": before, "load_after": _load1(), "times": times,
            "disagreements": bad}


def probe(tree: str, path: str, python: str = sys.executable) -> None:
    proc = subprocess.run([python, PROBE, path], cwd=tree, env=tree_env(tree, None),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the agreement probe failed in {tree}:\n{proc.stderr[-3000:]}")


def compare_probes(path_a: str, path_b: str, same_methods: Iterable[str], rtol: float,
                   tree_a: str, tree_b: str) -> dict[str, Any]:
    """Tensor-by-tensor comparison of the two probe files (see the module docstring)."""
    import torch
    a, b = (torch.load(p, weights_only=False) for p in (path_a, path_b))
    for tree, doc in ((tree_a, a), (tree_b, b)):
        if not os.path.realpath(doc["mmmod_file"]).startswith(os.path.realpath(tree) + os.sep):
            raise RuntimeError(f"the probe in {tree} imported mmmod from {doc['mmmod_file']}")
    same = set(same_methods)
    configs = {}
    for key in sorted(set(a["configs"]) | set(b["configs"])):
        ta, tb = a["configs"].get(key), b["configs"].get(key)
        if ta is None or tb is None:
            configs[key] = {"status": "missing in " + ("A" if ta is None else "B"),
                            "error": (a if ta is None else b)["errors"].get(key)}
            continue
        worst, equal = 0.0, True
        for name in sorted(set(ta) | set(tb)):
            x, y = ta.get(name), tb.get(name)
            if x is None or y is None or x.shape != y.shape:
                worst, equal = float("inf"), False
                continue
            equal = equal and torch.equal(x, y)
            diff = (x.double() - y.double()).abs().max().item()
            worst = max(worst, diff / max(x.double().abs().max().item(), 1e-30))
        configs[key] = {"bitwise_equal": equal, "max_rel_diff": worst,
                        "status": "equal" if worst <= rtol else "differs"}
    failing = [k for k, c in configs.items() if k.split("/")[0] in same and c["status"] != "equal"]
    return {"same_methods": sorted(same), "rtol": rtol, "configs": configs, "failing": failing,
            "cpu_kernels": {"a": a["cpu_kernels"], "b": b["cpu_kernels"]}}


def _agreement_line(agree: Mapping[str, Any]) -> str:
    c = agree["configs"]
    same = [k for k in c if k.split("/")[0] in agree["same_methods"]]
    bitwise = sum(bool(c[k].get("bitwise_equal")) for k in same)
    others = {k: v for k, v in c.items() if k not in same}
    text = (f"revision_probe: {len(same) - len(agree['failing'])} of {len(same)} configurations of "
            f"{', '.join(agree['same_methods'])} agree within rtol {agree['rtol']:g} ({bitwise} bit for bit)")
    if agree["failing"]:
        text += f"; DIFFER: {', '.join(agree['failing'])}"
    if others:
        text += "; other methods (semantics may differ between the revisions): " + ", ".join(
            f"{k} {v['status']}" + (f" ({v['max_rel_diff']:.1e})" if v.get("max_rel_diff") else "")
            for k, v in others.items())
    return text + "."


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", required=True, help="the baseline checkout (built in place)")
    p.add_argument("--b", default=".", help="the checkout under test (default: this one)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads for both sides")
    p.add_argument("--suite", default="--quick", help="the run_all size flag(s) (default --quick)")
    p.add_argument("--out", default="benchmarks_out", help="where the JSON and markdown go")
    p.add_argument("--name", default=None, help="file name stem (default compare_<A commit>_<date>)")
    p.add_argument("--same-methods", default=SAME_METHODS,
                   help="methods whose probe results must agree between A and B")
    p.add_argument("--rtol", type=float, default=1e-6)
    p.add_argument("--skip-probe", action="store_true", help="time without the agreement check")
    p.add_argument("--note", default="", help="a line for the report (e.g. what else ran on the host)")
    args = p.parse_args(argv)
    trees = {"a": os.path.abspath(args.a), "b": os.path.abspath(args.b)}
    suite = args.suite.split()
    import torch  # the parent's torch: the version both subprocesses run (same interpreter)
    date = _dt.datetime.now(_dt.timezone.utc)
    meta: dict[str, Any] = {
        "title": f"{' '.join(['run_all', *suite])}: B against A, same host, alternating rounds",
        "date": date.isoformat(timespec="seconds"), "host": platform.node(), "cpu": cpu_name(),
        "nproc": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
        "threads": args.threads, "rounds": args.rounds, "suite": " ".join(["run_all", *suite]),
        "a": {"path": trees["a"], "commit": commit(trees["a"])},
        "b": {"path": trees["b"], "commit": commit(trees["b"])}, "note": args.note,
    }
    name = args.name or f"compare_{meta['a']['commit'][:7]}_{date:%Y-%m-%d}"
    with tempfile.TemporaryDirectory(prefix="compare_revisions_") as tmp:
        if not args.skip_probe:
            paths = {s: os.path.join(tmp, f"probe_{s}.pt") for s in trees}
            for s, tree in trees.items():
                print(f"agreement probe in {tree}", file=sys.stderr, flush=True)
                probe(tree, paths[s])
            agree = compare_probes(paths["a"], paths["b"], args.same_methods.split(","), args.rtol,
                                   trees["a"], trees["b"])
            meta["agreement"] = _agreement_line(agree)
            if agree["failing"]:
                raise SystemExit("A and B disagree before timing: " + meta["agreement"])
        else:
            agree = None
        runs: dict[str, list] = {"a": [], "b": []}
        for i in range(args.rounds):
            for s in ("a", "b"):
                out_dir = os.path.join(tmp, f"{s}{i}")
                os.makedirs(out_dir)
                print(f"round {i + 1}/{args.rounds}: {s.upper()}", file=sys.stderr, flush=True)
                runs[s].append(run_suite(trees[s], out_dir, args.threads, suite))
            doc = write(args.out, name, meta, agree, runs)  # after every round: a cut-short run keeps its rounds
    print(os.path.join(args.out, name + ".md"))
    return doc


def write(out: str, name: str, meta: dict[str, Any], agree: Any, runs: Mapping[str, list]) -> dict[str, Any]:
    """``<out>/<name>.json`` and ``.md`` from the rounds both sides have completed."""
    n = min(len(runs["a"]), len(runs["b"]))
    runs = {s: runs[s][:n] for s in runs}
    summary = summarize([r["times"] for r in runs["a"]], [r["times"] for r in runs["b"]])
    meta = dict(meta, rounds_done=n,
                finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    meta["loadavg"] = ", ".join(f"{s.upper()}{i + 1} {runs[s][i]['load_before']}/{runs[s][i]['load_after']}"
                                for i in range(n) for s in ("a", "b"))
    wall = {s: [r["wall_s"] for r in runs[s]] for s in runs}
    meta["wall"] = (f"run_all wall time, median over rounds: A {statistics.median(wall['a']):.0f} s, "
                    f"B {statistics.median(wall['b']):.0f} s")
    bad = {s: sorted({p for r in runs[s] for p in r["disagreements"]}) for s in runs}
    if bad["a"] or bad["b"]:
        meta["note"] = (meta["note"] + " " if meta["note"] else "") + (
            f"The suite's own output checks failed: A {bad['a']}, B {bad['b']}.")
    os.makedirs(out, exist_ok=True)
    doc = {"meta": meta, "agreement": agree, "suite_disagreements": bad, "wall_s": wall,
           "rounds": {s: [r["times"] for r in runs[s]] for s in runs}, "summary": summary}
    base = os.path.join(out, name)
    with open(base + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(summary, meta))
    return doc

if __name__ == "__main__":
    main()
