"""Which parameter tensors of a modality get modulated (docs/semantics.md section 4)."""
from __future__ import annotations

from typing import Callable, Union

import torch

ParamFilter = Union[str, Callable[[str, torch.nn.Parameter], bool]]

FILTERS = {
    "conv": lambda name, p: p.dim() == 4,   # official OGM-GE: conv weights only
    "matrix": lambda name, p: p.dim() >= 2,  # BalanceBenchmark: every tensor of 2+ dims
    "all": lambda name, p: True,             # MLB: every tensor of the encoder
}
DEFAULT_FILTER = {"ogm": "conv", "ogm_ge": "conv", "mlb": "all", "none": "all"}


def resolve(param_filter: ParamFilter) -> Callable[[str, torch.nn.Parameter], bool]:
    if callable(param_filter):
        return param_filter
    try:
        return FILTERS[param_filter]
    except KeyError:
        raise ValueError(f"unknown param_filter {param_filter!r}; expected one of "
                         f"{tuple(FILTERS)} or a callable (name, param) -> bool") from None
