"""Exact Shapley contributions of each modality to a model's accuracy and loss.

The game: a coalition S of modalities is scored by one forward of the model with the other
modalities masked (:class:`ModalityMask`); v(S) is the accuracy (fraction of correct top-1
predictions) or the negated mean cross-entropy over the loader. Every one of the 2^M
coalitions is evaluated on every batch, so the values are exact:

    phi_i = sum over S not containing i of |S|! (M - |S| - 1)! / M! * (v(S + i) - v(S))

and they add up to v(all) - v(none) (efficiency). ``per_sample=True`` also returns each
sample's values for the same game on that sample alone (the sample-level modality valuation of
Wei et al., CVPR 2024; docs/diagnostics.md states how their code's game differs).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from .batches import split_batch
from .masking import MASKINGS, ModalityMask

#: exact values cost 2^M masked forwards per batch; beyond this many modalities, refuse
MAX_MODALITIES = 6


def coalitions(m: int) -> list[tuple[bool, ...]]:
    """Every subset of ``m`` modalities as a keep-tuple; subset ``s`` keeps modality ``i``
    when bit ``i`` of ``s`` is set (0 = none kept, ``2^m - 1`` = all)."""
    return [tuple(bool(s >> i & 1) for i in range(m)) for s in range(1 << m)]


def shapley_matrix(m: int) -> torch.Tensor:
    """``W`` [2^m, m] (float64) with ``phi = v @ W`` for coalition values ``v`` [..., 2^m]."""
    w = torch.zeros((1 << m, m), dtype=torch.float64)
    fact = math.factorial
    for s in range(1 << m):
        size = bin(s).count("1")
        for i in range(m):
            if s >> i & 1:   # s = T + i: weight of T, |T| = size - 1
                w[s, i] += fact(size - 1) * fact(m - size) / fact(m)
            else:            # s = T, i not in T
                w[s, i] -= fact(size) * fact(m - size - 1) / fact(m)
    return w


@dataclass
class ShapleyResult:
    """Exact contributions per modality. ``accuracy``: Shapley values of the accuracy game
    (fractions; they sum to ``full_accuracy - empty_accuracy``); ``loss``: of the negated mean
    loss game (the loss reduction each modality brings; they sum to ``empty_loss -
    full_loss``). ``coalitions``: each coalition's accuracy and mean loss, keyed by the tuple
    of kept modality names. ``per_sample`` (optional): ``{"accuracy": [N, M], "loss": [N, M]}``
    CPU tensors, this process's samples in loader order."""
    names: list
    masking: str
    samples: int
    accuracy: dict
    loss: dict
    coalitions: dict
    per_sample: dict | None = field(default=None, repr=False)

    @property
    def full_accuracy(self) -> float:
        return self.coalitions[tuple(self.names)]["accuracy"]

    @property
    def empty_accuracy(self) -> float:
        return self.coalitions[()]["accuracy"]

    @property
    def full_loss(self) -> float:
        return self.coalitions[tuple(self.names)]["loss"]

    @property
    def empty_loss(self) -> float:
        return self.coalitions[()]["loss"]

    def shares(self, of: str = "accuracy") -> dict:
        """Each modality's fraction of the total contribution (``of``: "accuracy" or "loss");
        NaN when the contributions do not sum to a positive total (the model with every
        modality is no better than with none: there is nothing to share)."""
        if of not in ("accuracy", "loss"):
            raise ValueError(f"of must be 'accuracy' or 'loss', got {of!r}")
        phi = self.accuracy if of == "accuracy" else self.loss
        total = sum(phi.values())
        return {n: (v / total if total > 0 else float("nan")) for n, v in phi.items()}

    def to_dict(self) -> dict:
        """JSON-ready (the per-sample tensors are left out)."""
        return {"names": list(self.names), "masking": self.masking, "samples": self.samples,
                "accuracy": dict(self.accuracy), "loss": dict(self.loss),
                "shares": self.shares(),
                "coalitions": {"+".join(k) or "none": v for k, v in self.coalitions.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "ShapleyResult":
        co = {(() if k == "none" else tuple(k.split("+"))): v for k, v in d["coalitions"].items()}
        return cls(list(d["names"]), d["masking"], d["samples"], dict(d["accuracy"]),
                   dict(d["loss"]), co)


def _per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="none")


@torch.no_grad()
def shapley(forward: Callable[[Any, ModalityMask], torch.Tensor], loader: Iterable,
            names: Sequence[str], *, masking: str = "zero", per_sample: bool = False,
            loss_fn: Callable | None = None, split: Callable | None = None,
            process_group: Any = None, device: torch.device | str | None = None
            ) -> ShapleyResult:
    """Exact Shapley contributions of each modality in ``names`` over ``loader``.

    ``forward(inputs, mask)`` returns the fused logits [B, C] of a batch's inputs with the
    masked modalities' features replaced: it passes each modality's features through
    ``mask(name, features)`` (see :class:`ModalityMask`). ``loader`` yields batches with their
    labels (``(inputs..., labels)`` tuples, dicts with a ``"label"`` key, or anything
    ``split(batch) -> (inputs, labels)`` takes apart); it is iterated once, twice for
    ``masking="mean"`` (the first pass measures each modality's mean feature). ``loss_fn``:
    per-sample losses ``(logits, labels) -> [B]``, default cross-entropy.

    Under data parallelism (``torch.distributed`` initialised, or ``process_group``) each rank
    evaluates its own shard of the data and the sums are all-reduced, so every rank gets the
    values of the whole data set; ``per_sample`` holds this rank's samples. Put the model in
    eval mode first (batch-norm statistics). Cost: ``2^M`` forwards per batch.
    """
    names = [str(n) for n in names]
    m = len(names)
    if m < 1 or len(set(names)) != m:
        raise ValueError(f"names must be distinct modality names, got {names}")
    if m > MAX_MODALITIES:
        raise ValueError(f"exact Shapley values over {m} modalities need 2^{m} = {1 << m} "
                         f"masked forwards per batch; mmmod computes them for up to "
                         f"{MAX_MODALITIES} modalities (group modalities, or evaluate a subset)")
    if masking not in MASKINGS:
        raise ValueError(f"masking must be one of {MASKINGS}, got {masking!r}")
    if not callable(forward):
        raise TypeError(f"forward must be callable as forward(inputs, mask), got "
                        f"{type(forward).__name__}")
    loss_fn = loss_fn or _per_sample_loss
    group = _group(process_group)
    subsets = coalitions(m)
    means = _mean_features(forward, loader, names, split, group) if masking == "mean" else None
    sums = None   # [2^M, 2] float64: correct predictions, summed losses
    count = 0
    rows: list[torch.Tensor] = []  # per batch [B, 2^M, 2] on the CPU (per_sample)
    for batch in loader:
        inputs, labels = split_batch(batch, split)
        per = []
        for keep in subsets:
            mask = ModalityMask(names, keep, masking, means)
            logits = forward(inputs, mask)
            _check_logits(logits, labels)
            lab = labels.to(logits.device)
            correct = (logits.argmax(1) == lab).to(torch.float64)
            loss = loss_fn(logits, lab).to(torch.float64)
            if loss.shape != lab.shape:
                raise ValueError(f"loss_fn must return per-sample losses of shape "
                                 f"{tuple(lab.shape)}, got {tuple(loss.shape)}")
            per.append(torch.stack([correct, loss], 1))
        per = torch.stack(per, 1)  # [B, 2^M, 2]
        part = per.sum(0)
        sums = part if sums is None else sums + part.to(sums.device)
        count += labels.shape[0]
        if per_sample:
            rows.append(per.cpu())
    if sums is None:
        raise ValueError("the loader yielded no batches")
    if device is not None:
        sums = sums.to(device)
    sums, count = _all_reduce(sums, count, group)
    mean = (sums / count).cpu()           # [2^M, 2]: accuracy, mean loss
    w = shapley_matrix(m)
    phi_acc = mean[:, 0] @ w
    phi_loss = -mean[:, 1] @ w
    table = {tuple(n for n, k in zip(names, keep) if k): {"accuracy": float(mean[s, 0]),
                                                          "loss": float(mean[s, 1])}
             for s, keep in enumerate(subsets)}
    result = ShapleyResult(names, masking, count, dict(zip(names, phi_acc.tolist())),
                           dict(zip(names, phi_loss.tolist())), table)
    if per_sample:
        per = torch.cat(rows)
        result.per_sample = {"accuracy": per[:, :, 0] @ w, "loss": -per[:, :, 1] @ w}
    if bool((mean == mean[-1]).all()):
        warnings.warn(f"shapley: every coalition of {names} gave the same accuracy and loss, "
                      f"so every contribution is 0: does forward(inputs, mask) pass each "
                      f"modality's features through mask(name, features)? (mask was called "
                      f"{mask.calls} times in the last forward)", RuntimeWarning, stacklevel=2)
    return result


def _check_logits(logits: Any, labels: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise TypeError(f"forward(inputs, mask) must return fused logits [B, C], got "
                        f"{type(logits).__name__}"
                        + (f" of shape {tuple(logits.shape)}"
                           if isinstance(logits, torch.Tensor) else ""))
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"forward returned {logits.shape[0]} rows of logits for a batch of "
                         f"{labels.shape[0]} labels")


def _mean_features(forward, loader, names, split, group) -> dict:
    """Each modality's mean feature over the loader: a pass with every modality kept whose
    mask sums what it sees (all-reduced over the group's ranks)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for batch in loader:
        inputs, labels = split_batch(batch, split)
        mask = ModalityMask(names, [True] * len(names), "mean", record=True)
        forward(inputs, mask)
        for n in mask.sums:
            sums[n] = mask.sums[n] if n not in sums else sums[n] + mask.sums[n]
            counts[n] = counts.get(n, 0) + mask.counts[n]
    missing = [n for n in names if n not in sums]
    if missing:
        raise ValueError(f"masking='mean' needs forward(inputs, mask) to pass each modality's "
                         f"features through mask(name, features); modality {missing[0]!r} "
                         f"never was")
    out = {}
    for n in names:
        s, c = _all_reduce(sums[n], counts[n], group)
        out[n] = (s / c)
    return out


def _group(process_group):
    import torch.distributed as dist
    if process_group is not None:
        return process_group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def _all_reduce(t: torch.Tensor, count: int, group) -> tuple[torch.Tensor, int]:
    """``t`` and ``count`` summed over the group's ranks (one collective; float64)."""
    if group is None:
        return t, count
    import torch.distributed as dist
    from ..optim.distributed import collective_device
    dev = collective_device(group)
    flat = torch.cat([t.reshape(-1).to(dev, torch.float64),
                      torch.tensor([float(count)], dtype=torch.float64, device=dev)])
    dist.all_reduce(flat, group=group)
    return flat[:-1].reshape(t.shape).to(t.device), int(flat[-1].item())
