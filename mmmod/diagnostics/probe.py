"""Linear-probe accuracy of frozen encoders: the papers' unimodal measure.

A probe is a logistic regression (one linear layer, softmax cross-entropy + ``weight_decay *
||W||^2``) fitted by full-batch L-BFGS (strong Wolfe line search) on the frozen encoder's
training-set features, standardised with the training mean and std, and scored on the test
set. The recipe is fixed and the initial weights are drawn from ``seed``, so a probe is
reproducible; the problem is convex, so the result hardly depends on the seed at all.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F

from .batches import split_batch


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, n_classes: int | None = None, steps: int = 100,
                 weight_decay: float = 1e-3, seed: int = 0) -> float:
    """Test accuracy of a logistic regression fitted (L-BFGS, ``steps`` iterations) on
    features ``train_x`` [N, D] with labels ``train_y`` [N]."""
    if train_x.dim() != 2 or test_x.dim() != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"probe features must be [N, D] with the same D, got train "
                         f"{tuple(train_x.shape)} and test {tuple(test_x.shape)}")
    if train_x.shape[0] != train_y.shape[0] or test_x.shape[0] != test_y.shape[0]:
        raise ValueError("probe features and labels differ in length")
    if n_classes is None:
        n_classes = int(max(train_y.max(), test_y.max())) + 1
    train_x, test_x = train_x.float(), test_x.float()
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    xtr, xte = (train_x - mu) / sd, (test_x - mu) / sd
    g = torch.Generator(device="cpu").manual_seed(seed)
    bound = 1.0 / xtr.shape[1] ** 0.5  # nn.Linear's default init range, from our generator
    weight = ((torch.rand(n_classes, xtr.shape[1], generator=g) * 2 - 1) * bound).to(xtr.device)
    bias = ((torch.rand(n_classes, generator=g) * 2 - 1) * bound).to(xtr.device)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe")
    ytr = train_y.to(xtr.device)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ weight.T + bias, ytr) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        pred = (xte @ weight.T + bias).argmax(1)
        return (pred == test_y.to(pred.device)).float().mean().item()


@torch.no_grad()
def encoder_features(encoders: Mapping[str, Callable], loader: Iterable,
                     split: Callable | None = None) -> tuple[dict, torch.Tensor]:
    """Every encoder's features over ``loader`` (``{name: [N, D]}`` on the CPU, flattened
    after the batch dim) and the labels [N]. ``encoders[name](inputs)`` maps a batch's inputs
    to that modality's features; modules among them are put in eval mode for the pass."""
    modes = {n: e.training for n, e in encoders.items() if isinstance(e, torch.nn.Module)}
    for n in modes:
        encoders[n].eval()
    feats: dict[str, list] = {n: [] for n in encoders}
    labels = []
    try:
        for batch in loader:
            inputs, y = split_batch(batch, split)
            for n, enc in encoders.items():
                feats[n].append(enc(inputs).detach().flatten(1).cpu())
            labels.append(y.cpu())
    finally:
        for n, was in modes.items():
            encoders[n].train(was)
    if not labels:
        raise ValueError("the loader yielded no batches")
    return {n: torch.cat(f) for n, f in feats.items()}, torch.cat(labels)


def probe_accuracy(encoders: Mapping[str, Callable], train_loader: Iterable,
                   test_loader: Iterable, *, n_classes: int | None = None, steps: int = 100,
                   weight_decay: float = 1e-3, seed: int = 0,
                   split: Callable | None = None) -> dict[str, float]:
    """Per modality, the test accuracy of a linear probe on the frozen encoder (see the
    module docstring for the recipe). ``encoders``: ``{name: callable(inputs) -> features}``."""
    if not isinstance(encoders, Mapping) or not encoders:
        raise TypeError("encoders must be a non-empty mapping name -> callable(inputs) -> "
                        "features")
    tr, ytr = encoder_features(encoders, train_loader, split)
    te, yte = encoder_features(encoders, test_loader, split)
    return {n: linear_probe(tr[n], ytr, te[n], yte, n_classes, steps, weight_decay, seed)
            for n in encoders}


