"""AGM (Li et al., ICCV 2023, "Boosting Multi-modal Model Performance with Adaptive Gradient
Modulation"): per step, each modality's mean clamped negative log-likelihood on its unimodal
response; a running mean of those scores over all steps so far; and

    r_m   = exp(mean_{j != m} s_j - s_m)            (how far m leads now)
    eta_m = exp(mean_{j != m} sbar_j - sbar_m)      (how far it led on average so far)
    k_m   = exp(alpha * min(eta_m - r_m, cap))

so a modality that leads more than it used to is slowed and one that leads less is sped up.
The unimodal responses are the per-modality logits given to ``observe()``: the authors obtain
them from Shapley-style masked forward passes, which are the model's business and can be
passed as those logits. Exact transcription and deviations: docs/semantics.md, section "AGM".
"""
from __future__ import annotations

from typing import Sequence

import torch

from .base import Method, real_number, register

#: the official loops' cap of eta - r: two modalities (run/CREMAD_main.py), three or more
#: (run/URFunny_main.py, the one three-modality loop)
OFFICIAL_CAP_2 = 10.0
OFFICIAL_CAP_MANY = 7.0
#: the most the default ``agm`` multiplies a gradient by (docs/semantics.md section 8, "Safe
#: default"): the official rule reaches exp(alpha * 10), tamed there by a learning rate of 1e-5
#: and a gradient-norm clip that mmmod's optimizer does not apply
DEFAULT_K_MAX = 2.0
#: AGM's probability floor: a true-label probability below it scores -log(1e-8)
PROB_FLOOR = 1e-8


@torch.no_grad()
def agm_batch_scores(logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """sum_i -log(max(softmax(z_m)[i, y_i], 1e-8)) per modality, float32 [M], no host sync.

    The probability is formed first and then logged, as the authors' code does (so the floor
    applies to the float32 probability, not to the log-likelihood); a label outside [0, C)
    makes the modality's sum NaN."""
    y = labels.reshape(-1).to(torch.int64)
    out = []
    for z in logits:
        z = z.detach().float()
        valid = (y >= 0) & (y < z.shape[1])
        yc = torch.where(valid, y, torch.zeros_like(y))
        p = torch.exp(z.gather(1, yc[:, None]).squeeze(1) - torch.logsumexp(z, dim=1))
        nll = -torch.log(torch.clamp_min(p, PROB_FLOOR))
        out.append(torch.where(valid, nll, torch.full_like(nll, float("nan"))).sum())
    return torch.stack(out) if out else torch.zeros(0)


def _others_mean(x: torch.Tensor) -> torch.Tensor:
    """mean_{j != m} x_j for every m, others summed in index order (exactly x_other for M = 2)."""
    m = x.shape[0]
    return torch.stack([sum(x[j] for j in range(m) if j != i) for i in range(m)]) / (m - 1)


class AGM(Method):
    name = "agm"
    summary = "adaptive gradient modulation: k = min(exp(alpha min(eta - r, cap)), 2) from running NLL means"
    default_alpha = 1.5  # kkontras/MLB configs/CREMA_D/release/vit/AGM.json
    # BalanceBenchmark scales every encoder tensor except 1-D ones (biases, norms)
    default_filter = "matrix"
    hyperparameters = ("alpha",)
    score = "nll"
    score_reduction = "mean"

    def __init__(self, cap: float | None = None, k_max: float | None = DEFAULT_K_MAX,
                 name: str | None = None):
        # cap None: the official loops' cap, 10 with two modalities (lihong2303/AGM
        # run/CREMAD_main.py lines 151-152), 7 with three (run/URFunny_main.py, coeff_a/v/t);
        # k_max None: k unbounded above, as the authors' rule
        self.cap = None if cap is None else real_number("cap", cap)
        self.k_max = None if k_max is None else real_number("k_max", k_max)
        if self.k_max is not None and not self.k_max >= 1.0:
            raise ValueError(f"k_max must be >= 1 (it bounds how much AGM amplifies a gradient), "
                             f"got {self.k_max}")
        if name is not None:
            self.name = name

    def cap_for(self, num_modalities: int) -> float:
        """The cap of ``min(eta - r, cap)`` with M modalities."""
        if self.cap is not None:
            return self.cap
        return OFFICIAL_CAP_2 if num_modalities == 2 else OFFICIAL_CAP_MANY

    def batch_scores(self, logits, labels):
        return agm_batch_scores(logits, labels)

    def init_state(self, num_modalities, device=None):
        return {"score_mean": torch.zeros(num_modalities, dtype=torch.float64, device=device),
                "steps": torch.zeros((), dtype=torch.float64, device=device)}

    @torch.no_grad()
    def coefficients(self, scores, *, alpha, beta_max, state):
        if scores.shape[0] < 2:
            raise ValueError(f"AGM needs M >= 2 modalities, got scores of shape "
                             f"{tuple(scores.shape)}")
        mean, steps = state["score_mean"], state["steps"]
        if mean.shape != scores.shape:
            raise ValueError(f"AGM state holds {mean.shape[0]} modalities but the scores have "
                             f"{scores.shape[0]}")
        # the authors compute in Python floats: float64 from here on
        s = scores.to(mean.device, torch.float64)
        r = torch.exp(_others_mean(s) - s)
        eta = torch.exp(_others_mean(mean) - mean)  # running means before this step's update
        k = torch.exp(alpha * torch.clamp_max(eta - r, self.cap_for(s.shape[0])))
        if self.k_max is not None:
            k = torch.clamp_max(k, self.k_max)
        # running mean over every step so far: sbar <- sbar (t - 1) / t + s / t; a step with a
        # non-finite score (skipped by the modulation) leaves it and the count untouched
        ok = torch.isfinite(s).all()
        t = steps + ok.to(torch.float64)
        tc = torch.clamp_min(t, 1.0)
        mean.copy_(torch.where(ok, mean * (tc - 1) / tc + s / tc, mean))
        steps.copy_(t)
        return self.nan_if_any_nan(scores, k.float())

    def log_values(self, state):
        return {"score_mean": state["score_mean"]}


class AGMOfficial(AGM):
    """The authors' rule unchanged: the official cap, k unbounded above, their default alpha."""
    name = "agm_official"
    summary = "AGM as the official loops: k = exp(alpha min(eta - r, cap)), unbounded above"
    default_alpha = 1.0  # lihong2303/AGM utils/config.py, --alpha default

    def __init__(self, cap: float | None = None, name: str | None = None):
        super().__init__(cap=cap, k_max=None, name=name)


register(AGM())
register(AGMOfficial())
