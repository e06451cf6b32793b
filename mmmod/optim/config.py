"""Every ModulatedOptimizer argument validated by name, at construction and again for what a
checkpoint brings (so a bad value is refused where it enters, never at a later step)."""
from __future__ import annotations

import inspect
import numbers
import os
from typing import Any, Callable, Mapping

import torch

from .. import backends, filters, functional, methods

APPLY_TO = ("grad", "update")
#: torch.manual_seed's range; a negative seed means the same 64 bits as seed + 2**64
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)
#: settings that change what is computed or on which tensors: a checkpoint must match them
STRUCTURAL = ("method", "apply_to", "noise_std", "noise_rng")
#: scalar hyperparameters a checkpoint restores (as torch restores a group's lr)
SCALARS = ("alpha", "beta_max", "modulation_starts", "modulation_ends")


def choice(what: str, value: Any, options) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be one of {tuple(options)}, got {type(value).__name__} "
                        f"{value!r}")
    if value not in options:
        raise ValueError(f"unknown {what} {value!r}; expected one of {tuple(options)}")
    return value


def flag(what: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False, got {type(value).__name__} {value!r}")
    return value


def integer(what: str, value: Any, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    v = int(value)
    if minimum is not None and v < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {v}")
    return v


def seed(value: Any) -> int:
    """The seed as torch.manual_seed takes it (an int in [-2**63, 2**64)), stored as its 64
    bits (what the Philox key uses), so no two accepted seeds alias each other silently."""
    lo, hi = SEED_RANGE
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"seed must be an int in [-2**63, 2**64) as for torch.manual_seed, got "
                        f"{type(value).__name__} {value!r}")
    if not lo <= int(value) <= hi:
        raise ValueError(f"seed must lie in [-2**63, 2**64) as for torch.manual_seed, got {value}")
    return int(value) & hi


def window(starts: Any, ends: Any) -> tuple[int, int | None]:
    s = integer("modulation_starts", starts, minimum=0)
    e = None if ends is None else integer("modulation_ends", ends)
    if e is not None and e < s:
        raise ValueError(f"modulation_ends ({e}) < modulation_starts ({s})")
    return s, e


def method(name: Any) -> methods.Method:
    if not isinstance(name, str):
        raise TypeError(f"method must be one of {methods.names()}, got {type(name).__name__} "
                        f"{name!r}")
    return methods.get(name)


def param_filter(value: Any, m: methods.Method) -> tuple[Any, Callable]:
    """(the filter as given or the method's default, the predicate)."""
    if value is None:
        value = m.default_filter
    if not callable(value) and not isinstance(value, str):
        raise TypeError(f"param_filter must be one of {tuple(filters.FILTERS)} or a callable "
                        f"(name, param) -> bool, got {type(value).__name__} {value!r}")
    return value, filters.resolve(value)


def modalities(value: Any) -> list[tuple[Any, Any]]:
    """(name, source) pairs of a dict-like mapping or ``nn.ModuleDict``. Names are used as
    given (in ``observe``, ``scores``, ``state_dict``), so they must be str or int keys."""
    if isinstance(value, torch.nn.ModuleDict):
        items = list(value.items())
    elif isinstance(value, Mapping):
        items = list(value.items())
    else:
        raise TypeError(f"modalities must be an ordered mapping name -> module/parameters (a "
                        f"dict or nn.ModuleDict), got {type(value).__name__}")
    if len(items) < 2:
        raise ValueError("modalities must be an ordered mapping of at least two "
                         "name -> module/parameters entries")
    for name, _ in items:
        if isinstance(name, bool) or not isinstance(name, (str, int)):
            raise TypeError(f"modality names must be str or int (they are used as given in "
                            f"observe(), scores and state_dict), got {type(name).__name__} "
                            f"{name!r}")
    return items


def noise_options(noise_std: Any, noise_rng: Any, capturable: bool) -> tuple[str, str]:
    choice("noise_std", noise_std, functional.NOISE_STD)
    choice("noise_rng", noise_rng, functional.NOISE_RNG)
    if capturable and noise_rng == "torch":
        raise ValueError("capturable=True needs noise_rng='philox': the 'torch' noise mode "
                         "reads each gradient's std on the host (parity only)")
    return noise_std, noise_rng


def resolve_backends(backend: str, devices, capturable: bool) -> list[str]:
    """The backend each parameter device will use, resolved now so that an unavailable one is
    reported when the optimizer is built, not at the first step."""
    choice("backend", backend, backends.BACKENDS)
    out = []
    for device in devices:
        try:
            out.append(backends.get(backend, device, device_step=capturable).name)
        except RuntimeError as e:
            raise RuntimeError(f"backend={backend!r} cannot modulate the parameters on "
                               f"{device}: {e}") from None
    return out


def ordered_logits(logits: Any, names: list) -> list:
    """``observe``'s logits in modality order, from a mapping keyed by the modality names (as
    given at construction) or a sequence in that order."""
    if isinstance(logits, Mapping):
        unknown = [n for n in logits if n not in names]
        if unknown:
            raise KeyError(f"observe() got logits for unknown modality {unknown[0]!r}; "
                           f"modalities are {names}")
        missing = [n for n in names if n not in logits]
        if missing:
            raise KeyError(f"observe() is missing logits for modality {missing[0]!r}")
        return [logits[n] for n in names]
    zs = list(logits)
    if len(zs) != len(names):
        raise ValueError(f"observe() got {len(zs)} logits for {len(names)} modalities {names}")
    return zs


def closure_required(optimizer) -> bool:
    """Whether the inner ``step`` has a ``closure`` argument without default (LBFGS)."""
    try:
        p = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return p is not None and p.default is inspect.Parameter.empty


#: values of MMMOD_CPU_KERNELS the compiled CPU kernels accept (csrc/cpu/cpu_kernels.cpp)
CPU_KERNELS = ("", "auto", "scalar", "avx2", "avx512")


def cpu_environment(environ: Mapping[str, str] | None = None) -> None:
    """Refuse, by name, an environment the CPU extension would refuse (or misread) at its op
    call: run before a step writes anything, since the extension reads it on every call."""
    env = os.environ if environ is None else environ
    kernels = env.get("MMMOD_CPU_KERNELS")
    if kernels is not None and kernels not in CPU_KERNELS:
        raise ValueError(f"MMMOD_CPU_KERNELS={kernels} is not a CPU kernel table: expected auto, "
                         f"scalar, avx2 or avx512")
    window = env.get("MMMOD_CPU_WINDOW")
    if window and not (window.isascii() and window.isdigit() and len(window) <= 18):
        raise ValueError(f"MMMOD_CPU_WINDOW={window} is not a plain non-negative integer of at most "
                         f"18 digits (elements per OGM-GE cache window; 0: the whole bucket at once)")


def epoch_not_before(last: int | None, epoch: int) -> None:
    """``set_epoch`` never goes back: the method's per-epoch work (MSLR's accuracy history,
    InfoReg's snapshot and traces) has run for ``last`` and would run again."""
    if last is not None and epoch < last:
        raise ValueError(f"set_epoch({epoch}) after epoch {last}: epochs must not go backwards "
                         f"(the per-epoch work of epoch {last} has run); to restart, load a "
                         f"checkpoint or build a new optimizer")
