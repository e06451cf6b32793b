"""What a diagnostics loader yields: each batch split into the model's inputs and its labels."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

#: keys a dict batch may carry its labels under (the first one present is used)
LABEL_KEYS = ("label", "labels", "y", "target", "targets")


def split_batch(batch: Any, split: Callable | None = None) -> tuple[Any, torch.Tensor]:
    """``(inputs, labels)`` of one batch: ``split(batch)`` when given; else a tuple/list's last
    element is the labels (inputs: the first element of a pair, else the others as a tuple),
    a dict's labels are under one of :data:`LABEL_KEYS` (inputs: the rest of the dict).
    A batch without labels is a clear error."""
    if split is not None:
        out = split(batch)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(f"split(batch) must return (inputs, labels), got "
                            f"{type(out).__name__}")
        inputs, labels = out
    elif isinstance(batch, Mapping):
        key = next((k for k in LABEL_KEYS if k in batch), None)
        if key is None:
            raise ValueError(f"the loader yields batches without labels: a dict batch needs "
                             f"its class labels under one of {LABEL_KEYS} (keys "
                             f"{list(batch)}), or pass split=lambda batch: (inputs, labels)")
        inputs, labels = {k: v for k, v in batch.items() if k != key}, batch[key]
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        labels = batch[-1]
        inputs = batch[0] if len(batch) == 2 else tuple(batch[:-1])
    else:
        what = (f"a {type(batch).__name__} of shape {tuple(batch.shape)}"
                if isinstance(batch, torch.Tensor) else
                f"a {type(batch).__name__} of length {len(batch)}"
                if isinstance(batch, (tuple, list)) else type(batch).__name__)
        raise ValueError(f"the loader yields batches without labels ({what}): expected "
                         f"(inputs..., labels) tuples or dicts with a 'label' key, or pass "
                         f"split=lambda batch: (inputs, labels)")
    check_labels(labels)
    return inputs, labels


def check_labels(labels: Any) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"the loader's labels must be a tensor of class indices [B], got "
                        f"{type(labels).__name__} (does the loader yield labels last?)")
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype.is_complex \
            or labels.dtype == torch.bool:
        raise TypeError(f"the loader's labels must be a 1-D integer tensor of class indices, "
                        f"got {labels.dtype} of shape {tuple(labels.shape)} (does the loader "
                        f"yield labels last?)")
