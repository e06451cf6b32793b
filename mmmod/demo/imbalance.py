"""The demo's imbalance report: each run's modality contributions (exact Shapley values of
the fused model's test accuracy and loss, zero masking) and each frozen encoder's linear-probe
accuracy, measured with :mod:`mmmod.diagnostics` before and after training."""
from __future__ import annotations

import time

import torch

from .. import diagnostics
from .models import AVClassifier


def masked_forward(model: AVClassifier):
    """``forward(inputs, mask)`` for :func:`mmmod.diagnostics.shapley`: the fused logits with
    the masked modalities' encoder features replaced (the fusion head sees the rest)."""
    def forward(inputs, mask):
        audio, visual = inputs
        fa, fv = model.audio_net(audio), model.visual_net(visual)
        return model.fusion(mask("audio", fa), mask("visual", fv))
    return forward


def batches(data, device, bs: int = 256):
    """The split's ``((audio, visual), labels)`` batches on ``device``, in order."""
    for i in range(0, len(data), bs):
        a, v, y = data.batch(torch.arange(i, min(i + bs, len(data))))
        yield (a.to(device), v.to(device)), y.to(device)


@torch.no_grad()
def contributions(model: AVClassifier, test, device) -> dict:
    """Exact Shapley values of the two modalities on the test split (eval mode)."""
    was = model.training
    model.eval()
    try:
        res = diagnostics.shapley(masked_forward(model), batches(test, device), model.names)
    finally:
        model.train(was)
    return res.to_dict()


def probes(model: AVClassifier, train, test, device, n_classes: int, steps: int) -> dict:
    encoders = {"audio": lambda x: model.audio_net(x[0]), "visual": lambda x: model.visual_net(x[1])}
    was = model.training
    model.eval()
    try:
        return diagnostics.probe_accuracy(encoders, batches(train, device), batches(test, device),
                                          n_classes=n_classes, steps=steps)
    finally:
        model.train(was)


def measure(model: AVClassifier, train, test, device, n_classes: int, steps: int,
            probe: dict | None = None) -> dict:
    """``{"shapley": ShapleyResult.to_dict(), "probe": {modality: acc}, "seconds": s}``;
    ``probe`` reuses accuracies measured already (the run's final probes)."""
    t0 = time.perf_counter()
    out = {"shapley": contributions(model, test, device),
           "probe": probe if probe is not None else probes(model, train, test, device,
                                                           n_classes, steps)}
    out["seconds"] = time.perf_counter() - t0
    return out


def report(runs: list[dict]) -> diagnostics.ImbalanceReport:
    """The report of each run's ``imbalance`` (first seed of each method): before and after."""
    entries, seen = {}, set()
    for r in runs:
        if not r.get("imbalance") or r["method"] in seen:
            continue
        seen.add(r["method"])
        for when in ("before", "after"):
            m = r["imbalance"][when]
            entries[f"{r['method']} {when}"] = {"shapley": m["shapley"], "probe": m["probe"]}
    return diagnostics.report(entries) if entries else None
