"""``backend="torch"``: the reference of every op (mmmod/reference/ops.py); every device,
never fused."""
from __future__ import annotations

from ..reference.ops import REFERENCES
from .base import Backend


class TorchBackend(Backend):
    name = "torch"
    devices = ("cpu", "cuda", "mps", "xpu", "meta")
    priority = 0  # the fallback of "auto", never its choice
    # the reference rules are the methods' own torch rules (mmmod.methods): nothing native
    native_rules = frozenset()
    kernels = REFERENCES

    def supports(self, device):
        return True
