"""The authors' MMPareto step as written (GeWu-Lab/MMPareto_ICML2024 at cc923ec,
``code/MMPareto.py`` lines 93-210 and ``code/min_norm_solvers.py``), transcribed for the parity
tests and the benchmark's contender: one retained backward pass per objective with every
encoder gradient cloned into dicts (plus their concatenation), ``F.cosine_similarity`` of the
concatenations, the solver's float32 dot products accumulated on the host (``.data.cpu()``),
a last backward pass of the summed loss, and the ``named_parameters()`` loop with
``torch.norm`` per tensor. Generalised from ``('audio', 'visual')`` to any modality names
(each encoder's parameters carry its name as a ``[_.]``-separated token, heads carry
``head``); with two modalities it is the code's loop.
"""
from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F

GAMMA = 1.5  # MMPareto.py line 178


def min_norm_element_from2(v1v1, v1v2, v2v2):
    """``MinNormSolver._min_norm_element_from2`` (min_norm_solvers.py lines 9-30)."""
    if v1v2 >= v1v1:
        return 0.999, v1v1
    if v1v2 >= v2v2:
        return 0.001, v2v2
    gamma = -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))
    cost = v2v2 + gamma * (v1v2 - v2v2)
    return gamma, cost


def find_min_norm_element(vecs):
    """``MinNormSolver.find_min_norm_element`` for two vectors (lines 92-129 with
    ``_min_norm_2d``, lines 32-58): float32 products summed per tensor and accumulated on the
    host, the tensor solution converted to numpy, ``sol = (c, 1 - c)``."""
    dps = {}
    for (i, j) in ((0, 1), (0, 0), (1, 1)):
        dps[(i, j)] = 0.0
        for k in range(len(vecs[i])):
            dps[(i, j)] += torch.mul(vecs[i][k], vecs[j][k]).sum().data.cpu()
    c, d = min_norm_element_from2(dps[(0, 0)], dps[(0, 1)], dps[(1, 1)])
    c = c.numpy() if torch.is_tensor(c) else c
    sol = np.zeros(2)
    sol[0] = c
    sol[1] = 1 - c
    return sol, d


def encoder_params(model, names):
    """``record_names_*`` (MMPareto.py lines 74-84): per modality the (name, param) pairs whose
    name contains the modality's name and not ``'head'``."""
    out = {n: [] for n in names}
    for pname, p in model.named_parameters():
        if "head" in pname:
            continue
        for n in names:
            if n in pname:
                out[n].append((pname, p))
                break
    return out


def authors_step(model, optimizer, losses_fn, names, gamma: float = GAMMA):
    """One step of the authors' loop. ``losses_fn()`` runs the forward and returns
    ``[L_mm, L_0, L_1, ...]`` (the modalities in ``names`` order). Returns the per-modality
    weights ``[(w_mm, w_m), ...]``."""
    record = encoder_params(model, names)
    optimizer.zero_grad()
    losses = losses_fn()
    all_loss = ["both"] + list(names)
    grads = {n: {} for n in names}
    for idx, loss_type in enumerate(all_loss):
        losses[idx].backward(retain_graph=True)
        for n in names:
            if loss_type not in ("both", n):
                continue
            grads[n][loss_type] = {}
            for tname, p in record[n]:
                grads[n][loss_type][tname] = p.grad.data.clone()
            grads[n][loss_type]["concat"] = torch.cat(
                [grads[n][loss_type][t].flatten() for t, _ in record[n]])
        optimizer.zero_grad()
    weights = {}
    for n in names:
        cos = F.cosine_similarity(grads[n]["both"]["concat"], grads[n][n]["concat"], dim=0)
        if cos > 0:
            weights[n] = [0.5, 0.5]
        else:
            weights[n], _ = find_min_norm_element([list(grads[n][t].values())
                                                   for t in ("both", n)])
    loss = losses[0]
    for extra in losses[1:]:
        loss = loss + extra
    loss.backward()
    for pname, p in model.named_parameters():
        if p.grad is None:
            continue
        layer = re.split("[_.]", str(pname))
        if "head" in layer:
            continue
        for n in names:
            if n in layer:
                k = weights[n]
                three_norm = torch.norm(p.grad.data.clone())
                new_grad = 2 * k[0] * grads[n]["both"][pname] + 2 * k[1] * grads[n][n][pname]
                new_norm = torch.norm(new_grad)
                diff = three_norm / new_norm
                if diff > 1:
                    p.grad = diff * new_grad * gamma
                else:
                    p.grad = new_grad * gamma
    optimizer.step()
    return [tuple(float(x) for x in weights[n]) for n in names]
