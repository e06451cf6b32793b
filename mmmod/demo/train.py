"""Train audio-visual models with every method (baselines and each registered method) with the
same budget and seeds.

Everything a run measures comes back as plain Python numbers (JSON-ready):

* ``fused_acc``: multimodal test accuracy;
* ``probe_acc``: per modality, a linear probe (logistic regression) fitted on the frozen
  encoder's training-set features and scored on the test set -- the paper's unimodal measure,
  identical for every method and fusion;
* ``head_acc``: per modality, the model's unimodal head (trained on detached features except
  under MLB, whose objective trains them with the encoders);
* ``steps``: the optimizer's per-step history as recorded by :class:`mmmod.monitor.Recorder`
  (columns ``step``, ``epoch``, ``samples``, ``modulated``, ``skipped``, ``score/<modality>``
  -- the summed probability of the true class over the batch's ``samples`` --,
  ``coeff/<modality>``: the coefficient computed at that step, applied where ``modulated``;
  1 for the baseline), read on the host once at the end of the run, per-epoch accuracy
  curves, and wall time.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .. import losses
from .. import methods as registry
from ..diagnostics.probe import linear_probe
from ..monitor import Recorder, attach
from ..optim import ModulatedOptimizer
from . import imbalance
from .models import AVClassifier

# demo-only runs: no modulation, with the plain or the MLB multi-loss objective
DEMO_ONLY = {"baseline": "none", "multiloss": "none"}
# the demo's alphas: OGM-GE's CREMA-D setting (0.8); MLB's CREMA-D ResNet alpha (0.5); every
# other registered method runs with its registered default
DEMO_ALPHA = {"ogm_ge": 0.8, "ogm": 0.8, "mlb": 0.5}
# methods trained with the MLB objective CE(fused) + sum_m CE(z_m) (their heads give the scores)
JOINT_HEADS = ("mlb", "multiloss")
# methods whose authors add each modality's cross-entropy on the fusion head's own per-modality
# logits, with autograd: InfoReg (GeWu-Lab/InfoReg_CVPR2025 main.py @ ea7b9d5 lines 361-363,
# 378-380, 456-458: L(out) + L(out_a) + L(out_v), out_m the concat head's halves with bias / 2).
# Without a linear split (film, gated) the unimodal heads stand in, trained jointly.
SPLIT_LOSSES = ("inforeg",)


def objective(method: str) -> str:
    """The training loss the demo uses for ``method`` (shown in its table)."""
    if method in JOINT_HEADS:
        return "CE(fused) + CE(head_a) + CE(head_v)"
    if method in SPLIT_LOSSES:
        return "CE(fused) + CE(z_a) + CE(z_v)"
    if method in registry.names() and registry.get(method).combines_objectives:
        return "CE(fused), CE(head_a), CE(head_v) per objective"  # opt.backward(losses)
    return "CE(fused)"


def demo_methods() -> tuple[str, ...]:
    """Every run the demo can make: the baselines, then each registered method (registry order,
    so a method registered before the demo starts can be run by name)."""
    return tuple(DEMO_ONLY) + tuple(n for n in registry.names() if n != "none")


def library_method(method: str) -> str:
    return DEMO_ONLY.get(method, method)


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.01
    optimizer: str = "sgd"          # "sgd" (momentum 0.9, as the official code) or "adam"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    alpha: Optional[float] = None   # None: DEMO_ALPHA[method]
    beta_max: float = 2.0
    fusion: str = "concat"
    width: int = 16
    resnet18: bool = False
    backend: str = "auto"
    device: str = "cpu"
    modulation_starts: int = 0
    modulation_ends: Union[int, str, None] = "auto"  # "auto": OGM(-GE) first half, MLB all
    lr_decay_at: Optional[float] = 0.8  # lr x0.1 from this fraction of the epochs on (None: never)
    apply_to: str = "grad"
    param_filter: Optional[str] = None
    probe_steps: int = 100
    progress: bool = True
    log_every: int = 50             # loggers' flush interval in steps (one host read each)
    imbalance: bool = True          # Shapley contributions + probes before and after training
    signals: tuple = ()             # training-time signals in the history (mmmod.monitor.signals)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunResult:
    method: str
    seed: int
    fused_acc: float
    probe_acc: dict
    head_acc: dict
    wall_s: float
    curves: dict = field(default_factory=dict)
    steps: dict = field(default_factory=dict)
    alpha: Optional[float] = None
    imbalance: dict = field(default_factory=dict)  # {"before": ..., "after": ...} (demo.imbalance)
    objective: str = "CE(fused)"  # the training loss (objective(method))

    def to_dict(self) -> dict:
        return asdict(self)


def _batches(n: int, bs: int, g: Optional[torch.Generator]):
    idx = torch.randperm(n, generator=g) if g is not None else torch.arange(n)
    for i in range(0, n, bs):
        yield idx[i:i + bs]


def _modalities(model: AVClassifier, method: str):
    if method != "mlb":  # OGM(-GE): the encoders (the default filter keeps their conv weights)
        return {"audio": model.audio_net, "visual": model.visual_net}
    # MLB: encoder + unimodal head + the modality's block of a linear fusion head
    extra = model.fusion.modality_slices() if model.fusion.modality_slices is not None else [[], []]
    out = {}
    for name, enc, sl in zip(model.names, (model.audio_net, model.visual_net), extra):
        out[name] = [enc, model.heads[name]] + ([sl] if not isinstance(sl, list) else sl)
    return out


def modulation_window(method: str, cfg: TrainConfig) -> Optional[int]:
    """Last modulated epoch: ``"auto"`` is the first half of training for OGM/OGM-GE (the
    official CREMA-D script modulates epochs 0-50 of 100) and every epoch for MLB."""
    ends = cfg.modulation_ends
    if isinstance(ends, str):
        if ends.lower() == "none":
            return None
        if ends.lower() != "auto":
            return int(ends)
        if method in ("ogm", "ogm_ge"):
            return max(cfg.epochs // 2 - 1, cfg.modulation_starts)
        return None
    return ends


def split_logits_with_grad(model: AVClassifier, feats) -> list[torch.Tensor]:
    """The fusion head's per-modality logits (docs/semantics.md section 1) with autograd: the
    concat head's column blocks with bias / M, or each branch of the sum head with its bias / M
    (as mmmod.fusion.sum_logits)."""
    fusion = model.fusion
    if hasattr(fusion, "fc_out") and hasattr(fusion, "widths"):  # concat
        w, b, out, start = fusion.fc_out.weight, fusion.fc_out.bias, [], 0
        for f, width in zip(feats, fusion.widths):
            out.append(F.linear(f, w[:, start:start + width], None if b is None else b / len(feats)))
            start += width
        return out
    return [F.linear(f, lin.weight, None if lin.bias is None else lin.bias / len(feats))
            for f, lin in zip(feats, (fusion.fc_a, fusion.fc_v))]  # sum


def _make_optimizer(model, method: str, cfg: TrainConfig, seed: int) -> ModulatedOptimizer:
    if cfg.optimizer == "sgd":
        inner = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adam":
        inner = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {cfg.optimizer!r}")
    alpha = cfg.alpha if cfg.alpha is not None else DEMO_ALPHA.get(method)  # None: registry default
    return ModulatedOptimizer(inner, _modalities(model, method), method=library_method(method),
                              alpha=alpha, beta_max=cfg.beta_max,
                              modulation_starts=cfg.modulation_starts,
                              modulation_ends=modulation_window(method, cfg),
                              param_filter=cfg.param_filter, apply_to=cfg.apply_to,
                              backend=cfg.backend, seed=seed, signals=cfg.signals)


@torch.no_grad()
def features(model: AVClassifier, data, device, bs: int = 256):
    """Fused logits and both encoders' features over a split (eval mode)."""
    model.eval()
    outs, fas, fvs = [], [], []
    for idx in _batches(len(data), bs, None):
        a, v, _ = data.batch(idx)
        out, (fa, fv) = model(a.to(device), v.to(device))
        outs.append(out.cpu())
        fas.append(fa.cpu())
        fvs.append(fv.cpu())
    model.train()
    return torch.cat(outs), torch.cat(fas), torch.cat(fvs)


def evaluate(model: AVClassifier, data, device) -> dict:
    out, fa, fv = features(model, data, device)
    y = data.labels
    heads = model.head_logits([fa.to(device), fv.to(device)])
    res = {"fused": (out.argmax(1) == y).float().mean().item()}
    for n, z in zip(model.names, heads):
        res[f"{n}_head"] = (z.cpu().argmax(1) == y).float().mean().item()
    return res


def train_one(method: str, train, test, cfg: TrainConfig, seed: int = 0,
              n_classes: Optional[int] = None, desc: Optional[str] = None,
              loggers: Sequence = ()) -> RunResult:
    """Train one model with ``method`` and measure it (see the module docstring).

    ``loggers`` (e.g. :class:`mmmod.monitor.CSVLogger`) receive the per-step rows every
    ``cfg.log_every`` steps and are closed at the end of the run.
    """
    if method not in demo_methods():
        raise ValueError(f"unknown method {method!r}; expected one of {demo_methods()}")
    device = torch.device(cfg.device)
    n_classes = n_classes or int(max(train.labels.max(), test.labels.max())) + 1
    torch.manual_seed(seed)
    model = AVClassifier(n_classes, cfg.fusion, cfg.width, cfg.resnet18).to(device)
    opt = _make_optimizer(model, method, cfg, seed)
    before = (imbalance.measure(model, train, test, device, n_classes, cfg.probe_steps)
              if cfg.imbalance else None)
    # a method combining per-objective gradients (MMPareto) trains the unimodal heads jointly
    # and backpropagates the objectives through opt.backward
    combines = registry.get(opt.method).combines_objectives
    joint_heads = method in JOINT_HEADS or combines
    split_losses = method in SPLIT_LOSSES
    # methods fed per-epoch accuracies (MSLR): the demo has no validation split, so they get
    # the unimodal heads' accuracy over the previous epoch's training batches (stated in
    # docs/demo.md); counted on the device, read once per epoch
    wants_acc = "val_acc" in registry.get(opt.method).epoch_inputs
    head_hits = torch.zeros(2, device=device)
    head_seen = 0
    g = torch.Generator().manual_seed(seed)
    curves = {"epoch": [], "train_loss": [], "fused": [], "audio_head": [], "visual_head": []}
    n_steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    # the whole run stays in the optimizer's ring (a few KB); nothing is read on the host
    # until the end
    recorder = attach(opt, Recorder(opt.names, max(n_steps, 1)))
    for logger in loggers:
        recorder.add_logger(logger, every=cfg.log_every)
    bar = _bar(n_steps, desc or method, cfg.progress)
    decay_epoch = (None if cfg.lr_decay_at is None
                   else max(1, int(round(cfg.lr_decay_at * cfg.epochs))))
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        if wants_acc and head_seen:
            acc = (head_hits / head_seen).tolist()
            opt.set_epoch(epoch, val_acc=dict(zip(opt.names, acc)))
        else:
            opt.set_epoch(epoch)
        head_hits.zero_()
        head_seen = 0
        if decay_epoch is not None and epoch == decay_epoch:  # the same schedule for every method
            for group in opt.param_groups:
                group["lr"] *= 0.1
        loss_sum, seen = torch.zeros((), device=device), 0
        for idx in _batches(len(train), cfg.batch_size, g):
            a, v, y = (t.to(device) for t in train.batch(idx))
            out, feats = model(a, v)
            heads = model.head_logits(feats, detach=not (joint_heads or split_losses and not
                                                         model.has_split))
            if joint_heads:  # MLB objective: CE(fused) + sum_m CE(z_m); heads give the scores
                loss = losses.multi_loss(out, heads, y)
                z = [h.detach() for h in heads]
            elif split_losses:  # the authors' unimodal losses, through the head's own halves
                zg = split_logits_with_grad(model, feats) if model.has_split else heads
                loss = losses.multi_loss(out, zg, y)
                loss_heads = 0 if not model.has_split else \
                    sum(F.cross_entropy(h, y) for h in heads)  # detached heads: probes only
                z = [t.detach() for t in zg]
            else:  # CE(fused); the heads learn on detached features and change no encoder
                loss = F.cross_entropy(out, y)
                loss_heads = sum(F.cross_entropy(h, y) for h in heads)
                z = model.split_logits(feats) if model.has_split else [h.detach() for h in heads]
            opt.zero_grad()
            opt.observe({"audio": z[0], "visual": z[1]}, y)
            if combines:
                opt.backward({"multimodal": F.cross_entropy(out, y),
                              **{n: F.cross_entropy(h, y) for n, h in zip(opt.names, heads)}})
            else:
                (loss if joint_heads else loss + loss_heads).backward()  # heads: detached features
            opt.step()  # the recorder appends this step's scores and coefficients
            loss_sum += loss.detach() * y.numel()  # on the device: no host read per step
            if wants_acc:
                head_hits += torch.stack([(h.detach().argmax(1) == y).sum() for h in heads])
                head_seen += y.numel()
            seen += y.numel()
            bar.update(1)
        ev = evaluate(model, test, device)
        curves["epoch"].append(epoch + 1)
        curves["train_loss"].append(loss_sum.item() / seen)
        for key in ("fused", "audio_head", "visual_head"):
            curves[key].append(ev[key])
        bar.set_postfix(acc=f"{ev['fused']:.3f}", a=f"{ev['audio_head']:.2f}",
                        v=f"{ev['visual_head']:.2f}")
    train_s = time.perf_counter() - t0
    bar.close()
    recorder.close()  # delivers the loggers' last rows
    rows = recorder.history(format="rows")
    steps = {key: [r[key] for r in rows] for key in (rows[0] if rows else ())}
    _, tr_a, tr_v = features(model, train, device)
    _, te_a, te_v = features(model, test, device)
    probe = {"audio": linear_probe(tr_a, train.labels, te_a, test.labels, n_classes, cfg.probe_steps),
             "visual": linear_probe(tr_v, train.labels, te_v, test.labels, n_classes, cfg.probe_steps)}
    after = (imbalance.measure(model, train, test, device, n_classes, cfg.probe_steps, probe)
             if cfg.imbalance else None)
    final = curves["fused"][-1] if curves["fused"] else evaluate(model, test, device)["fused"]
    return RunResult(method=method, seed=seed, fused_acc=final, probe_acc=probe,
                     head_acc={"audio": curves["audio_head"][-1] if curves["audio_head"] else float("nan"),
                               "visual": curves["visual_head"][-1] if curves["visual_head"] else float("nan")},
                     wall_s=train_s, curves=curves, steps=steps,
                     alpha=None if method in ("baseline", "multiloss") else opt.alpha,
                     imbalance={"before": before, "after": after} if cfg.imbalance else {},
                     objective=objective(method))


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
