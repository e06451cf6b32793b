"""Run every benchmark, then plot: ``python -m benchmarks.run_all [--quick|--smoke]``.

Extra options are passed to each benchmark (``--device``, ``--out``, ``--threads``,
``--backends``, ``--min-time``). Writes ``<out>/<name>_<device>.{json,md}``,
``<out>/summary_<device>.png`` and ``<out>/README_<device>.md`` (all tables in one file, with
the speed targets checked against the numbers).
"""
from __future__ import annotations

import os
import time

from . import bandwidth, bench_methods, bench_modulate, bench_scores, bench_step, common, plot

TARGETS = {
    "cpu": [("cpu backend full OGM-GE, resnet18_conv, vs (a)", "cpu", "full", "x_vs_paper", 10.0),
            ("cpu backend full OGM-GE, resnet18_conv, vs (b)", "cpu", "full", "x_vs_plain", 2.0)],
    "cuda": [("fused full OGM-GE, resnet18_conv, vs (a)", None, "full", "x_vs_paper", 30.0),
             ("fused full OGM-GE, resnet18_conv, vs (b)", None, "full", "x_vs_plain", 4.0)],
}


def targets(mod: dict, step: dict | None, tag: str) -> list[list]:
    """Rows: target, backend, measured, met."""
    rows = []
    case = next((c for c in mod["cases"] if c["workload"] == "resnet18_conv"
                 and c["mode"] == "full"), None)
    ogm_ge = next((c for c in mod["cases"] if c["workload"] == "resnet18_conv"
                   and c["mode"] == "ogm_ge"), None)
    if case is None:
        return rows
    fused = [n for n in case["contenders"] if n in common.FUSED]
    for label, backend, _, key, goal in TARGETS.get(tag, []):
        for b in ([backend] if backend else fused) or [None]:
            c = case["contenders"].get(b) if b else None
            v = None if c is None else c[key]
            rows.append([label, b or "-", f">= {goal:g}x",
                         "not live" if c is None else f"{v:.1f}x",
                         "-" if c is None else ("met" if v >= goal else "MISSED")])
    if tag == "cpu" and ogm_ge and "cpu" in ogm_ge["contenders"]:
        c = ogm_ge["contenders"]["cpu"]
        for key, goal, who in (("x_vs_paper", 10.0, "(a)"), ("x_vs_plain", 2.0, "(b)")):
            rows.append([f"(info) cpu backend OGM-GE modulation only vs {who}", "cpu",
                         f">= {goal:g}x", f"{c[key]:.1f}x", "met" if c[key] >= goal else "MISSED"])
    if tag == "cuda" and ogm_ge:
        for b in fused:
            c = ogm_ge["contenders"][b]
            rows.append(["fused OGM-GE within 1.3x of the 12 B/elem floor", b, "<= 1.3x",
                         f"{c['x_floor']:.2f}x", "met" if c["x_floor"] <= 1.3 else "MISSED"])
            rows.append(["zero host syncs (modulation)", b, "0", str(c["syncs"]),
                         "met" if c["syncs"] == 0 else "MISSED"])
        if step:
            for kind, r in step["optimizers"].items():
                for n, s in r["steps"].items():
                    if n.startswith("mmmod:") and n != "mmmod:torch":
                        rows.append([f"modulation <= 2 % of a train step ({kind}, batch "
                                     f"{step['batch']})", n, "<= 2 %",
                                     f"{s['pct_of_train_step']:.2f} %",
                                     "met" if s["pct_of_train_step"] <= 2 else "MISSED"])
                        cg = s.get("cuda_graph", {})
                        rows.append([f"step capturable in a CUDA graph ({kind})", n, "yes",
                                     "yes" if cg.get("capturable") else "no: " + cg.get("error", "?")[:80],
                                     "met" if cg.get("capturable") else "MISSED"])
    return rows


def main(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--vit", dest="vit", action="store_true", default=None)
    p.add_argument("--no-vit", dest="vit", action="store_false")
    p.add_argument("--skip", default="", help="comma-separated benchmarks to skip")
    args, _ = p.parse_known_args(argv)
    flags = [f for f in ("--quick", "--smoke") if getattr(args, f[2:])]
    for opt in ("device", "out", "threads", "backends", "min_time"):
        v = getattr(args, opt)
        if v is not None:
            flags += [f"--{opt.replace('_', '-')}", str(v)]
    skip = set(args.skip.split(","))
    t0 = time.time()
    out = {}
    if "bandwidth" not in skip:
        out["bandwidth"] = bandwidth.main(flags)
    if "bench_scores" not in skip:
        out["bench_scores"] = bench_scores.main(flags)
    if "bench_modulate" not in skip:
        vit = [] if args.vit is None else ["--vit" if args.vit else "--no-vit"]
        out["bench_modulate"] = bench_modulate.main(flags + vit)
    if "bench_step" not in skip:
        out["bench_step"] = bench_step.main(flags)
    if "bench_methods" not in skip and common.pick_device(args.device).type == "cpu":
        out["bench_methods"] = bench_methods.main(flags)  # AGM, MSLR, InfoReg vs their code
    device = common.pick_device(args.device)
    tag = common.device_tag(device)
    png = plot.plot(args.out, tag)
    write_summary(args.out, tag, time.time() - t0, png)
    return out


def write_summary(out_dir: str, tag: str, seconds: float, png: str | None) -> str:
    import json
    docs = {}
    for name in ("bandwidth", "bench_scores", "bench_modulate", "bench_step"):
        path = os.path.join(out_dir, f"{name}_{tag}.json")
        if os.path.exists(path):
            with open(path) as f:
                docs[name] = json.load(f)
    lines = [f"# Latest benchmark results ({tag})", ""]
    if docs:
        env = next(iter(docs.values()))["env"]
        lines += [f"{env['device_name']}; {env['date']}; git {env['git_revision']}; torch "
                  f"{env['torch']}; {env['torch_threads']} threads; backends "
                  f"{ {k: (v or 'live') for k, v in env['backends'].items()} }; "
                  f"run_all took {seconds:.0f} s", ""]
    if "bench_modulate" in docs:
        rows = targets(docs["bench_modulate"], docs.get("bench_step"), tag)
        if rows:
            lines += ["## Targets", "",
                      common.table(["target", "backend", "goal", "measured", "status"], rows), ""]
    for name, d in docs.items():
        md = os.path.join(out_dir, f"{name}_{tag}.md")
        if os.path.exists(md):
            with open(md) as f:
                body = f.read().split("\n", 1)[1]
            lines += [f"## {name}", body, ""]
    if png:
        lines += [f"![summary]({os.path.basename(png)})", ""]
    path = os.path.join(out_dir, f"README_{tag}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print(path)
    return path


if __name__ == "__main__":
    main()
