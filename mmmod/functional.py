"""Stateless entry points: scores, coefficients, in-place modulation, any backend.

Everything here is sync-free on accelerators except ``noise_rng="torch"`` (parity mode).
Inputs are validated from metadata only (shapes, dtypes, devices), so errors are raised before
any gradient is touched.
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch

from . import backends, methods, reference

NOISE_STD = ("raw", "scaled")
NOISE_RNG = ("philox", "torch")


def _name(names, m):
    return f"modality {names[m]!r}" if names else f"modality {m}"


def check_logits(logits: Sequence[torch.Tensor], labels: torch.Tensor,
                 names: Sequence[str] | None = None) -> None:
    """Shape/dtype/device checks that need no host sync."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D [B], got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if len(logits) == 0:
        raise ValueError("no logits given")
    for m, z in enumerate(logits):
        who = _name(names, m)
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"logits of {who} must be a tensor, got {type(z).__name__}")
        if z.dim() != 2:
            raise ValueError(f"logits of {who} must be 2-D [B, C], got shape {tuple(z.shape)}")
        if z.shape[0] != labels.shape[0]:
            raise ValueError(f"logits of {who} have batch size {z.shape[0]} but labels have "
                             f"{labels.shape[0]}")
        if z.shape[1] < 1:
            raise ValueError(f"logits of {who} have no classes (shape {tuple(z.shape)})")
        if not z.dtype.is_floating_point:
            raise TypeError(f"logits of {who} must be floating point, got {z.dtype}")
        if z.device != labels.device:
            raise ValueError(f"logits of {who} are on {z.device} but labels are on {labels.device}")


def check_labels_in_range(logits, labels, names=None) -> None:
    """Eager range check: free for CPU labels, a host sync on accelerators."""
    if labels.numel() == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    for m, z in enumerate(logits):
        if lo < 0 or hi >= z.shape[1]:
            raise ValueError(f"labels must lie in [0, {z.shape[1]}) for {_name(names, m)}, "
                             f"got values in [{lo}, {hi}]")


def scores(logits: Sequence[torch.Tensor], labels: torch.Tensor, backend: str = "auto",
           names: Sequence[str] | None = None) -> torch.Tensor:
    """Per-modality sum over the batch of softmax(z_m)[i, y_i]: float32 tensor [M].

    A label outside [0, C) gives NaN for the modality instead of reading out of bounds.
    """
    logits = list(logits)
    check_logits(logits, labels, names)
    return backends.get(backend, labels.device).scores(logits, labels)


def coefficients(scores: torch.Tensor, method: str, alpha: float | None = None,
                 beta_max: float = 2.0, backend: str = "auto",
                 state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Coefficients k [M] (float32) from scores [M] by a registered method (``mmmod.methods``).

    NaN everywhere if any score is NaN. A fused backend evaluates the rule natively when it
    knows it (``Method.native``); any other method's torch rule runs on the scores' device (no
    host sync). ``state`` is the method's state (see ``Method.init_state``), updated in place;
    ``None`` evaluates a stateful method from a fresh state.
    """
    m = methods.get(method)
    alpha, beta_max = m.check_hyperparameters(m.default_alpha if alpha is None else alpha,
                                              beta_max)
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a tensor, got {type(scores).__name__}")
    if scores.dim() != 1 or scores.shape[0] < 2:
        raise ValueError(f"scores must be 1-D with M >= 2 modalities, got shape {tuple(scores.shape)}")
    if not scores.dtype.is_floating_point:
        raise TypeError(f"scores must be floating point, got {scores.dtype}")
    impl = backends.get(backend, scores.device)
    if m.native is not None and m.native in impl.native_rules:
        return impl.coefficients(scores, m.native, alpha, beta_max)
    if state is None:
        state = m.init_state(scores.shape[0], scores.device)
    return m.coefficients(scores.float(), alpha=alpha, beta_max=beta_max, state=state)


#: gradient dtypes every backend modulates (fp8 and complex are refused up front, not mid-call)
GRAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _who(names, tensor_names, m, i):
    if tensor_names is not None:
        return f"parameter {tensor_names[m][i]!r} of {_name(names, m)}"
    return f"tensor {i} of {_name(names, m)}"


def self_overlaps(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (``expand()``, some ``as_strided`` views).

    Metadata only: with the dims of more than one element sorted by stride, each stride must
    step over everything the smaller-stride dims span. Layouts that interleave in stranger ways
    are reported as overlapping, which is safe: they are refused, never written wrongly."""
    if t.is_contiguous() or t.numel() == 0:  # the common case, decided in C++
        return False
    span = 0  # elements (minus one) covered by the dims seen so far
    for stride, size in sorted((s, n) for n, s in zip(t.shape, t.stride()) if n > 1):
        if stride <= span:
            return True
        span += (size - 1) * stride
    return False


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    lo = t.data_ptr()
    if t.is_contiguous():
        return lo, lo + t.numel() * t.element_size()
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return lo, lo + (last + 1) * t.element_size()


def _disjoint_blocks(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two views with overlapping byte ranges still share no element: blocks of one
    buffer with the same strides (e.g. column blocks of one matrix, ``ParamSlice``). Each is a
    box in the grid its strides define; when that grid maps to memory one-to-one the boxes (and
    so the views) are disjoint iff they are disjoint along some dim. Anything else: False."""
    es = a.element_size()
    if b.element_size() != es or a.shape == () or a.dim() != b.dim() or a.stride() != b.stride():
        return False
    if a.data_ptr() > b.data_ptr():
        a, b = b, a
    diff, rem = divmod(b.data_ptr() - a.data_ptr(), es)
    if rem:
        return False
    dims = sorted(range(a.dim()), key=lambda d: -a.stride(d))
    corner = {}
    for d in dims:  # b's first element as grid coordinates relative to a's
        s = a.stride(d)
        corner[d], diff = (diff // s, diff % s) if s > 0 else (0, diff)
    if diff:
        return False
    span = 0  # the grid spanning both boxes must map to memory one-to-one
    for d in reversed(dims):
        hi = max(a.shape[d], corner[d] + b.shape[d])
        if hi > 1 and a.stride(d) <= span:
            return False
        span += (hi - 1) * a.stride(d)
    return any(corner[d] >= a.shape[d] for d in dims)


def check_no_overlap(tensors, who) -> None:
    """Refuse two tensors sharing memory (the same tensor twice, overlapping views): fused
    kernels would race on them and a copy-back would drop one result, where the reference
    applies them in order. Metadata only (addresses and strides), sorted sweep over ranges."""
    if torch.compiler.is_compiling():
        return  # fake tensors have no addresses; dynamo guards on the aliasing of its inputs
    spans = []
    for key, t in tensors:
        d = t.device
        if d.type != "meta" and t.numel() > 0:
            spans.append((d.type, d.index or 0, *_byte_range(t), key))
    spans.sort()
    by_key = dict(tensors)
    open_: list = []
    for dev, idx, lo, hi, key in spans:
        open_ = [o for o in open_ if (o[0], o[1]) == (dev, idx) and o[3] > lo]
        for o in open_:
            if not _disjoint_blocks(by_key[o[4]], by_key[key]):
                raise _overlap_error(who, o[4], key)
        open_.append((dev, idx, lo, hi, key))


def _overlap_error(who, a, b) -> ValueError:
    return ValueError(f"{who(*a)} and {who(*b)} overlap in memory; each gradient element may "
                      f"be modulated once only (pass each tensor once, and disjoint views)")


#: ``mmmod._C.check_grads`` (csrc/common/checks.cpp) once looked up; False when the extension is not
#: loaded (then every check runs in Python)
_fast_check_grads = None
#: False switches the backends' whole-call fast paths off
_fast_modulate = True
_CPU = torch.device("cpu")


def _fast_checker():
    global _fast_check_grads
    if _fast_check_grads is None:
        from . import _ext
        _fast_check_grads = getattr(_ext.load("cpu")[0], "check_grads", None) or False
    return _fast_check_grads


def _fast_modulator(backend: str):
    """The whole-call fast path (``Backend.modulate_all``, e.g. the CPU extension's
    ``modulate_all_cpu``) of the backend ``backend`` resolves to for CPU data, else None (the
    general path then runs, and raises whatever it raises)."""
    if _fast_modulate is False:  # switched off (tests compare the two paths)
        return None
    try:
        impl = backends.get(backend, _CPU)
    except (RuntimeError, ValueError):
        return None
    return impl.modulate_all


def _check_coeffs(grads, coeffs):
    if not isinstance(coeffs, torch.Tensor):
        raise TypeError(f"coeffs must be a tensor, got {type(coeffs).__name__}")
    if coeffs.dim() != 1 or coeffs.shape[0] != len(grads):
        raise ValueError(f"coeffs must have shape [{len(grads)}] (one per modality), "
                         f"got {tuple(coeffs.shape)}")
    if not coeffs.dtype.is_floating_point:
        raise TypeError(f"coeffs must be floating point, got {coeffs.dtype}")


def check_grads(grads, names=None, tensor_names=None) -> None:
    """Every check on the gradients that can fail, for every modality and tensor, before
    anything is written: type, layout, dtype, writability (no self-overlapping or
    inference-mode gradient) and overlap between tensors. ``modulate_`` runs it first; the
    optimizer runs it before computing a step's coefficients. With the extension loaded, a C++
    pass over the metadata (``mmmod._C.check_grads``) clears the usual case; the Python code
    below stays the definition: it runs whenever that pass is unavailable or reports a
    possible problem, and raises every error."""
    grads = [list(t) for t in grads]
    if tensor_names is not None and [len(t) for t in tensor_names] != [len(t) for t in grads]:
        raise ValueError("tensor_names must name every tensor of grads")

    def who(m, i):
        return _who(names, tensor_names, m, i)

    # The same checks in C++ first (about 50x cheaper per tensor). It refuses nothing itself:
    # it answers all clear, or which byte ranges overlap (each pair decided below, exactly as
    # check_no_overlap decides it), or that some tensor may fail a check; the code below is then
    # the definition, and raises the first error with its message.
    fast = _fast_check_grads
    if fast is None:
        fast = _fast_checker()
    if fast and not torch.compiler.is_compiling():
        found = fast(grads)
        if found is None:
            return
        if isinstance(found, list):  # every tensor passed the per-tensor checks
            for a, b in found:
                if not _disjoint_blocks(grads[a[0]][a[1]], grads[b[0]][b[1]]):
                    raise _overlap_error(who, a, b)
            return

    # dynamo traces fake tensors: no addresses or inference flags to read (it guards on the
    # aliasing of its inputs itself); the layout and dtype checks still run
    compiling = torch.compiler.is_compiling()
    inference_mode = compiling or torch.is_inference_mode_enabled()
    present = []
    for m, tensors in enumerate(grads):
        for i, g in enumerate(tensors):
            if g is None:
                continue
            if not isinstance(g, torch.Tensor):
                raise TypeError(f"{who(m, i)} is a {type(g).__name__}, not a tensor")
            if g.is_sparse or g.layout != torch.strided:
                raise ValueError(f"{who(m, i)} has a non-dense gradient (layout {g.layout}); "
                                 f"mmmod modulates dense (strided) gradients only")
            if g.dtype not in GRAD_DTYPES:
                raise TypeError(f"{who(m, i)} has dtype {g.dtype}; expected a floating-point "
                                f"gradient of {', '.join(str(d) for d in GRAD_DTYPES)}")
            if not compiling and g.is_inference() and not inference_mode:
                raise ValueError(f"{who(m, i)} is an inference tensor (made under "
                                 f"torch.inference_mode) and cannot be modified in place here")
            if self_overlaps(g):
                raise ValueError(f"{who(m, i)} has a layout in which several elements share "
                                 f"memory (shape {tuple(g.shape)}, strides {g.stride()}, e.g. "
                                 f"from expand()); give it its own memory first "
                                 f"(param.grad = param.grad.clone())")
            present.append(((m, i), g))
    check_no_overlap(present, who)


def stream_offsets(tensors: Sequence, start: int = 0) -> list[int]:
    """First element of each tensor in its modality's noise stream: the running sum of the
    sizes before it, from ``start`` (``None`` entries take no room)."""
    out, run = [], int(start)
    for t in tensors:
        out.append(run)
        run += 0 if t is None else t.numel()
    return out


def modulate_(grads: Sequence[Sequence[torch.Tensor]], coeffs: torch.Tensor, *, noise: bool,
              noise_std: str = "raw", noise_rng: str = "philox", seed: int = 0,
              step: int | torch.Tensor = 0,
              backend: str = "auto", offsets: Sequence[Sequence[int]] | None = None,
              names: Sequence[str] | None = None,
              tensor_names: Sequence[Sequence[str]] | None = None,
              stds: Sequence[Sequence[torch.Tensor | None]] | None = None,
              _prechecked: bool = False) -> None:
    """Modulate every modality's gradients in place: g <- k_m g (+ sigma n when ``noise``).

    ``grads[m]`` lists modality m's tensors (``None`` entries are skipped); ``offsets[m][i]``
    is tensor i's first element in the modality's noise stream (default: running sum of
    sizes). If any coefficient is NaN the whole call leaves the gradients untouched, decided
    on the device (no sync). ``step`` (the Philox counter word) is an int or a 0-d integer
    tensor; a tensor is read on the device, so a CUDA graph captured around this call draws new
    noise at each replay when the tensor is advanced (``backend="auto"`` then prefers Triton to
    the CUDA extension, whose op takes the step as an integer).

    Every check that can fail runs for all modalities before the first write (so an error
    leaves every gradient as it was): types, layouts, dtypes, the backend for each device, and
    memory overlap, within a tensor (``expand()``) or between tensors. Non-contiguous tensors
    are modulated through a contiguous copy written back. ``tensor_names[m][i]`` names tensor i
    of modality m in those errors. ``stds[m][i]`` (a 0-d float64 tensor, or ``None``): the
    std tensor i's sigma is made of instead of its own; given for shards of larger tensors
    (``mmmod.optim.sharding``), such tensors skip the statistics pass: the backend's noise pass
    alone runs with ``reference.noise_sigma`` of that std (``mmmod::modulate_sigma_``).
    """
    reference.philox.check_step(step)
    if noise_std not in NOISE_STD:
        raise ValueError(f"noise_std must be one of {NOISE_STD}, got {noise_std!r}")
    if noise_rng not in NOISE_RNG:
        raise ValueError(f"noise_rng must be one of {NOISE_RNG}, got {noise_rng!r}")
    grads = [list(t) for t in grads]
    _check_coeffs(grads, coeffs)
    if not _prechecked:  # the optimizer has just run check_grads on these very tensors
        check_grads(grads, names, tensor_names)
    if offsets is None:
        # offsets only place noise in its stream: without noise any valid ones do, and zeros
        # cost no pass over the tensors' sizes
        offsets = ([stream_offsets(tensors) for tensors in grads] if noise
                   else [[0] * len(tensors) for tensors in grads])
    elif [len(o) for o in offsets] != [len(t) for t in grads]:
        raise ValueError("offsets must give one stream offset per tensor of grads")
    elif not _prechecked:  # the optimizer's own offsets are running sums
        for m, os_ in enumerate(offsets):
            for i, o in enumerate(os_):
                if not hasattr(o, "__index__") or operator.index(o) < 0:
                    raise ValueError(f"offsets[{m}][{i}] must be a non-negative int (a stream "
                                     f"position), got {o!r}")
    with torch.no_grad():
        if noise_rng == "torch":
            if bool(torch.isfinite(coeffs).all()):
                reference.modulate_torch_rng_([[g for g in t if g is not None] for t in grads],
                                              coeffs, noise=noise, noise_std=noise_std)
            return
        if stds is not None and [len(d) for d in stds] != [len(t) for t in grads]:
            raise ValueError("stds must give one std (or None) per tensor of grads")
        if (stds is None and not isinstance(step, torch.Tensor) and coeffs.device.type == "cpu"
                and not torch.compiler.is_compiling()):
            # the usual CPU call in one C++ call (csrc/cpu/modulate_all_cpu.cpp): the same kernels
            # and results, without a few tiny torch ops and one dispatch per modality; it
            # declines (writing nothing) whatever it does not handle, which then runs below
            fast = _fast_modulator(backend)
            if fast is not None and fast(grads, [list(o) for o in offsets], coeffs, noise,
                                         noise_std == "scaled", reference.philox.seed_int64(seed),
                                         int(step) & 0xFFFFFFFF):
                return
        plan = _plan_buckets(grads, offsets, backend, step, stds if noise else None)
        # a 0-d integer tensor step (the optimizer's capturable counter) stays on the device
        step_arg = step if isinstance(step, torch.Tensor) else int(step)
        ok = torch.isfinite(coeffs).all()
        k_eff = torch.where(ok, coeffs.float(), 1.0)
        gate = ok.float()
        # every row at once, and no copy for buckets on the coefficients' device: a few tiny
        # ops per call instead of three per bucket
        k_rows, k_device = k_eff.unbind(), coeffs.device
        for m, impl, device, ts, os_, sds in plan:  # nothing below can fail on the inputs now
            k_m, gate_m = k_rows[m], gate
            if device != k_device:
                k_m = k_m.to(device, non_blocking=True)
                gate_m = gate.to(device, non_blocking=True)
            # the usual case (every tensor contiguous) builds no second list
            work = (ts if all(map(_is_contiguous, ts))
                    else [g if g.is_contiguous() else g.contiguous() for g in ts])
            if sds is None:
                impl.modulate_bucket_(work, os_, k_m, gate_m, noise=noise, noise_std=noise_std,
                                      seed=int(seed), step=step_arg, modality=m)
            else:  # given stds (shards of larger tensors): the backend's noise pass alone
                sigma = reference.noise_sigma(sds, k_m, noise_std)
                impl.modulate_sigma_bucket_(work, os_, k_m, gate_m, sigma, seed=int(seed),
                                            step=step_arg, modality=m)
            if work is not ts:
                for g, w in zip(ts, work):
                    if w is not g:
                        g.copy_(w)


_is_contiguous = torch.Tensor.is_contiguous


def _plan_buckets(grads, offsets, backend, step, stds=None):
    """(modality, backend, device, tensors, offsets, stds or None) per bucket of one device,
    dtype and whether stds are given, every backend resolved (and so every availability error
    raised) before the first bucket runs. A bucket's given stds come as one float64 ``[T]``
    tensor on its device, each checked here, before any write."""
    plan = []
    for m, tensors in enumerate(grads):
        buckets: dict[tuple, tuple[list, list, list]] = {}
        if stds is None:
            # the common case, per tensor as little Python as possible (a step of a model with
            # thousands of tensors pays this loop once per tensor)
            for g, off in zip(tensors, offsets[m]):
                if g is None or not g.numel():
                    continue
                key = (g.device, g.dtype, False)
                b = buckets.get(key)
                if b is None:
                    b = buckets[key] = ([], [], None)
                b[0].append(g)
                b[1].append(off)
        else:
            for i, (g, off) in enumerate(zip(tensors, offsets[m])):
                if g is None or g.numel() == 0:
                    continue
                sd = stds[m][i]
                if sd is not None:
                    _check_given_std(sd, m, i)
                ts, os_, sds = buckets.setdefault((g.device, g.dtype, sd is not None),
                                                  ([], [], []))
                ts.append(g)
                os_.append(off)
                sds.append(sd)
        for (device, _, given), (ts, os_, sds) in buckets.items():
            impl = backends.get(backend, device, device_step=isinstance(step, torch.Tensor))
            if isinstance(step, torch.Tensor) and step.device.type != "cpu" and not impl.device_step:
                raise RuntimeError(f"mmmod backend {impl.name!r} takes the step as an integer; a "
                                   f"step counter on {step.device} needs backend 'triton' or "
                                   f"'torch'")
            if given:  # on the bucket's device already (the optimizer's): no copy
                sds = torch.stack([sd.detach().reshape(()).to(device, torch.float64,
                                                               non_blocking=True) for sd in sds])
            plan.append((m, impl, device, ts, os_, sds if given else None))
    return plan


def _check_given_std(sd, m: int, i: int) -> None:
    if not isinstance(sd, torch.Tensor):
        raise TypeError(f"stds[{m}][{i}] must be a tensor (the whole tensor's std) or None, "
                        f"got {type(sd).__name__}")
    if sd.numel() != 1 or not sd.dtype.is_floating_point:
        raise ValueError(f"stds[{m}][{i}] must hold one floating-point value (the whole "
                         f"tensor's std), got a {sd.dtype} tensor of shape {tuple(sd.shape)}")
