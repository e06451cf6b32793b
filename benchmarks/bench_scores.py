"""Scores + coefficients: s_m = sum_i softmax(z_m)[i, y_i], then the OGM-GE coefficients.

Grid: B in {32, 256, 4096}, C in {6, 31, 309, 1000, 32000}, M in {2, 3} (``--quick``: a
subset; ``--smoke``: two tiny cases). Contenders on the same logits: (a) the paper's
per-sample loop, (b) plain torch, (c) mmmod ``torch`` backend, (d) every live fused backend.
Reported per case: median time, speed-up of each contender over (a) and (b), host syncs of one
call, GB/s reading the logits once (M * B * C * 4 bytes) and agreement of s and k with (c).

    python -m benchmarks.bench_scores [--quick|--smoke] [--device cuda]
"""
from __future__ import annotations

import itertools

import torch

from . import common, paper_eager, plain_torch

ALPHA = 0.8
# (a) recomputes softmax(z) for every sample: B * B * C elements per modality and call.
# Above this many it computes the softmax once per modality (recorded as "hoisted").
LITERAL_LIMIT = {"cpu": 2e8, "cuda": 4e9}


def grid(args):
    if args.smoke:
        return [(8, 6, 2), (16, 31, 3)]
    if args.quick:
        return list(itertools.product((32, 256, 4096), (6, 309, 32000), (2,))) + \
            [(256, 31, 3), (4096, 1000, 3)]
    return list(itertools.product((32, 256, 4096), (6, 31, 309, 1000, 32000), (2, 3)))


def make_inputs(B, C, M, device, seed=0):
    g = torch.Generator().manual_seed(seed + 7919 * B + 31 * C + M)
    logits = [(torch.randn(B, C, generator=g) * (1.0 + m)).to(device) for m in range(M)]
    labels = torch.randint(0, C, (B,), generator=g).to(device)
    return logits, labels


def contender_fns(name, logits, labels, hoist):
    """A callable returning (scores [M], coefficients [M]) for one contender."""
    if name == "paper":
        def fn():
            s = paper_eager.scores(logits, labels, hoist_softmax=hoist)
            k = paper_eager.coefficients(s, ALPHA)
            return s, k
        return fn
    if name == "plain":
        def fn():
            s = plain_torch.scores(logits, labels)
            return s, plain_torch.coefficients(s, ALPHA)
        return fn
    from mmmod import functional

    def fn():
        s = functional.scores(logits, labels, backend=name)
        return s, functional.coefficients(s, "ogm_ge", ALPHA, backend=name)
    return fn


def _as_tensor(x, device):
    return paper_eager.as_tensor(x, device) if isinstance(x, (list, tuple)) else x.float()


def run(args) -> dict:
    device = common.pick_device(args.device)
    names = common.contenders(device, args.backends)
    mt = common.min_time(args, 0.5)
    limit = LITERAL_LIMIT.get(device.type, 2e8)
    cases = []
    for B, C, M in grid(args):
        logits, labels = make_inputs(B, C, M, device)
        hoist = B * B * C > limit
        case = {"B": B, "C": C, "M": M, "paper_softmax": "hoisted" if hoist else "per sample",
                "logit_bytes": 4 * B * C * M, "contenders": {}}
        ref = None
        outs = {}
        for name in names:
            fn = contender_fns(name, logits, labels, hoist)
            s, k = fn()
            outs[name] = (_as_tensor(s, device), _as_tensor(k, device))
            syn = common.count_syncs(fn, device)
            if device.type == "cpu" and syn["elapsed_s"] > max(3.0, 3 * mt):
                t = {"median_s": syn["elapsed_s"], "reps": 1,
                     "method": "one call (under the sync counter): too slow to repeat"}
            else:
                t = common.time_fn(fn, device, min_time=mt)
            case["contenders"][name] = {**t, **syn}
        ref = outs.get("torch") or outs.get("plain")
        for name, (s, k) in outs.items():
            c = case["contenders"][name]
            c["scores"], c["coeffs"] = s.tolist(), k.tolist()
            c["agrees"] = bool(torch.allclose(s, ref[0], rtol=1e-4, atol=1e-4)
                               and torch.allclose(k, ref[1], rtol=1e-4, atol=1e-5))
        a = case["contenders"].get("paper", {}).get("median_s")
        b = case["contenders"].get("plain", {}).get("median_s")
        for name, c in case["contenders"].items():
            c["x_vs_paper"] = common.ratio(a, c["median_s"])
            c["x_vs_plain"] = common.ratio(b, c["median_s"])
            c["GBps_logits"] = case["logit_bytes"] / c["median_s"] / 1e9
        cases.append(case)
        common.log(f"scores B={B} C={C} M={M}: " + ", ".join(
            f"{n} {common.fmt_time(c['median_s'])}" for n, c in case["contenders"].items()))
        del logits, labels
    tab = render(cases, names)
    print(tab)
    payload = {"alpha": ALPHA, "contenders": names, "cases": cases}
    common.write_results("bench_scores", device, args, payload, tab)
    return payload


def render(cases, names) -> str:
    xa = [n for n in names if n != "paper"]
    fused = [n for n in names if n not in ("paper", "plain")]
    headers = ["B", "C", "M"] + [f"{n}" for n in names]
    headers += [f"{n} x(a)" for n in xa] + [f"{n} x(b)" for n in fused]
    headers += ["syncs " + "/".join(n for n in names), "agree"]
    rows = []
    for c in cases:
        cs = c["contenders"]
        r = [c["B"], c["C"], c["M"]]
        r += [common.fmt_time(cs[n]["median_s"]) + ("*" if n == "paper" and c["paper_softmax"] == "hoisted" else "")
              for n in names]
        r += [cs[n]["x_vs_paper"] for n in xa] + [cs[n]["x_vs_plain"] for n in fused]
        r += ["/".join(str(cs[n]["syncs"]) for n in names),
              "yes" if all(cs[n]["agrees"] for n in names) else "NO"]
        rows.append(r)
    return (common.table(headers, rows) + "\n\n(a) = paper, (b) = plain; x = times faster; "
            "* = paper's softmax hoisted out of the per-sample loop (else B softmaxes per call)")


def main(argv=None):
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    with common.session(args):
        return run(args)


if __name__ == "__main__":
    main()
