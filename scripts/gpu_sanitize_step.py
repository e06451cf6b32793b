"""A small OGM-GE training step on one fused GPU backend, for compute-sanitizer.

``compute-sanitizer --tool memcheck|racecheck --error-exitcode 1 python scripts/gpu_sanitize_step.py
--backend cuda|triton`` (scripts/gpu_check.sh runs both tools over both backends). The step runs
with an integer Philox step and with the device counter (capturable=True), over odd-sized conv
and linear gradients in two modalities, so every kernel of the backend is launched: scores,
coefficients, chunk statistics, sigma, noisy modulation, and plain scaling (OGM). The result is
checked against the plain-torch reference backend so a wrong write cannot pass silently.
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch

import mmmod


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        # odd sizes: tensors that do not fill a chunk or a Philox group of 4
        self.audio = torch.nn.Sequential(torch.nn.Conv2d(1, 5, 3), torch.nn.ReLU(),
                                         torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                         torch.nn.Linear(5, 7))
        self.visual = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 5), torch.nn.ReLU(),
                                          torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                          torch.nn.Linear(6, 9))
        self.head = torch.nn.Linear(16, 4)

    def forward(self, xa, xv):
        fa, fv = self.audio(xa), self.visual(xv)
        return self.head(torch.cat([fa, fv], 1)), (fa, fv)


def run(model, backend, method, capturable, data, seed):
    opt = mmmod.ModulatedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        modalities={"audio": model.audio, "visual": model.visual}, method=method, alpha=0.8,
        param_filter="all", backend=backend, seed=seed, capturable=capturable)
    for xa, xv, y in data:
        opt.zero_grad(set_to_none=False)
        out, feats = model(xa, xv)
        opt.observe(dict(zip(["audio", "visual"], mmmod.fusion.concat_logits(model.head, list(feats)))), y)
        torch.nn.functional.cross_entropy(out, y).backward()
        opt.step()
    torch.cuda.synchronize()
    return [p.detach().clone() for p in model.parameters()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["cuda", "triton"], required=True)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_sanitize_step: no CUDA device", file=sys.stderr)
        return 2
    live, why = mmmod.backends.status(args.backend)
    if not live:
        print(f"gpu_sanitize_step: backend {args.backend!r} not available: {why}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    dev = torch.device("cuda")
    base = Tiny().to(dev)
    data = [(torch.randn(5, 1, 9, 11, device=dev), torch.randn(5, 3, 13, 7, device=dev),
             torch.randint(0, 4, (5,), device=dev)) for _ in range(2)]
    worst = 0.0
    for method in ("ogm_ge", "ogm"):
        for capturable in (False, True):
            got = run(copy.deepcopy(base), args.backend, method, capturable, data, args.seed)
            want = run(copy.deepcopy(base), "torch", method, capturable, data, args.seed)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
                worst = max(worst, float((a - b).abs().max()))
            print(f"gpu_sanitize_step: {args.backend} {method} capturable={capturable}: matches "
                  f"the torch backend")
    print(f"gpu_sanitize_step: ok (max |diff| vs torch {worst:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
