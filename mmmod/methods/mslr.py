"""MSLR (Yao & Mihalcea, Findings of ACL 2022, "Modality-specific Learning Rates for Effective
Multimodal Additive Late-fusion"), as kkontras/MLB implements it: once per epoch each
modality's coefficient becomes its latest validation accuracy over the mean of its previous
``keep_memory_epoch`` accuracies, times a fixed per-modality base rate; the same coefficient
scales every step of the epoch. Exact transcription: docs/semantics.md, section "MSLR".

    opt.set_epoch(epoch, val_acc={"audio": 0.61, "visual": 0.48})   # accuracies before the epoch
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from .base import Method, real_number, register


class MSLR(Method):
    name = "mslr"
    summary = "modality-specific learning rates: k = base * acc / mean(previous accs), per epoch"
    default_alpha = 0.0  # unused: the rule has no alpha
    default_filter = "all"  # the MLB code scales every parameter of each encoder
    epoch_inputs = ("val_acc",)
    hyperparameters = ()
    needs_scores = False

    def __init__(self, keep_memory_epoch: int = 5, base_rates: float | Sequence[float] = 1.0,
                 name: str | None = None):
        if isinstance(keep_memory_epoch, bool) or not isinstance(keep_memory_epoch, int) \
                or keep_memory_epoch < 1:
            raise ValueError(f"keep_memory_epoch must be an integer >= 1, got "
                             f"{keep_memory_epoch!r}")
        self.keep_memory_epoch = keep_memory_epoch
        if isinstance(base_rates, (int, float, torch.Tensor)) and not isinstance(base_rates, bool) \
                and (not isinstance(base_rates, torch.Tensor) or base_rates.numel() == 1):
            self.base_rates: float | tuple[float, ...] = real_number("base_rates", base_rates)
        else:
            self.base_rates = tuple(real_number(f"base_rates[{i}]", r)
                                    for i, r in enumerate(base_rates))
        if name is not None:
            self.name = name

    def init_state(self, num_modalities, device=None):
        if isinstance(self.base_rates, tuple):
            if len(self.base_rates) != num_modalities:
                raise ValueError(f"MSLR got {len(self.base_rates)} base rates for "
                                 f"{num_modalities} modalities")
            rates = list(self.base_rates)
        else:
            rates = [self.base_rates] * num_modalities
        return {"ratio": torch.ones(num_modalities, dtype=torch.float64, device=device),
                "base_rate": torch.tensor(rates, dtype=torch.float64, device=device),
                # one row per epoch that passed accuracies (epochs >= 1)
                "history": torch.zeros(0, num_modalities, dtype=torch.float64, device=device)}

    @torch.no_grad()
    def coefficients(self, scores, *, alpha, beta_max, state):
        k = (state["ratio"] * state["base_rate"]).float().to(scores.device)
        if k.shape != scores.shape:
            raise ValueError(f"MSLR state holds {k.shape[0]} modalities but the scores have "
                             f"{scores.shape[0]}")
        return self.nan_if_any_nan(scores, k)

    def on_epoch(self, state, epoch, *, names: Sequence[str], val_acc: Any = None, **inputs):
        if inputs:
            raise TypeError(f"method {self.name!r} takes only val_acc per epoch, got "
                            f"{sorted(inputs)}")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        names = list(names)
        acc = None if val_acc is None else self._accuracies(val_acc, names)
        if epoch < 1:  # the MLB code starts at epoch 1 (no validation result yet)
            return
        if acc is None:
            raise TypeError(f"method {self.name!r} needs the validation accuracy of every "
                            f"modality at each epoch >= 1: set_epoch({epoch}, val_acc="
                            f"{{{', '.join(repr(n) + ': ...' for n in names)}}})")
        history = state["history"]
        acc_t = torch.tensor(acc, dtype=torch.float64, device=history.device)
        keep = self.keep_memory_epoch
        if epoch > keep:
            # the last `keep` accuracies before this one, summed in order as numpy's mean
            # of <= 8 elements does, then divided
            last = history[-keep:]
            total = last[0].clone()
            for row in last[1:]:
                total = total + row
            state["ratio"].copy_(acc_t / (total / last.shape[0]))
        else:
            state["ratio"].fill_(1.0)
        state["history"] = torch.cat([history, acc_t[None]])

    @staticmethod
    def _accuracies(val_acc: Any, names: list[str]) -> list[float]:
        if isinstance(val_acc, Mapping):
            missing = [n for n in names if n not in val_acc]
            extra = [k for k in val_acc if k not in names]
            if missing or extra:
                raise ValueError(f"val_acc must have one accuracy per modality {names}; "
                                 f"missing {missing}, unknown {extra}")
            values = [val_acc[n] for n in names]
        elif isinstance(val_acc, (list, tuple)):
            if len(val_acc) != len(names):
                raise ValueError(f"val_acc has {len(val_acc)} entries for modalities {names}")
            values = list(val_acc)
        else:
            raise TypeError(f"val_acc must map modality names to accuracies, got "
                            f"{type(val_acc).__name__}")
        out = [real_number(f"val_acc[{n!r}]", v) for n, v in zip(names, values)]
        for n, v in zip(names, out):
            if v < 0 or not math.isfinite(v):
                raise ValueError(f"val_acc[{n!r}] must be a finite accuracy >= 0, got {v}")
        return out

    def log_values(self, state):
        return {"ratio": state["ratio"]}


register(MSLR())
