"""A few seeded optimizer steps whose results two revisions of mmmod must share.

Run by ``benchmarks.compare_revisions`` in each checkout (that checkout first on ``PYTHONPATH``)
before any timing: two small conv encoders and a concat-fusion head, fixed data, three
``observe`` + ``backward`` + ``step`` rounds per method, backend and ``fused`` setting, through the
public API only (``ModulatedOptimizer``, ``mmmod.fusion.concat_logits``), so that it runs on
revisions before and after internal redesigns. Saves every parameter and the inner optimizer's
momentum buffers after the last step, per configuration, to one ``torch.save`` file, plus
what the run used (mmmod's file, the CPU kernel table)::

    python benchmarks/revision_probe.py OUT.pt
"""
from __future__ import annotations

import sys

import torch

METHODS = ("none", "ogm", "ogm_ge", "mlb", "agm", "inforeg")
STEPS = 3


class _Encoder(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, 6, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(6, 8, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        return torch.relu(self.conv2(x)).mean(dim=(2, 3))


class _Model(torch.nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.audio_net, self.visual_net = _Encoder(1), _Encoder(3)
        self.head = torch.nn.Linear(16, classes)


def _data(classes: int, batch: int = 16):
    g = torch.Generator().manual_seed(1234)
    a = torch.randn(STEPS, batch, 1, 12, 10, generator=g)
    v = torch.randn(STEPS, batch, 3, 8, 8, generator=g)
    y = torch.randint(0, classes, (STEPS, batch), generator=g)
    return a, v, y


def run_one(method: str, backend: str, fused: bool, classes: int = 5) -> dict[str, torch.Tensor]:
    import mmmod
    torch.manual_seed(0)
    model = _Model(classes)
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    opt = mmmod.ModulatedOptimizer(inner, {"audio": model.audio_net, "visual": model.visual_net},
                                   method=method, backend=backend, fused=fused, seed=7)
    a, v, y = _data(classes)
    for i in range(STEPS):
        opt.zero_grad()
        f_a, f_v = model.audio_net(a[i]), model.visual_net(v[i])
        out = model.head(torch.cat([f_a, f_v], dim=1))
        opt.observe(dict(zip(("audio", "visual"), mmmod.fusion.concat_logits(model.head, [f_a, f_v]))),
                    y[i])
        torch.nn.functional.cross_entropy(out, y[i]).backward()
        opt.step()
    result = {f"param/{n}": p.detach().clone() for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, s in inner.state.items():
        if "momentum_buffer" in s:
            result[f"momentum/{names[id(p)]}"] = s["momentum_buffer"].clone()
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import mmmod
    try:
        import mmmod._C as ext
        kernels = ext.cpu_kernels()
    except Exception as e:  # noqa: BLE001 - an older build or none: recorded, not fatal
        kernels = f"unavailable: {e}"
    configs = {}
    errors = {}
    for method in METHODS:
        for backend, fused in (("torch", False), ("cpu", False), ("cpu", True)):
            key = f"{method}/{backend}{' fused' if fused else ''}"
            try:
                configs[key] = run_one(method, backend, fused)
            except Exception as e:  # noqa: BLE001 - one revision may refuse a combination
                errors[key] = f"{type(e).__name__}: {e}"
    torch.save({"mmmod_file": mmmod.__file__, "cpu_kernels": kernels, "torch": str(torch.__version__),
                "configs": configs, "errors": errors}, argv[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
