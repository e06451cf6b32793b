"""The modality mask a diagnostics forward function receives.

``forward(inputs, mask)`` passes each modality's features through ``mask(name, features)``:
they come back unchanged when the modality is kept, else replaced -- by zeros
(``masking="zero"``) or by that modality's mean feature over the data set
(``masking="mean"``, measured in a first pass over the loader). A forward function that masks
its own way can read ``mask.kept(name)`` instead.
"""
from __future__ import annotations

from typing import Sequence

import torch

MASKINGS = ("zero", "mean")


class ModalityMask:
    """Which modalities a masked forward keeps, and how the others are replaced.

    ``keep``: one bool per modality, in ``names`` order. ``means``: per modality the mean
    feature (``masking="mean"``); ``record=True`` makes the mask sum the features it sees
    instead (the first pass that measures those means).
    """

    def __init__(self, names: Sequence[str], keep: Sequence[bool], masking: str = "zero",
                 means: dict | None = None, record: bool = False) -> None:
        self.names = list(names)
        self.keep = tuple(bool(k) for k in keep)
        self.masking = masking
        self._means = means or {}
        self._record = record
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.calls = 0

    def kept(self, name: str) -> bool:
        """Whether modality ``name`` is kept in this forward."""
        return self.keep[self._index(name)]

    def _index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"unknown modality {name!r}; the mask knows {self.names}") from None

    def __call__(self, name: str, features: torch.Tensor) -> torch.Tensor:
        """``features`` [B, ...] if ``name`` is kept, else its replacement."""
        i = self._index(name)
        self.calls += 1
        if not isinstance(features, torch.Tensor) or features.dim() < 1:
            raise TypeError(f"mask({name!r}, features): features must be a tensor [B, ...], "
                            f"got {type(features).__name__}")
        if self._record:
            s = features.detach().sum(0, dtype=torch.float64)
            self.sums[name] = s if name not in self.sums else self.sums[name] + s
            self.counts[name] = self.counts.get(name, 0) + features.shape[0]
        if self.keep[i]:
            return features
        if self.masking == "zero":
            return torch.zeros_like(features)
        mean = self._means[name]
        if mean.shape != features.shape[1:]:
            raise ValueError(f"mask({name!r}, features): features of shape "
                             f"{tuple(features.shape)} do not match the mean feature "
                             f"{tuple(mean.shape)} measured over the loader")
        return mean.to(features.dtype).expand_as(features)

    def __repr__(self) -> str:
        kept = [n for n, k in zip(self.names, self.keep) if k]
        return f"ModalityMask(kept={kept}, masking={self.masking!r})"
