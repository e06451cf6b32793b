"""MMPareto: the authors' whole step (transcribed) against ``ModulatedOptimizer``'s, and the
combine alone against one ``torch._foreach_add_`` over the same gradients.

Workload: the demo's audio-visual model (``mmmod.demo.models``: two ResNet encoders of the
demo's width, a concat fusion head and unimodal heads, named as the authors' ``AVClassifier``:
``audio_net``, ``visual_net``, ``head``, ``head_audio``, ``head_video``), a random batch of the
demo's shapes, SGD (lr 2e-3, momentum 0.9, weight decay 1e-4: the script's defaults).

* ``paper``: ``benchmarks.mmpareto_eager.authors_step``: forward, three retained backward
  passes with every encoder gradient cloned (and concatenated), the cosines, the solver's
  host-side dot products, the summed backward, the ``named_parameters()`` loop with
  ``torch.norm`` per tensor, ``optimizer.step()``;
* ``mmmod``: forward, ``opt.backward({"multimodal": L, "audio": L_a, "visual": L_v})`` (two
  backward passes), ``opt.step()`` (the combine, then SGD): on ``backend="torch"`` (the
  combine's plain-torch reference) and on the fused backend of the device (``cpu``: the C++
  kernels of ``_pair_moments`` / ``combine_``; ``auto`` on a GPU);
* ``floor``: plain torch, forward, the same two backward passes (``L_mm`` retained, then
  ``L_a + L_v``) and ``optimizer.step()``, no combine: what any step that needs each encoder's
  two gradients apart costs at least (a third backward, or a batched one through
  ``is_grads_batched``, costs more here).

Both start from the same parameters and batch; one step of each is compared first (``agrees``:
parameters within ``RTOL`` of each tensor's largest magnitude, and moved). The whole steps are
timed alternately (round robin, medians) because the host is shared. The combine rows time
the method's combine stage (``MMPareto.combine_``: the two ops and the weights between them)
on saved gradient pairs of every encoder tensor (inputs restored between calls), on the
reference and on the fused backend, against ``torch._foreach_add_(g_sum, g_mm)`` over the
same tensors; the fused backend's combined gradients are compared with the reference's first
(``combine_check``: max difference in float32 ulps of each tensor's largest magnitude). The
same comparison runs again on random gradients of the encoders' shapes at ``--large-width``
(default 128, about 10 M elements: gradients far past the caches), where both sides are bound
by memory traffic: the combine's two passes move 20 B per float32 element against the add's
12 B (benchmarks/byte_model.py), so 1.67x is the floor there.

    python -m benchmarks.bench_mmpareto [--quick|--smoke] [--batch N] [--large-width W]
                                        [--threads 2]
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import common
from . import mmpareto_eager as eager

NAMES = ("audio", "visual")
N_CLASSES = 8
#: agreement bound of the parameters after one step (float32 rounding; see
#: docs/semantics.md section 11 for why the two differ in the last bits)
RTOL = 1e-5


class AuthorsNamedAV(nn.Module):
    """The demo's encoders and heads under the authors' parameter names."""

    def __init__(self, width: int):
        super().__init__()
        from mmmod.demo.models import make_encoder
        self.audio_net = make_encoder(1, width)
        self.visual_net = make_encoder(3, width)
        da, dv = self.audio_net.out_dim, self.visual_net.out_dim
        self.head = nn.Linear(da + dv, N_CLASSES)
        self.head_audio = nn.Linear(da, N_CLASSES)
        self.head_video = nn.Linear(dv, N_CLASSES)

    def forward(self, audio, visual):
        a, v = self.audio_net(audio), self.visual_net(visual)
        return self.head(torch.cat([a, v], 1)), self.head_audio(a), self.head_video(v)


def losses(model, batch):
    a, v, y = batch
    out, out_a, out_v = model(a, v)
    return [F.cross_entropy(out, y), F.cross_entropy(out_a, y), F.cross_entropy(out_v, y)]


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=2e-3, momentum=0.9, weight_decay=1e-4)


def _max_rel_diff(a, b):
    return max(((x - y).abs().max() / x.abs().max().clamp_min(1e-30)).item()
               for x, y in zip(a, b))


def run(args):
    device = common.pick_device(args.device)
    batch = args.batch or (4 if args.smoke else 64)
    width = 4 if args.smoke else 16
    spatial = 16 if args.smoke else 32  # the demo's images; its spectrograms are 32 x 63
    frames = 16 if args.smoke else 63
    torch.manual_seed(0)
    model = AuthorsNamedAV(width).to(device)
    data = (torch.randn(batch, 1, spatial, frames, device=device),
            torch.randn(batch, 3, spatial, spatial, device=device),
            torch.randint(0, N_CLASSES, (batch,), device=device))
    import mmmod
    ours = copy.deepcopy(model)
    inner_p = _sgd(model)
    from mmmod import backends
    fused_backend = ("cpu" if backends.status("cpu")[0] else "torch") if device.type == "cpu" \
        else "auto"
    fused_model = copy.deepcopy(model)
    opt = mmmod.ModulatedOptimizer(_sgd(ours), {"audio": ours.audio_net,
                                                "visual": ours.visual_net},
                                   method="mmpareto", backend="torch")
    opt_f = mmmod.ModulatedOptimizer(_sgd(fused_model), {"audio": fused_model.audio_net,
                                                         "visual": fused_model.visual_net},
                                     method="mmpareto", backend=fused_backend)

    def paper_fn():
        eager.authors_step(model, inner_p, lambda: losses(model, data), list(NAMES))

    def mmmod_fn():
        opt.zero_grad()
        ls = losses(ours, data)
        opt.backward(dict(zip(("multimodal",) + NAMES, ls)))
        opt.step()

    floor_model = copy.deepcopy(model)
    floor_opt = _sgd(floor_model)

    def floor_fn():
        floor_opt.zero_grad()
        ls = losses(floor_model, data)
        ls[0].backward(retain_graph=True)
        (ls[1] + ls[2]).backward()
        floor_opt.step()

    def fused_fn():
        opt_f.zero_grad()
        ls = losses(fused_model, data)
        opt_f.backward(dict(zip(("multimodal",) + NAMES, ls)))
        opt_f.step()

    # ---- the outputs first: one step of each from the same state --------------------------
    start = [p.detach().clone() for p in model.parameters()]
    paper_fn()
    mmmod_fn()
    fused_fn()
    after_p = [p.detach().clone() for p in model.parameters()]
    after_m = [p.detach().clone() for p in ours.parameters()]
    after_f = [p.detach().clone() for p in fused_model.parameters()]
    diff = _max_rel_diff(after_p, after_m)
    diff_f = _max_rel_diff(after_p, after_f)
    moved = _max_rel_diff(start, after_p) > 0
    check = {"max_rel_diff": diff, "max_rel_diff_fused": diff_f, "rtol": RTOL,
             "fused_backend": fused_backend,
             "agrees": diff <= RTOL and diff_f <= RTOL and moved,
             "weights": opt._method_state["weights"].tolist(),
             "weights_fused": opt_f._method_state["weights"].tolist()}
    common.log(f"paper vs mmmod max rel diff {diff:.3g} (fused {diff_f:.3g}) agrees "
               f"{check['agrees']}")

    # ---- whole steps, round robin --------------------------------------------------------
    reps = 2 if args.smoke else 8 if args.quick else 20
    contenders = (("paper", paper_fn), ("mmmod", mmmod_fn), ("mmmod fused", fused_fn),
                  ("floor", floor_fn))
    samples = {name: [] for name, _ in contenders}
    for _, fn in contenders:  # warm-up
        fn()
    for _ in range(reps):
        for name, fn in contenders:
            common.sync(device)
            t0 = time.perf_counter()
            fn()
            common.sync(device)
            samples[name].append(time.perf_counter() - t0)
    steps = {k: {"median_s": statistics.median(v), "reps": len(v)} for k, v in samples.items()}
    for name in ("mmmod", "mmmod fused", "floor"):
        steps[name]["ratio_vs_paper"] = steps[name]["median_s"] / steps["paper"]["median_s"]
    common.log(f"whole step: paper {common.fmt_time(steps['paper']['median_s'])}, mmmod "
               f"{common.fmt_time(steps['mmmod']['median_s'])}, fused "
               f"{common.fmt_time(steps['mmmod fused']['median_s'])}")

    # ---- the combine alone ------------------------------------------------------------------
    opt.zero_grad()
    opt.backward(dict(zip(("multimodal",) + NAMES, losses(ours, data))))
    fused = [list(r) for r in opt._objectives.fused]
    summed = [[p.grad for p in getattr(ours, f"{n}_net").parameters()] for n in NAMES]
    comb, combine_check = time_combine(args, device, fused, summed, fused_backend)
    opt.zero_grad()
    numel = sum(g.numel() for row in summed for g in row)
    ntensors = sum(len(row) for row in summed)
    large = None
    if not args.smoke and args.large_width:
        from mmmod.demo.models import make_encoder
        g = torch.Generator().manual_seed(1)
        shapes = [[p.shape for p in make_encoder(c, args.large_width).parameters()]
                  for c in (1, 3)]
        big = [[[torch.randn(sh, generator=g).to(device) for sh in row] for row in shapes]
               for _ in range(2)]
        lcomb, lcheck = time_combine(args, device, big[0], big[1], fused_backend)
        large = {"width": args.large_width, "encoder_tensors": sum(len(r) for r in shapes),
                 "encoder_elements": sum(t.numel() for row in big[1] for t in row),
                 "combine": lcomb, "combine_check": lcheck}
        del big
    results = {"batch": batch, "width": width, "spatial": spatial, "encoder_elements": numel,
               "encoder_tensors": ntensors, "check": check, "steps": steps, "combine": comb,
               "combine_check": combine_check, "large": large,
               "targets": {"combine_vs_foreach_add": 1.2, "step_vs_paper": 0.6}}
    tab = render(results)
    print(tab)
    common.write_results("bench_mmpareto", device, args, results, tab)
    return results


def time_combine(args, device, fused, summed, fused_backend):
    """The method's combine stage (``MMPareto.combine_``) on the reference and on
    ``fused_backend`` against one ``torch._foreach_add_(summed, fused)``, inputs restored
    before every call; the fused backend's result checked against the reference's first."""
    import mmmod
    flat_s = [g for row in summed for g in row]
    flat_a = [g for row in fused for g in row]
    flat_saved = [g.clone() for g in flat_s]

    def reset():
        torch._foreach_copy_(flat_s, flat_saved)

    method = mmmod.methods.get("mmpareto")
    state = method.init_state(len(NAMES), device=device)

    def combine_on(backend):
        def fn():
            method.combine_(fused, summed, state, alpha=1.5, names=NAMES, backend=backend)
        return fn

    combine_fn, combine_fused_fn = combine_on("torch"), combine_on(fused_backend)
    reset()
    combine_fn()
    want = [g.clone() for g in flat_s]
    reset()
    combine_fused_fn()
    ulps = max(((x - y).abs().max() / (torch.finfo(torch.float32).eps
                                         * y.abs().max().clamp_min(1e-30))).item()
               for x, y in zip(flat_s, want))
    check = {"backend": fused_backend, "max_ulps_of_max": ulps,
             "bitwise": all(torch.equal(x, y) for x, y in zip(flat_s, want))}
    common.log(f"combine on {fused_backend} vs reference: {ulps:.3g} ulps of each tensor's max")
    del want

    def add_fn():
        torch._foreach_add_(flat_s, flat_a)

    mt = common.min_time(args, full=1.0)
    comb = {}
    fused_name = f"mmmod combine ({fused_backend})"
    for name, fn in (("mmmod combine (reference)", combine_fn), (fused_name, combine_fused_fn),
                     ("torch._foreach_add_", add_fn)):
        comb[name] = common.time_fn(fn, device, reset=reset, min_time=mt,
                                    min_reps=1 if args.smoke else 5)
        comb[name].update(common.count_syncs(fn, device))
    reset()
    comb["ratio"] = (comb["mmmod combine (reference)"]["median_s"]
                     / comb["torch._foreach_add_"]["median_s"])
    comb["ratio_fused"] = comb[fused_name]["median_s"] / comb["torch._foreach_add_"]["median_s"]
    comb["fused_name"] = fused_name
    return comb, check


def _combine_rows(what, c):
    return [[what, "torch._foreach_add_", common.fmt_time(c["torch._foreach_add_"]["median_s"]),
             ""],
            ["", "mmmod combine (reference)",
             common.fmt_time(c["mmmod combine (reference)"]["median_s"]),
             f"{c['ratio']:.2f}x _foreach_add_, "
             f"{c['mmmod combine (reference)']['syncs']} host syncs"],
            ["", c["fused_name"], common.fmt_time(c[c["fused_name"]]["median_s"]),
             f"{c['ratio_fused']:.2f}x _foreach_add_, {c[c['fused_name']]['syncs']} host syncs"]]


def render(r) -> str:
    s, c = r["steps"], r["combine"]
    head = (f"demo-sized model (width {r['width']}, {r['spatial']}x{r['spatial']} images), "
            f"batch {r['batch']}; {r['encoder_tensors']} encoder tensors, "
            f"{r['encoder_elements']} elements; one step agrees: max rel diff "
            f"{r['check']['max_rel_diff']:.2g}, fused {r['check']['max_rel_diff_fused']:.2g} "
            f"({'yes' if r['check']['agrees'] else 'NO'}); the fused combine against the "
            f"reference: {r['combine_check']['max_ulps_of_max']:.2g} float32 ulps of each "
            f"tensor's max (bitwise: {r['combine_check']['bitwise']})\n\n")
    rows = [["whole step (forward, backward passes, combine, SGD)", "paper (4 backward passes)",
             common.fmt_time(s["paper"]["median_s"]), ""],
            ["", "mmmod (2 backward passes), backend torch",
             common.fmt_time(s["mmmod"]["median_s"]), f"{s['mmmod']['ratio_vs_paper']:.2f}x paper"],
            ["", f"mmmod (2 backward passes), backend {r['check']['fused_backend']}",
             common.fmt_time(s["mmmod fused"]["median_s"]),
             f"{s['mmmod fused']['ratio_vs_paper']:.2f}x paper"],
            ["", "floor: plain torch, the 2 backward passes, no combine",
             common.fmt_time(s["floor"]["median_s"]), f"{s['floor']['ratio_vs_paper']:.2f}x paper"]]
    rows += _combine_rows(f"combine alone ({r['encoder_elements']} elements)", c)
    large = r.get("large")
    if large:
        rows += _combine_rows(f"combine alone, width {large['width']} "
                              f"({large['encoder_elements']} elements)", large["combine"])
    return head + common.table(["what", "contender", "median", "ratio"], rows)


def main(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--large-width", type=int, default=128,
                   help="encoder width of the large combine comparison (0: skip it)")
    args, _ = p.parse_known_args(argv)
    with common.session(args):
        return run(args)


if __name__ == "__main__":
    main()
