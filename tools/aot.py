"""Ahead-of-time compilation of every launch the Triton backend makes (no GPU needed).

The Triton interpreter runs the kernels on CPU but does not compile them: it accepts code the
compiler rejects (a plain int global in @jit code), never contracts to FMA, uses numpy's
transcendentals and never specialises arguments. This module closes that gap:

1. :func:`record_launches` hooks ``mmmod.backends.triton.launch`` (the single place
   every launcher goes through) and records each launch's kernel, arguments and options,
   optionally without running it. :func:`backend_launches` drives the backend over a matrix of
   inputs (dtypes, M, int and tensor step, flat and table buckets, noise and scale, every
   coefficient method) so the recorded launches are exactly what the launchers produce.
2. :func:`specialize` turns a recorded launch into the (signature, constexprs, attrs, options)
   that ``JITFunction.run`` would compile on a GPU, with Triton's own binder
   (``create_function_from_signature`` + ``_pack_args``): i32/i64 by value, the value-1 and
   divisible-by-16 specialisations, pointer alignment, annotations and ``do_not_specialize``.
3. :func:`compile_launch` compiles one of them with ``triton.compile`` for a
   ``GPUTarget("cuda", cc, 32)``, runs the ptxas Triton ships with ``-v`` on the PTX
   (registers, spills) and counts the PTX instructions docs/triton.md makes claims about.

``python -m tools.aot`` (from the source tree) regenerates the table of docs/triton.md (``--markdown``);
tests/kernels/test_triton_aot.py runs it into an empty ``TRITON_CACHE_DIR`` and checks the results.
Must run without ``TRITON_INTERPRET=1`` (the kernels must be JITFunctions).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

from mmmod.backends.triton.kernels import load as _load_kernels

_load_kernels()  # mmmod.kernels: installed, or mapped from the source tree's kernels/

#: Compute capabilities compiled by default (all that Triton 3.7's NVIDIA backend offers
#: among current data-centre and consumer parts).
TARGETS = (80, 90, 100, 120)
#: The capability whose full launch matrix is compiled; the others get a representative subset.
FULL_TARGET = 90

# PTX instructions whose presence docs/triton.md discusses
PTX_COUNTS = {
    "fma_f32": r"\bfma\.rn(?:\.ftz)?\.f32\b",
    "fma_f64": r"\bfma\.rn\.f64\b",
    # a multiply or add without a rounding modifier: ptxas may contract it into an FMA
    "contractible_f32": r"\b(?:add|sub|mul)(?:\.ftz)?\.f32\b",
    "sqrt_approx": r"\bsqrt\.approx\b",
    "sqrt_rn": r"\bsqrt\.rn\b",
    "div_approx": r"\b(?:div\.full|div\.approx|rcp\.approx)\.(?:ftz\.)?f32\b",
    "lg2_approx": r"\blg2\.approx\b",
    "ex2_approx": r"\bex2\.approx\b",
    "sin_approx": r"\bsin\.approx\b",
    "cos_approx": r"\bcos\.approx\b",
    "ld_v4": r"\bld\.global(?:\.\w+)*\.v4\b",
    "mul_wide_32": r"\bmul\.wide\.[su]32\b",
}


# ------------------------------------------------------------------------------ recording
def _describe(value):
    """A JSON-able description of a launch argument (enough to rebuild an equivalent one)."""
    import triton.language as tl
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."),
                "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, tuple):
        return {"tuple": [_describe(v) for v in value]}
    if isinstance(value, tl.dtype):
        return {"tl_dtype": value.name}
    if value is None or isinstance(value, (bool, int, float)):
        return value
    raise TypeError(f"cannot describe a launch argument of type {type(value).__name__}")


def _rebuild(desc):
    """An argument equivalent to the described one for specialisation (dtype, alignment)."""
    import triton.language as tl
    if isinstance(desc, dict):
        if "tensor" in desc:
            t = torch.empty(8, dtype=getattr(torch, desc["tensor"]))
            return t if desc["aligned"] else t[1:]  # one element in: not 16-byte aligned
        if "tuple" in desc:
            return tuple(_rebuild(d) for d in desc["tuple"])
        if "tl_dtype" in desc:
            return tl.dtype(desc["tl_dtype"])
    return desc


def _kernel_path(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return f"{fn.__module__}:{fn.__name__}"


def _kernel_from_path(path: str):
    mod, name = path.split(":")
    return getattr(importlib.import_module(mod), name)


@contextlib.contextmanager
def record_launches(execute: bool = False):
    """Record every launch of the Triton backend as ``{"kernel", "grid", "args", "kwargs"}``
    descriptions (JSON-able); with ``execute=False`` the launches are not run."""
    from mmmod.backends.triton import launch
    launches = []

    def hook(kernel, grid, args, kwargs):
        launches.append({"kernel": _kernel_path(kernel), "grid": list(grid),
                         "args": [_describe(a) for a in args],
                         "kwargs": {k: _describe(v) for k, v in kwargs.items()}})
        return execute

    previous = launch.hook
    launch.hook = hook
    try:
        yield launches
    finally:
        launch.hook = previous


def backend_launches():
    """Drive a default TritonBackend over the input matrix with launches recorded, not run.

    Nothing is executed, so this works on CPU without the interpreter; the arguments the
    launchers build (dtypes, alignments, constexprs, options) are the ones a GPU run gets.
    """
    from mmmod.backends.triton import TritonBackend, combine, proximal
    from mmmod.backends.triton.table import make_flat_grads
    from mmmod.reference.native_rules import NativeRule

    be = TritonBackend()
    f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
    dtypes = (f32, f16, bf16, f64)
    one = torch.ones(1)
    with record_launches(execute=False) as launches:
        # scores, fused scores + coefficients (every method code), coefficients from scores
        # (each modality is its own static-loop iteration: every dtype appears at every M)
        y = torch.zeros(32, dtype=torch.int64)
        for m in (2, 3, 4):
            for first in range(0, 4, m):
                zs = [torch.empty(32, 10, dtype=dtypes[(first + i) % 4]) for i in range(m)]
                be.scores(zs, y)
            zs = [torch.empty(32, 10) for _ in range(m)]
            for method in (rule.label for rule in NativeRule):
                be.scores_and_coefficients(zs, y, method, 0.5, 2.0)
                be.coefficients(torch.ones(m), method, 0.5, 2.0)
        # other tile shapes, strides and label dtypes
        y32 = torch.zeros(3, dtype=torch.int32)
        be.scores([torch.empty(3, 1000), torch.empty(3, 1000, dtype=f16)], y32)
        be.scores([torch.empty(3, 32000, dtype=bf16), torch.empty(3, 32005)[:, 2:32002]],
                  torch.zeros(3, dtype=torch.int64))
        be.scores([torch.empty(1, 7), torch.empty(1, 7)], torch.zeros(1, dtype=torch.int64))
        be.scores_and_coefficients([torch.empty(40, 5), torch.empty(5, 40, dtype=bf16).t(),
                                    torch.empty(40, 9, dtype=f16)[:, 1:6]],
                                   torch.zeros(40, dtype=torch.int64), "ogm", 0.5)
        # modulation: table and flat buckets, noise (int and tensor step) and scale
        for dt in dtypes:
            ts = [torch.empty(s, dtype=dt) for s in (7, 5000, 3)]
            offs = [0, 7, 5007]
            be.modulate_bucket_(ts, offs, one, one, noise=False, noise_std="raw", seed=0,
                                step=0, modality=0)
            params = [torch.nn.Parameter(torch.empty(s, dtype=dt)) for s in (7, 5000, 3)]
            make_flat_grads(params)
            be.modulate_bucket_([p.grad for p in params], offs, one, one, noise=False,
                                noise_std="raw", seed=0, step=0, modality=0)
            be.modulate_bucket_(ts, offs, one, one, noise=True, noise_std="raw", seed=2 ** 40,
                                step=2 ** 33, modality=1)
            be.modulate_bucket_(ts, offs, one, one, noise=True, noise_std="scaled", seed=-5,
                                step=torch.tensor(3), modality=2)
            # stream offsets that are multiples of 4: the aligned noise variant
            be.modulate_bucket_([torch.empty(s, dtype=dt) for s in (8, 5000, 4)], [0, 8, 5008],
                                one, one, noise=True, noise_std="raw", seed=3, step=1,
                                modality=0)
            # the noise kernel fed a given sigma (sharded OGM-GE, modulate_sigma_bucket_): int
            # and tensor step, an empty tensor keeping its row, the aligned variant
            be.modulate_sigma_bucket_(ts + [torch.empty(0, dtype=dt)], offs + [5010], one, one,
                                      torch.ones(4), seed=2 ** 40, step=2 ** 33, modality=1)
            be.modulate_sigma_bucket_(ts, offs, one, one, torch.ones(3), seed=-5,
                                      step=torch.tensor(3), modality=2)
            be.modulate_sigma_bucket_([torch.empty(s, dtype=dt) for s in (8, 5000, 4)],
                                      [0, 8, 5008], one, one, torch.ones(3), seed=3, step=1,
                                      modality=0)
        # the per-tensor moments of sharded OGM-GE (bucket_moments): chunk statistics + the
        # moments merge, every dtype, an empty tensor keeping its row; the unaligned variant
        for dt in dtypes:
            be.bucket_moments([torch.empty(s, dtype=dt) for s in (7, 5000, 0, 3)])
        be.bucket_moments([torch.empty(5001)[1:], torch.empty(9)])
        # a table bucket whose data pointers are not 16-byte aligned (scalar-access variants)
        store = torch.empty(1 + 5000 + 7)
        ts = [store[1:5001], store[5001:]]
        be.modulate_bucket_(ts, [0, 5000], one, one, noise=False, noise_std="raw", seed=0,
                            step=0, modality=0)
        be.modulate_bucket_(ts, [0, 5000], one, one, noise=True, noise_std="raw", seed=0,
                            step=0, modality=0)
        buf = torch.empty(1 + 4096)  # a flat range that starts off 16-byte alignment, n = 4096
        be.modulate_bucket_([buf[1:2049].view(32, 64), buf[2049:]], [0, 2048], one, one,
                            noise=False, noise_std="raw", seed=0, step=0, modality=0)
        ts = [torch.empty(100)]
        be.modulate_bucket_(ts, [0], one, one, noise=True, noise_std="raw", seed=1,
                            step=torch.tensor(5, dtype=torch.int32), modality=1)
        be.sigmas(ts, one, noise_std="scaled")
        # InfoReg's proximal correction (kernels/proximal_kernel.py): every dtype on aligned
        # tables (a 2-D tensor for the Fisher, a full and a partial chunk), and a bucket whose
        # pointers are off 16-byte alignment (the masked variant)
        for dt in dtypes:
            prox = [[torch.empty(s, dtype=dt) for s in ((70, 73), (4096,), (3,))]
                    for _ in range(3)]
            proximal.proximal_(be, *prox, one)
        prox = [[buf[1:5001], buf[5001:]] for buf in (torch.empty(1 + 5000 + 7) for _ in range(3))]
        proximal.proximal_(be, *prox, one)
        # MMPareto's combine (kernels/combine_kernel.py, launched by
        # mmmod/backends/triton/combine.py): every dtype, with and without the fused scale
        for dt in dtypes:
            pair = [[torch.empty(s, dtype=dt) for s in ((70, 73), (4096,), (3,))] for _ in range(2)]
            for scale in (None, torch.ones(1, dtype=torch.float64)):
                combine.pair_moments(be, pair[0], pair[1], scale)
                combine.combine_(be, pair[1], pair[0], torch.ones(3, 3, dtype=torch.float64),
                                 [3], 1.5, scale)
    return launches + fused_update_launches()


def fused_update_launches():
    """The fused optimizer update's launches (kernels/fused_update_kernel.py), recorded, not
    run: every dtype, SGD with and without momentum / noise / update scale, Adam coupled and
    decoupled (both lerp formulas); part of :func:`backend_launches`."""
    from mmmod.backends.triton import TritonBackend
    from mmmod.backends.triton.fused_update import fused_adam_, fused_sgd_

    be = TritonBackend()
    one = torch.ones(1)
    with record_launches(execute=False) as launches:
        for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            ps = [torch.empty(s, dtype=dt) for s in (7, 5000, 3)]
            gs, b1, b2 = ([torch.empty_like(p) for p in ps] for _ in range(3))
            offs = [0, 7, 5007]
            for sigma in (None, torch.ones(3)):
                for upd in (None, one):
                    fused_sgd_(be, ps, gs, b1, [True, False, True], offs, one, sigma, upd,
                               lr=0.1, weight_decay=0.01, momentum=0.9, dampening=0.0,
                               nesterov=True, maximize=False, seed=2 ** 40, step=2 ** 33,
                               modality=1)
                    fused_adam_(be, ps, gs, b1, b2, [1.0, 2.0, 3.0], offs, one, sigma, upd,
                                lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                                decoupled=True, maximize=False, seed=3, step=1, modality=0)
            fused_sgd_(be, ps, gs, [], [], offs, one, None, None, lr=0.1, weight_decay=0.0,
                       momentum=0.0, dampening=0.0, nesterov=False, maximize=True, seed=0,
                       step=0, modality=0)
            fused_adam_(be, ps, gs, b1, b2, [1.0, 1.0, 1.0], offs, one, None, None, lr=1e-3,
                        beta1=0.2, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=False,
                        maximize=True, seed=3, step=1, modality=0)
    return launches


# ------------------------------------------------------------------------- specialising
def specialize(launch, cc: int):
    """``(kernel, signature, constexprs, attrs, options)`` as ``JITFunction.run`` builds them
    for this launch on a device of compute capability ``cc``."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = _kernel_from_path(launch["kernel"])
    if not hasattr(kernel, "params"):
        raise RuntimeError("the kernels are not JITFunctions: run without TRITON_INTERPRET=1")
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    args = [_rebuild(a) for a in launch["args"]]
    kwargs = {k: _rebuild(v) for k, v in launch["kwargs"].items()}
    # what JITFunction.run adds before binding
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound,
                                                              specialization, options)
    return kernel, target, signature, constexprs, attrs, options


def variant_key(launch) -> str:
    """What makes two launches one compiled kernel (signature, constexprs, attrs, options)."""
    kernel, _, signature, constexprs, attrs, options = specialize(launch, FULL_TARGET)
    consts = {str(k): str(v) for k, v in sorted(constexprs.items())}
    return json.dumps([launch["kernel"], signature, consts, str(sorted(attrs.items())),
                       options.num_warps, options.num_stages, options.enable_fp_fusion])


def constexpr_label(launch) -> str:
    """A short human label of a launch's constexpr arguments and special types."""
    parts = []
    for k, v in launch["kwargs"].items():
        if k in ("num_warps", "enable_fp_fusion"):
            continue
        if isinstance(v, dict) and "tl_dtype" in v:
            v = v["tl_dtype"]
        parts.append(f"{k}={v}")
    dts = sorted({a["tensor"] for a in _flat_args(launch["args"]) if isinstance(a, dict)
                  and "tensor" in a and a["tensor"] not in ("int64", "float32")})
    if any(isinstance(a, dict) and "tensor" in a and not a["aligned"]
           for a in _flat_args(launch["args"])):
        parts.append("unaligned-arg")  # a tensor argument (often a table slice) off 16 bytes
    return " ".join(parts + ([f"args:{'/'.join(dts)}"] if dts else []))


def _flat_args(args):
    for a in args:
        if isinstance(a, dict) and "tuple" in a:
            yield from _flat_args(a["tuple"])
        else:
            yield a


# ------------------------------------------------------------------------------ compiling
def _ptxas_stats(ptx: str, cc: int, fp_fusion: bool):
    """Registers, spills and stack of the PTX with Triton's ptxas and Triton's flags."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    ptxas = get_ptxas(cc).path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(cc)}",
               *([] if fp_fusion else ["--fmad=false"]), src, "-o", os.path.join(d, "k.o")]
        out = subprocess.run(cmd, capture_output=True, text=True)
    log = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed ({' '.join(cmd)}):\n{log}")

    def grab(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else None
    return {"registers": grab(r"Used (\d+) registers"),
            "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads"),
            "stack": grab(r"(\d+) bytes stack frame"),
            "ptxas_log": log.strip()}


_GLOBAL_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")
_ACCESS_BITS = re.compile(r"^(?:b|u|s|f)(8|16|32|64)$")


def global_access_counts(ptx: str):
    """Global loads and stores of the PTX by bytes per instruction:
    ``{"ld": {"16": n, "4": m, ...}, "st": {...}}`` (``ld.global.v4.b32`` is 16 bytes,
    ``ld.global.v2.b64`` 16, ``ld.global.b16`` 2). Static instruction counts: a kernel whose
    threads hold E elements of S bytes each and access them once with 16-byte vectors shows
    E * S / 16 of them."""
    out = {"ld": {}, "st": {}}
    for m in _GLOBAL_ACCESS.finditer(ptx):
        vec, bits = 1, None
        for q in m.group(2).split(".")[1:]:
            if q.startswith("v") and q[1:].isdigit():
                vec = int(q[1:])
            b = _ACCESS_BITS.match(q)
            if b:
                bits = int(b.group(1))
        if bits is None:
            continue
        key = str(vec * bits // 8)
        out[m.group(1)][key] = out[m.group(1)].get(key, 0) + 1
    return out


def _addptr_counts(ttir: str):
    """Pointer arithmetic on blocks by offset width: ``tt.addptr`` of a tensor of pointers
    with i32 or i64 offsets (a 32-bit block offset would wrap past 2**31 elements)."""
    counts = {"block_addptr_i32": 0, "block_addptr_i64": 0, "scalar_addptr_i32": 0}
    for m in re.finditer(r"tt\.addptr [^:]*: ([^,]+), (\S+)", ttir):
        ptr, off = m.group(1), m.group(2)
        if ptr.startswith("tensor<"):
            if off.endswith("xi32>"):
                counts["block_addptr_i32"] += 1
            elif off.endswith("xi64>"):
                counts["block_addptr_i64"] += 1
        elif off == "i32":
            counts["scalar_addptr_i32"] += 1
    return counts


def compile_launch(launch, cc: int):
    """Compile one recorded launch for ``sm_<cc>``; a dict of measurements, or ``error``."""
    import traceback

    import triton
    from triton.compiler import ASTSource
    t0 = time.perf_counter()
    try:
        kernel, target, signature, constexprs, attrs, options = specialize(launch, cc)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                  target=target, options=options.__dict__)
        ptx = compiled.asm["ptx"]
        res = {"signature": signature, "num_warps": options.num_warps,
               "enable_fp_fusion": options.enable_fp_fusion,
               "shared": compiled.metadata.shared}
        res.update(_ptxas_stats(ptx, cc, options.enable_fp_fusion))
        res["ptx_counts"] = {k: len(re.findall(p, ptx)) for k, p in PTX_COUNTS.items()}
        res["ttir_counts"] = _addptr_counts(compiled.asm["ttir"])
        res["global_access"] = global_access_counts(ptx)
        res["ptx_target"] = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
        res["ptx"] = ptx
    except Exception as e:  # the compiler's own message is the point of the test
        res = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def _representative(units):
    """One unit per (kernel, non-dtype constexpr values), plus the bf16 modulation variants."""
    seen, keep = set(), []
    for u in units:
        kw = u["launch"]["kwargs"]
        dt = kw.get("DT", {}).get("tl_dtype") if isinstance(kw.get("DT"), dict) else None
        flags = tuple(sorted((k, str(v)) for k, v in kw.items()
                             if k in ("FLAT", "STEP_PTR", "SCALED", "METHOD", "WRITE_SCORES",
                                      "ALIGNED")))
        key = (u["launch"]["kernel"], flags, dt == "bfloat16")
        if key not in seen:
            seen.add(key)
            keep.append(u)
    return keep


def run(targets=TARGETS, full_target=FULL_TARGET, jobs: int = 2, subset_others=True,
        keep_ptx=False):
    """Record, dedupe and compile. Returns ``{"units": [...], "results": [...]}`` where each
    result names its unit, target and measurements (or ``error``)."""
    launches = backend_launches()
    by_key = {}
    for launch in launches:
        key = variant_key(launch)
        if key not in by_key:
            by_key[key] = {"launch": launch, "label": constexpr_label(launch), "launches": 0}
        by_key[key]["launches"] += 1
    units = list(by_key.values())
    for i, u in enumerate(units):
        u["id"] = i
    work = []
    for cc in targets:
        chosen = units if (cc == full_target or not subset_others) else _representative(units)
        work += [(u["id"], cc, False) for u in chosen]
    # controls: the first variant of every kernel once more with FMA contraction on, so the
    # tests can count exactly the contractions that enable_fp_fusion=False removes
    first = {}
    for u in units:  # prefer a variant with a coefficient rule (METHOD != 0) as the control
        k = u["launch"]["kernel"]
        if k not in first or (u["launch"]["kwargs"].get("METHOD") == 2
                              and units[first[k]]["launch"]["kwargs"].get("METHOD") != 2):
            first[k] = u["id"]
    if full_target in targets:
        work += [(uid, full_target, True) for uid in first.values()]
    ctx = get_context("spawn")  # fresh interpreters: nothing inherited from the caller's state
    results = []
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=ctx) as pool:
        futs = []
        for uid, cc, control in work:
            launch = units[uid]["launch"]
            if control:
                launch = dict(launch, kwargs=dict(launch["kwargs"], enable_fp_fusion=True))
            futs.append((uid, cc, control, pool.submit(compile_launch, launch, cc)))
        for uid, cc, control, fut in futs:
            r = fut.result()
            if not keep_ptx:
                r.pop("ptx", None)
            r.update(unit=uid, kernel=units[uid]["launch"]["kernel"].split(":")[1], cc=cc,
                     label=units[uid]["label"], control=control)
            results.append(r)
    return {"n_launches": len(launches), "units": units, "results": results}


# ------------------------------------------------------------------------------ reporting
def markdown_table(report) -> str:
    """Per kernel and target: variants, registers / spills / shared memory (max over the
    kernel's variants), and the PTX instruction counts docs/triton.md relies on."""
    rows = {}
    for r in report["results"]:
        if "error" in r or r["control"]:
            continue
        key = (r["kernel"], r["cc"])
        agg = rows.setdefault(key, {"n": 0, "reg": [], "spill": 0, "shared": [], "stack": 0,
                                    "warps": set(), "fma": 0, "sqrt_approx": 0})
        agg["n"] += 1
        agg["reg"].append(r["registers"])
        agg["spill"] = max(agg["spill"], r["spill_stores"] + r["spill_loads"])
        agg["stack"] = max(agg["stack"], r["stack"])
        agg["shared"].append(r["shared"])
        agg["warps"].add(r["num_warps"])
        agg["fma"] += r["ptx_counts"]["fma_f32"] + r["ptx_counts"]["fma_f64"]
        agg["sqrt_approx"] += r["ptx_counts"]["sqrt_approx"]
    lines = ["| kernel | target | variants | warps | registers (min-max) "
             "| spill bytes (stores+loads, max) | stack bytes (max) | shared memory bytes (max) |",
             "|---|---|---|---|---|---|---|---|"]
    for (kernel, cc), a in sorted(rows.items()):
        warps = "/".join(map(str, sorted(a["warps"])))
        lines.append(f"| `{kernel}` | sm_{cc} | {a['n']} | {warps} "
                     f"| {min(a['reg'])}-{max(a['reg'])} | {a['spill']} | {a['stack']} "
                     f"| {max(a['shared'])} |")
    lines += ["", ptx_table(report)]
    return "\n".join(lines)


def ptx_table(report) -> str:
    """PTX facts of the first variant of each kernel at the full target, with the same
    variant compiled with FMA contraction on as the control."""
    by = {}
    for r in report["results"]:
        if "error" not in r and r["cc"] == FULL_TARGET:
            by.setdefault((r["kernel"], r["unit"]), {})[r["control"]] = r
    lines = ["| kernel (first variant, sm_90) | fma.rn.f32 fusion off / on | sqrt.approx | sqrt.rn "
             "| ex2.approx | lg2/sin/cos.approx | div/rcp approx f32 | i32 block offsets |",
             "|---|---|---|---|---|---|---|---|"]
    for (kernel, _), pair in sorted(by.items()):
        if True not in pair:
            continue
        off, on = pair[False]["ptx_counts"], pair[True]["ptx_counts"]
        approx = off["lg2_approx"] + off["sin_approx"] + off["cos_approx"]
        lines.append(f"| `{kernel}` [{pair[False]['label']}] | {off['fma_f32']} / {on['fma_f32']} "
                     f"| {off['sqrt_approx']} | {off['sqrt_rn']} | {off['ex2_approx']} | {approx} "
                     f"| {off['div_approx']} | {pair[False]['ttir_counts']['block_addptr_i32']} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.aot",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=",".join(map(str, TARGETS)),
                   help="compute capabilities, e.g. 80,90 (default: %(default)s)")
    p.add_argument("--full", action="store_true",
                   help="compile the full launch matrix for every target (default: full for "
                        f"sm_{FULL_TARGET}, a representative subset for the others)")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--json", help="write the full report here")
    p.add_argument("--markdown", action="store_true", help="print the docs/triton.md table")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        p.error("unset TRITON_INTERPRET: ahead-of-time compilation needs the real @jit kernels")
    if not os.environ.get("TRITON_CACHE_DIR"):
        # an empty cache: a cached kernel would hide a compile error
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmmod-aot-")
    t0 = time.perf_counter()
    this = importlib.import_module("tools.aot")  # workers must unpickle its functions
    report = this.run([int(t) for t in a.targets.split(",")], jobs=a.jobs,
                      subset_others=not a.full)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    errors = [r for r in report["results"] if "error" in r]
    print(f"{report['n_launches']} launches recorded, {len(report['units'])} distinct variants, "
          f"{len(report['results'])} compiles in {report['seconds']} s, {len(errors)} failed",
          file=sys.stderr)
    for r in errors:
        print(f"FAILED {r['kernel']} sm_{r['cc']} [{r['label']}]:\n{r['error']}", file=sys.stderr)
    if a.markdown:
        print(markdown_table(report))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
