"""The coefficient rules the fused kernels evaluate natively: the one list of them and their codes.

The ``coefficients`` op takes a rule as its integer code (``int(NativeRule.OGM)``); the C++ and
CUDA kernels mirror the values in csrc/common/native_rules.h (``mmmod._C.native_rules()`` exports
them, and a test compares), the Triton epilogue's ``METHOD`` constant takes the same codes. Every
other list of native rules (``Method.native``'s allowed values, ``Backend.native_rules``, the
method names the op-level helpers accept) derives from :class:`NativeRule`.

A leaf module: it imports nothing from mmmod (and not torch).
"""
from __future__ import annotations

import enum


class NativeRule(enum.IntEnum):
    """A coefficient rule with a fused kernel (docs/semantics.md section 3); the value is its code."""

    #: k = 1 for every modality (no modulation)
    NONE = 0
    #: OGM / OGM-GE: damp the leading modality, k = 1 - tanh(alpha rho)
    OGM = 1
    #: MLB: k = 1 + (beta - 1) tanh(alpha (r - 1))
    MLB = 2

    @property
    def label(self) -> str:
        """The rule's name as methods and backends spell it (``"ogm"``)."""
        return self.name.lower()


#: other method names that select a rule (OGM-GE's coefficients are OGM's)
ALIASES: dict[str, NativeRule] = {"ogm_ge": NativeRule.OGM}

#: the rules a method may name as ``Method.native`` and a fused backend evaluates in its kernels
#: (NONE is no method's rule: the kernels' identity)
MODULATING: frozenset[NativeRule] = frozenset(r for r in NativeRule if r is not NativeRule.NONE)

#: every method name that selects a native rule, by code (labels, each followed by its aliases)
METHODS: tuple[str, ...] = tuple(name for r in NativeRule
                                 for name in (r.label, *(a for a, t in ALIASES.items() if t is r)))


def rule_of(method) -> NativeRule:
    """The rule a method name (``"ogm"``, ``"ogm_ge"``, ...), a :class:`NativeRule` or a code selects.

    Raises ValueError naming the value and what is accepted."""
    if isinstance(method, NativeRule):
        return method
    if isinstance(method, str):
        for r in NativeRule:
            if method == r.label:
                return r
        if method in ALIASES:
            return ALIASES[method]
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if isinstance(method, int) and not isinstance(method, bool):
        try:
            return NativeRule(method)
        except ValueError:
            codes = ", ".join(f"{int(r)} ({r.label})" for r in NativeRule)
            raise ValueError(f"unknown native rule code {method}; expected one of {codes}") from None
    raise TypeError(f"a coefficient rule must be a method name or a NativeRule code, got "
                    f"{type(method).__name__} {method!r}")
