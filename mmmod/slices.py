"""A contiguous block of one parameter along one dimension, modulated as its own tensor.

MLB scales "that modality's slice of a linear fusion head": with concat fusion the columns of
the fusion weight that read modality m's features belong to modality m. Put a ``ParamSlice``
in the ``modalities`` mapping next to the encoder (``mmmod.fusion.concat_slices`` builds them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class ParamSlice:
    param: torch.Tensor
    dim: int
    start: int
    stop: int

    def __post_init__(self):
        size = self.param.shape[self.dim] if self.param.dim() > self.dim else 0
        if not 0 <= self.start < self.stop <= size:
            raise ValueError(f"ParamSlice [{self.start}:{self.stop}] along dim {self.dim} is out "
                             f"of range for a parameter of shape {tuple(self.param.shape)}")

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """The same block of ``t`` (the parameter itself or its gradient)."""
        return t.narrow(self.dim, self.start, self.stop - self.start)

    @property
    def shape(self) -> torch.Size:
        return self.view(self.param.detach()).shape

    def numel(self) -> int:
        return self.view(self.param.detach()).numel()

    def overlaps(self, other: "ParamSlice") -> bool:
        return other.param is self.param and (other.dim != self.dim or (
            self.start < other.stop and other.start < self.stop))
