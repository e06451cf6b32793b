"""Gradient modulation on real encoder tensor mixes: OGM-GE, OGM, and the full OGM-GE step.

Modes:
* ``ogm_ge``: g <- k g + sigma n for every selected tensor (coefficients given);
* ``ogm``: g <- k g;
* ``full``: scores (B = 64, C = 6, as CREMA-D) + coefficients + OGM-GE modulation: everything
  the official code does per step besides backward and the optimizer.

Workloads (:mod:`benchmarks.workloads`): ``resnet18_conv`` (40 tensors, 22.3 M elements),
``resnet18_all``, ``many_small`` and, with ``--vit`` (default on GPU), ``vit_b16`` (~171 M).
Contenders on the same gradients: (a) paper, (b) plain torch, (c) mmmod ``torch``, (d) every live
fused backend. Each call is timed on its own with the gradients restored in between (outside
the timed region). The copy bandwidth is measured in the same run; ``x floor`` is the time over
the 12 B/element floor at that bandwidth. Before timing, every contender's output is checked:
OGM results equal k g (all contenders), OGM-GE noise has the per-tensor sigma of the raw gradient
(realised std / expected, all contenders), fused backends equal the ``torch`` reference.

    python -m benchmarks.bench_modulate [--quick|--smoke] [--vit|--no-vit] [--workloads a,b]
"""
from __future__ import annotations

import statistics

import torch

from . import bandwidth, common, paper_eager, plain_torch, workloads

ALPHA = 0.8
SCORE_B, SCORE_C = 64, 6
# bytes moved per gradient element (model of each algorithm, see docs/benchmarks.md)
BYTES_MODEL = {"ogm_ge": {"paper": 32, "plain": 28, "fused": 12},
               "ogm": {"paper": 8, "plain": 8, "fused": 8}}
BYTES_MODEL["full"] = BYTES_MODEL["ogm_ge"]
MODES = ("ogm_ge", "ogm", "full")


def make_logits(device, M=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    # the visual modality leads (bigger margins), as in the paper's CREMA-D runs
    logits = [(torch.randn(SCORE_B, SCORE_C, generator=g) * (1 + 2 * m)).to(device) for m in range(M)]
    labels = torch.randint(0, SCORE_C, (SCORE_B,), generator=g).to(device)
    for m, z in enumerate(logits):
        z[torch.arange(SCORE_B), labels] += 1.0 + m
    return logits, labels


def contender(name, mode, inst, logits, labels, modulator):
    """Callable doing one step of ``mode`` for contender ``name`` on ``inst``'s gradients."""
    noise = mode != "ogm"
    names, test = inst.names, inst.workload.dim_test()
    if name == "paper":
        k_fixed = paper_eager.coefficients(paper_eager.scores(logits, labels, True), ALPHA)
        if mode == "full":
            return lambda: paper_eager.full_step(inst.model, logits, labels, ALPHA, names, test, noise)
        return lambda: paper_eager.modulate(inst.model, k_fixed, names, test, noise)
    if name == "plain":
        k_fixed = plain_torch.coefficients(plain_torch.scores(logits, labels), ALPHA)
        if mode == "full":
            return lambda: plain_torch.full_step(modulator, inst.grads, logits, labels, ALPHA, noise)
        return lambda: modulator(inst.grads, k_fixed, noise)
    from mmmod import functional
    k_fixed = functional.coefficients(functional.scores(logits, labels, backend=name), "ogm_ge",
                                      ALPHA, backend=name)
    if mode == "full":
        def fn():
            s = functional.scores(logits, labels, backend=name)
            k = functional.coefficients(s, "ogm_ge", ALPHA, backend=name)
            functional.modulate_(inst.grads, k, noise=True, backend=name, seed=0, step=0)
        return fn
    return lambda: functional.modulate_(inst.grads, k_fixed, noise=noise, backend=name, seed=0, step=0)


def reference_k(logits, labels):
    from mmmod import functional
    return functional.coefficients(functional.scores(logits, labels, backend="torch"), "ogm_ge",
                                   ALPHA, backend="torch")


@torch.no_grad()
def check(mode, inst, k, ref_out):
    """Agreement of the gradients a contender just produced with the definition (and the torch
    reference): call right after one call of the contender on restored gradients."""
    out: dict = {}
    raw = [workloads._split(mst, ps) for mst, ps in zip(inst.masters, inst.params)]
    if mode == "ogm":
        err = 0.0
        for m, (gs, rs) in enumerate(zip(inst.grads, raw)):
            for g, r in zip(gs, rs):
                err = max(err, float((g - r * k[m]).abs().max()))
        out["max_abs_err_vs_kg"] = err
        out["agrees"] = err <= 1e-6 * max(1.0, float(max(r.abs().max() for rs in raw for r in rs)))
        return out
    ratios = []
    for m, (gs, rs) in enumerate(zip(inst.grads, raw)):
        for g, r in zip(gs, rs):
            if r.numel() >= 4096:
                expected = float(r.double().std()) + 1e-8
                ratios.append(float((g - r * k[m]).double().std()) / expected)
    out["noise_std_ratio_median"] = statistics.median(ratios) if ratios else None
    out["noise_std_ratio_range"] = [min(ratios), max(ratios)] if ratios else None
    ok = all(0.9 < r < 1.1 for r in ratios)
    if ref_out is not None:  # same Philox stream: must equal the reference
        err = max(float((g - h).abs().max()) for gs, hs in zip(inst.grads, ref_out)
                  for g, h in zip(gs, hs))
        out["max_abs_err_vs_torch_reference"] = err
        ok = ok and err <= 1e-5 * max(1.0, max(float(h.abs().max()) for hs in ref_out for h in hs))
    out["agrees"] = ok
    return out


def run(args) -> dict:
    device = common.pick_device(args.device)
    names = common.contenders(device, args.backends)
    mt = common.min_time(args, 2.0)
    if args.smoke:
        wls = list(workloads.SMOKE.values())
    else:
        vit = args.vit if args.vit is not None else device.type == "cuda"
        wls = [w for w in workloads.WORKLOADS.values() if vit or not w.big]
        if args.quick:
            wls = [w for w in wls if w.name != "resnet18_all"]
    if args.workloads:
        keep = set(args.workloads.split(","))
        wls = [w for w in (list(workloads.WORKLOADS.values()) + list(workloads.SMOKE.values()))
               if w.name in keep]
    bw = bandwidth.measure(device, 1 << 16 if args.smoke else bandwidth.RESNET_ELEMS,
                           common.min_time(args, 1.0))
    copy_bw = bw["copy_GBps"]
    common.log(f"copy bandwidth {copy_bw:.2f} GB/s")
    logits, labels = make_logits(device)
    k_ref = reference_k(logits, labels)
    cases = []
    for w in wls:
        inst = workloads.build(w, device)
        n = inst.numel
        floor = bandwidth.floor_seconds(n, copy_bw)
        for mode in MODES:
            case = {"workload": w.name, "description": w.description, "mode": mode,
                    "tensors": inst.ntensors, "elements": n, "floor_s": floor, "contenders": {}}
            ref_out = None
            for name in names:
                if name == "torch" and mode == "full" and not args.smoke:
                    # the reference's full step is its ogm_ge row plus scores (~0.1 ms); at
                    # minutes per call on CPU it is timed once, in ogm_ge mode
                    continue
                modulator = plain_torch.Modulator()
                fn = contender(name, mode, inst, logits, labels, modulator)
                # one call on restored gradients: checked (and on CPU counted and timed) ...
                inst.reset()
                if device.type == "cpu":
                    syn = common.count_syncs(fn, device)
                else:
                    fn()
                chk = check(mode, inst, k_ref.tolist(), ref_out if mode != "ogm" else None)
                if name == "torch" and mode != "ogm":
                    ref_out = [[g.clone() for g in gs] for gs in inst.grads]
                if device.type != "cpu":
                    inst.reset()
                    syn = common.count_syncs(fn, device)
                # ... then timed, unless one call already took far longer than the budget
                if device.type == "cpu" and syn["elapsed_s"] > max(5.0, 3 * mt) and not args.smoke:
                    t = {"median_s": syn["elapsed_s"], "reps": 1,
                         "method": "one call (under the sync counter): too slow to repeat"}
                else:
                    slow = name == "torch" or args.smoke
                    t = common.time_fn(fn, device, reset=inst.reset, min_time=mt,
                                       min_reps=(1 if args.quick else 2) if slow else 3,
                                       warmup=0 if slow else 1)
                inst.reset()
                c = {**t, **syn, **chk}
                kind = name if name in ("paper", "plain") else "fused"
                c["bytes_per_elem_model"] = None if name == "torch" else BYTES_MODEL[mode][kind]
                c["GBps_at_12B"] = 12 * n / t["median_s"] / 1e9
                c["x_floor"] = t["median_s"] / floor
                case["contenders"][name] = c
                common.log(f"{w.name} {mode} {name}: {common.fmt_time(t['median_s'])} "
                           f"({t['reps']} reps) syncs {syn['syncs']} agrees {chk['agrees']}")
            ref_out = None
            a = case["contenders"].get("paper", {}).get("median_s")
            b = case["contenders"].get("plain", {}).get("median_s")
            for c in case["contenders"].values():
                c["x_vs_paper"] = common.ratio(a, c["median_s"])
                c["x_vs_plain"] = common.ratio(b, c["median_s"])
            cases.append(case)
        inst.reset()
        del inst
    tab = render(cases, copy_bw)
    print(tab)
    payload = {"alpha": ALPHA, "scores_B": SCORE_B, "scores_C": SCORE_C, "contenders": names,
               "copy_GBps": copy_bw, "bandwidth": bw, "coefficients": k_ref.tolist(), "cases": cases}
    common.write_results("bench_modulate", device, args, payload, tab)
    return payload


def render(cases, copy_bw) -> str:
    headers = ["workload", "mode", "contender", "median", "x(a)", "x(b)", "syncs",
               "B/elem (model)", "GB/s @12 B/elem", "x floor", "agrees"]
    rows = []
    for case in cases:
        for name, c in case["contenders"].items():
            rows.append([f"{case['workload']} ({case['tensors']} t, {case['elements'] / 1e6:.1f} M)",
                         case["mode"], name, common.fmt_time(c["median_s"]), c["x_vs_paper"],
                         c["x_vs_plain"], c["syncs"], c["bytes_per_elem_model"], c["GBps_at_12B"],
                         c["x_floor"], "yes" if c["agrees"] else "NO"])
    return (common.table(headers, rows) + f"\n\ncopy bandwidth measured in this run: {copy_bw:.2f} "
            "GB/s; floor = 12 B/elem at that bandwidth; (a) = paper, (b) = plain; x = times faster")


def main(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--vit", dest="vit", action="store_true", default=None,
                   help="include the ViT-B/16 pair (~171 M elements; default on GPU only)")
    p.add_argument("--no-vit", dest="vit", action="store_false")
    p.add_argument("--workloads", default=None, help="comma-separated workload names")
    args = p.parse_args(argv)
    with common.session(args):
        return run(args)


if __name__ == "__main__":
    main()
