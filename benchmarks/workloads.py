"""Tensor-size mixes of real encoder pairs, with gradients, for the modulation benchmarks.

* ``resnet18_conv``: two ResNet-18 encoders as in the OGM-GE code (audio: 1 input channel,
  visual: 3), conv weights only (the official selection): 40 tensors, 22.3 M elements.
* ``resnet18_all``: the same encoders, every tensor (conv weights, BatchNorm weights and biases).
* ``vit_b16``: two ViT-B/16-sized encoders (audio: 1 input channel), every tensor of 2+ dims
  (BalanceBenchmark's selection): ~170 M elements. Big: skipped on CPU unless asked for.
* ``many_small``: two modalities of 1000 small tensors each (16 .. 16 K elements), ~6.5 M
  elements: launch- and Python-overhead bound.

The ResNet-18 is written out here (torchvision-free) exactly as the OGM-GE backbone: 7x7 stem,
four stages of two BasicBlocks, 1x1 downsample convs, BatchNorm, no fully connected layer.
Models are wrapped as ``root.module.<modality>_net`` so parameter names look like the official
code's under DataParallel (``module.audio_net.layer1.0.conv1.weight``), which its name test
``name.split('.')[1]`` needs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

MODALITIES2 = ("audio", "visual")


# ---- ResNet-18 (OGM-GE backbone) -----------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """ResNet-18 feature extractor; visual input [B, 3, T, H, W] or [B, 3, H, W]."""

    def __init__(self, in_channels: int, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.out_dim = 8 * width

    def forward(self, x):
        frames = None
        if x.dim() == 5:  # [B, C, T, H, W]: frames folded into the batch, pooled after
            b, c, frames, h, w = x.shape
            x = x.permute(0, 2, 1, 3, 4).reshape(b * frames, c, h, w)
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        if frames is not None:
            x = x.view(-1, frames, x.shape[1]).mean(1)
        return x


class AVClassifier(nn.Module):
    """The OGM-GE audio-visual model: two ResNet-18s, concat fusion, with a ``module`` wrapper."""

    def __init__(self, n_classes: int = 6, width: int = 64) -> None:
        super().__init__()
        self.audio_net = ResNet18(1, width)
        self.visual_net = ResNet18(3, width)
        self.fusion = nn.Linear(16 * width, n_classes)

    def forward(self, audio, visual):
        fa, fv = self.audio_net(audio), self.visual_net(visual)
        out = self.fusion(torch.cat((fa, fv), 1))
        w = self.fusion.weight
        # per-modality logits of concat fusion (docs/semantics.md section 1): z_m = f_m W[:, cols(m)]^T + b / 2
        d = fa.shape[1]
        z_a = fa @ w[:, :d].t() + self.fusion.bias / 2
        z_v = fv @ w[:, d:].t() + self.fusion.bias / 2
        return out, z_a, z_v


class Wrapped(nn.Module):
    """``root.module.<x>``: names as under DataParallel (what the official name test needs)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner

    def forward(self, *a, **k):
        return self.module(*a, **k)


# ---- shape-only encoders -------------------------------------------------------------------
class ShapeEncoder(nn.Module):
    """Parameters of given shapes (uninitialised storage), named like a real encoder."""

    def __init__(self, shapes: list[tuple[str, tuple[int, ...]]], device=None) -> None:
        super().__init__()
        self._names = []
        for name, shape in shapes:
            key = name.replace(".", "_")
            self.register_parameter(key, nn.Parameter(torch.empty(shape, device=device)))
            self._names.append(key)


def vit_b16_shapes(in_channels: int, img: int = 224, patch: int = 16, dim: int = 768,
                   depth: int = 12, mlp: int = 3072) -> list[tuple[str, tuple[int, ...]]]:
    tokens = (img // patch) ** 2 + 1
    s = [("patch_embed.proj.weight", (dim, in_channels, patch, patch)), ("patch_embed.proj.bias", (dim,)),
         ("cls_token", (1, 1, dim)), ("pos_embed", (1, tokens, dim))]
    for i in range(depth):
        b = f"blocks.{i}."
        s += [(b + "norm1.weight", (dim,)), (b + "norm1.bias", (dim,)),
              (b + "attn.qkv.weight", (3 * dim, dim)), (b + "attn.qkv.bias", (3 * dim,)),
              (b + "attn.proj.weight", (dim, dim)), (b + "attn.proj.bias", (dim,)),
              (b + "norm2.weight", (dim,)), (b + "norm2.bias", (dim,)),
              (b + "mlp.fc1.weight", (mlp, dim)), (b + "mlp.fc1.bias", (mlp,)),
              (b + "mlp.fc2.weight", (dim, mlp)), (b + "mlp.fc2.bias", (dim,))]
    return s + [("norm.weight", (dim,)), ("norm.bias", (dim,))]


def many_small_shapes(n: int, seed: int) -> list[tuple[str, tuple[int, ...]]]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.exp(torch.empty(n).uniform_(math.log(16), math.log(16384), generator=g))
    out = []
    for i, s in enumerate(sizes.tolist()):
        rows = 2 ** int(torch.randint(0, 5, (1,), generator=g))
        out.append((f"p{i}.weight", (rows, max(1, int(s) // rows))))
    return out


def scaled_vit_shapes(in_channels: int, scale: int, depth: int = 2) -> list:
    return vit_b16_shapes(in_channels, img=32, patch=8, dim=768 // scale, depth=depth,
                          mlp=3072 // scale)


# ---- workloads -----------------------------------------------------------------------------
@dataclass
class Workload:
    name: str
    description: str
    select: str                        # "conv" (4-D), "matrix" (2+ dims) or "all"
    build_model: Callable[[torch.device], nn.Module]
    big: bool = False                  # skipped on CPU unless asked for

    def dim_test(self) -> Callable[[int], bool]:
        """The paper loop's tensor test, ``len(parms.grad.size()) == 4`` and its variants."""
        return {"conv": lambda d: d == 4, "matrix": lambda d: d >= 2, "all": lambda d: True}[self.select]


@dataclass
class Instance:
    """A built workload: model, the selected parameters per modality, gradients, restore."""
    workload: Workload
    model: nn.Module
    names: tuple[str, ...]
    params: list[list[nn.Parameter]]
    masters: list[torch.Tensor] = field(default_factory=list)

    @property
    def grads(self) -> list[list[torch.Tensor]]:
        return [[p.grad for p in ps] for ps in self.params]

    @property
    def numel(self) -> int:
        return sum(p.numel() for ps in self.params for p in ps)

    @property
    def ntensors(self) -> int:
        return sum(len(ps) for ps in self.params)

    def reset(self) -> None:
        """Restore every selected gradient to its original values (in place)."""
        for ps, master in zip(self.params, self.masters):
            views = _split(master, ps)
            torch._foreach_copy_([p.grad for p in ps], views)


def _split(flat: torch.Tensor, ps) -> list[torch.Tensor]:
    out, off = [], 0
    for p in ps:
        out.append(flat[off:off + p.numel()].view_as(p))
        off += p.numel()
    return out


def build(workload: Workload, device: torch.device, seed: int = 0,
          grad_scale: float = 1e-3) -> Instance:
    """Build the model on ``device`` and give every parameter a seeded gradient."""
    model = workload.build_model(device)
    test = workload.dim_test()
    names = tuple(n for n in MODALITIES2)
    params = []
    g = torch.Generator(device="cpu").manual_seed(seed)
    for m in names:
        enc = getattr(model.module, f"{m}_net")
        params.append([p for p in enc.parameters() if test(p.dim())])
    # every parameter of the model gets a gradient (the paper's loop reads p.grad of all)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    masters = []
    for ps in params:
        n = sum(p.numel() for p in ps)
        flat = (torch.randn(n, generator=g) * grad_scale).to(device)
        # per-tensor scales so the statistics differ between tensors
        views = _split(flat, ps)
        for i, v in enumerate(views):
            v.mul_(0.5 + (i % 7) / 4)
        masters.append(flat)
    inst = Instance(workload, model, names, params, masters)
    inst.reset()
    return inst


def _resnet_pair(device):
    return Wrapped(AVClassifier()).to(device)


def _vit_pair(device, shapes=vit_b16_shapes):
    inner = nn.Module()
    inner.audio_net = ShapeEncoder(shapes(1), device)
    inner.visual_net = ShapeEncoder(shapes(3), device)
    return Wrapped(inner)


def _many_small(device, n=1000):
    inner = nn.Module()
    inner.audio_net = ShapeEncoder(many_small_shapes(n, 1), device)
    inner.visual_net = ShapeEncoder(many_small_shapes(n, 2), device)
    return Wrapped(inner)


WORKLOADS = {
    "resnet18_conv": Workload("resnet18_conv", "2x ResNet-18, conv weights (official OGM-GE)",
                              "conv", _resnet_pair),
    "resnet18_all": Workload("resnet18_all", "2x ResNet-18, every tensor", "all", _resnet_pair),
    "vit_b16": Workload("vit_b16", "2x ViT-B/16, every tensor of 2+ dims", "matrix", _vit_pair,
                        big=True),
    "many_small": Workload("many_small", "2x 1000 small tensors (16..16K elements)", "all",
                           _many_small),
}

# tiny stand-ins for --smoke: same structure, a few thousand elements
SMOKE = {
    "tiny_conv": Workload("tiny_conv", "smoke: tiny conv encoders", "conv",
                          lambda d: _vit_pair(d, lambda c: [("conv1.weight", (8, c, 3, 3)),
                                                            ("conv2.weight", (8, 8, 3, 3)),
                                                            ("bn.weight", (8,)),
                                                            ("down.weight", (8, c, 1, 1))])),
    "tiny_vit": Workload("tiny_vit", "smoke: a 1-block ViT at 1/16 width", "matrix",
                         lambda d: _vit_pair(d, lambda c: scaled_vit_shapes(c, 16, 1))),
    "tiny_many": Workload("tiny_many", "smoke: 2x 30 small tensors", "all",
                          lambda d: _many_small(d, 30)),
}


def conv_counts() -> dict[str, int]:
    """Number and elements of the conv weights of the ResNet-18 pair (expect 40, 22.3 M)."""
    model = _resnet_pair(torch.device("meta"))
    conv = [p for n, p in model.named_parameters() if p.dim() == 4]
    return {"tensors": len(conv), "elements": sum(p.numel() for p in conv),
            "all_tensors": sum(1 for _ in model.module.audio_net.parameters())
            + sum(1 for _ in model.module.visual_net.parameters())}


if __name__ == "__main__":
    print(conv_counts())
    for w in WORKLOADS.values():
        m = w.build_model(torch.device("meta"))
        test = w.dim_test()
        ps = [p for mod in MODALITIES2 for p in getattr(m.module, f"{mod}_net").parameters()
              if test(p.dim())]
        print(f"{w.name:15s} {len(ps):5d} tensors {sum(p.numel() for p in ps) / 1e6:8.2f} M elements")
