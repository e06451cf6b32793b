"""Shared benchmark plumbing: devices, timing, sync counting, JSON/markdown output.

Timing:
* CPU, non-mutating callables: ``torch.utils.benchmark.Timer.blocked_autorange`` (median of
  blocks, all intra-op threads);
* CPU, callables that modify their inputs (gradient modulation): one call per sample timed with
  ``time.perf_counter``, inputs restored between calls outside the timed region; median;
* GPU, non-mutating: ``triton.testing.do_bench(return_mode="median")`` (L2 flushed between
  calls), or CUDA events when Triton is missing;
* GPU, mutating: CUDA events around each call, inputs restored and L2 flushed in between.

Host syncs: ``count_syncs`` runs a callable once under a ``TorchDispatchMode`` that counts the
aten ops that must read a device value on the host (``_local_scalar_dense`` behind ``.item()``,
``bool(t)``, indexing with a 0-d tensor, ...; ``nonzero`` and friends with data-dependent
shapes; copies to the CPU). This works on every device, so CPU runs report the number of syncs
the same code would make on a GPU. On CUDA ``torch.cuda.set_sync_debug_mode("warn")`` is used
as well and its warnings are counted (``syncs_cuda_debug``).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any, Callable, Sequence

import torch

from .host import cpu_name

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
#: where a run writes unless told otherwise: the committed RESULTS_DIR changes only on request
DEFAULT_OUT = "benchmarks_out"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUSED = ("cpu", "cuda", "triton")


# ---- command line ----------------------------------------------------------------------
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    size.add_argument("--smoke", action="store_true",
                      help="tiny sizes, a few repetitions: checks the harness, not speed")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"directory for JSON/markdown results (default: ./{DEFAULT_OUT})")
    p.add_argument("--update-results", dest="out", action="store_const", const=RESULTS_DIR,
                   help="write into the repository's benchmarks/results/ (the committed numbers)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of measurement per contender and case")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's; 1 under --smoke)")
    p.add_argument("--backends", default=None,
                   help="comma-separated contenders to run (paper,plain,torch,cpu,cuda,triton)")
    return p


@contextlib.contextmanager
def session(args):
    """Apply ``--threads`` (1 by default under ``--smoke``) for the duration of a run."""
    prev = torch.get_num_threads()
    n = args.threads if args.threads else (1 if args.smoke else None)
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def mode_of(args) -> str:
    return "smoke" if args.smoke else "quick" if args.quick else "full"


def min_time(args, full: float = 1.0) -> float:
    if args.min_time is not None:
        return args.min_time
    return 0.0 if args.smoke else full / 4 if args.quick else full


def live_backends(device: torch.device) -> dict[str, str]:
    """name -> '' (live) or why not, for mmmod's fused backends usable on ``device``."""
    from mmmod import backends
    out = {}
    for name in FUSED:
        live, why = backends.status(name)
        if live:
            try:
                ok = backends.get(name, device) is not None
            except RuntimeError as e:
                ok, why = False, str(e)
            if ok and name == "triton" and device.type == "cpu":
                ok, why = False, "Triton on CPU runs only under TRITON_INTERPRET=1 (not benchmarked)"
            if ok:
                why = ""
        out[name] = why or ("" if live else "not live")
    return out


def contenders(device: torch.device, wanted: str | None = None) -> list[str]:
    """(a) paper, (b) plain, (c) torch, (d) every fused backend live on ``device``."""
    names = ["paper", "plain", "torch"] + [n for n, why in live_backends(device).items() if not why]
    if wanted:
        keep = {w.strip() for w in wanted.split(",") if w.strip()}
        names = [n for n in names if n in keep]
    return names


# ---- timing ------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_L2_FLUSH: dict[Any, torch.Tensor] = {}


def _flush_l2(device: torch.device) -> None:
    buf = _L2_FLUSH.get(device)
    if buf is None:
        buf = _L2_FLUSH[device] = torch.empty(256 << 20, dtype=torch.int8, device=device)
    buf.zero_()


def time_fn(fn: Callable[[], Any], device: torch.device, *, reset: Callable[[], Any] | None = None,
            min_time: float = 1.0, max_reps: int = 1000, min_reps: int = 3,
            warmup: int = 1) -> dict[str, Any]:
    """Median seconds per call of ``fn`` (see the module docstring for the method)."""
    if device.type == "cuda":
        return _time_cuda(fn, device, reset, min_time, max_reps, min_reps, warmup)
    if reset is None and min_time > 0:
        from torch.utils import benchmark
        for _ in range(warmup):
            fn()
        t = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        m = t.blocked_autorange(min_run_time=min_time)
        times = list(m.times)
        return {"median_s": m.median, "iqr_s": m.iqr, "reps": m.number_per_run * len(times),
                "blocks": len(times), "method": "torch.utils.benchmark.blocked_autorange"}
    samples = []
    for _ in range(warmup):
        if reset:
            reset()
        fn()
    start = time.perf_counter()
    while len(samples) < min_reps or (time.perf_counter() - start < min_time
                                      and len(samples) < max_reps):
        if reset:
            reset()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return _summary(samples, "time.perf_counter per call" + (", inputs restored" if reset else ""))


def _summary(samples: Sequence[float], method: str) -> dict[str, Any]:
    s = sorted(samples)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0], s[0], s[0]]
    return {"median_s": statistics.median(s), "iqr_s": q[2] - q[0], "min_s": s[0],
            "reps": len(s), "method": method}


def _time_cuda(fn, device, reset, min_time, max_reps, min_reps, warmup):
    if reset is None:
        try:
            import triton.testing
            rep_ms = max(1.0, 1000.0 * min_time)
            ms = triton.testing.do_bench(fn, warmup=max(1, int(rep_ms / 4)), rep=int(rep_ms),
                                         return_mode="median")
            return {"median_s": ms / 1e3, "reps": None, "method": "triton.testing.do_bench median"}
        except ImportError:
            pass
    for _ in range(max(warmup, 1)):
        if reset:
            reset()
        fn()
    torch.cuda.synchronize(device)
    samples = []
    start = time.perf_counter()
    while len(samples) < min_reps or (time.perf_counter() - start < min_time
                                      and len(samples) < max_reps):
        if reset:
            reset()
        _flush_l2(device)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b) / 1e3)
    return _summary(samples, "CUDA events per call, L2 flushed" + (", inputs restored" if reset else ""))


# ---- host sync counting ------------------------------------------------------------------
_SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique",
             "repeat_interleave", "item")


def count_syncs(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Run ``fn`` once and count host reads of device values (see the module docstring)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0
            self.by_op: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func.__name__.split(".")[0]
            hit = name in _SYNC_OPS
            if not hit and name in ("_to_copy", "copy_"):
                # a device -> host copy (meaningful on accelerators only)
                src = args[1] if name == "copy_" else args[0]
                dst_dev = (args[0].device if name == "copy_" else kwargs.get("device"))
                hit = (isinstance(src, torch.Tensor) and src.device.type != "cpu"
                       and dst_dev is not None and torch.device(dst_dev).type == "cpu")
            if hit:
                self.n += 1
                self.by_op[name] = self.by_op.get(name, 0) + 1
            return func(*args, **kwargs)

    out: dict[str, Any] = {}
    with Counter() as c:
        t0 = time.perf_counter()
        fn()
        sync(device)
        out["elapsed_s"] = time.perf_counter() - t0  # includes the counter's own overhead
    out["syncs"] = c.n
    out["sync_ops"] = c.by_op
    if device.type == "cuda":
        sync(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prev = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
                sync(device)
            finally:
                torch.cuda.set_sync_debug_mode(prev)
        out["syncs_cuda_debug"] = sum("synchroniz" in str(w.message).lower() for w in caught)
    return out


# ---- environment and output ----------------------------------------------------------------
def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout
        return rev + ("-dirty" if dirty.strip() else "")
    except Exception:  # noqa: BLE001 - not a git checkout
        return "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_revision": git_revision(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        env["loadavg_1_5_15"] = list(os.getloadavg())
    except OSError:
        pass
    try:  # which CPU kernel table the cpu backend runs (avx2 / scalar) and the forcing env vars
        import mmmod._C
        env["cpu_kernels"] = mmmod._C.cpu_kernels()
        env["cpu_kernels"]["MMMOD_CPU_SCALAR"] = os.environ.get("MMMOD_CPU_SCALAR")
    except Exception:  # noqa: BLE001 - extension not built or an older build
        env["cpu_kernels"] = None
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import mmmod
        env["mmmod"] = getattr(mmmod, "__version__", "?")
    except ImportError:
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["device_name"] = p.name
        env["cuda"] = torch.version.cuda
        env["device_memory_gib"] = round(p.total_memory / 2**30, 1)
    else:
        env["device_name"] = cpu_name()
    env["backends"] = live_backends(device)
    return env


def device_tag(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else device.type


def write_results(name: str, device: torch.device, args, payload: dict[str, Any],
                  table: str) -> str:
    """``<out>/<name>_<device>.json`` and ``.md``; returns the JSON path."""
    os.makedirs(args.out, exist_ok=True)
    doc = {"benchmark": name, "mode": mode_of(args), "env": environment(device)}
    doc.update(payload)
    base = os.path.join(args.out, f"{name}_{device_tag(device)}")
    with open(base + ".json", "w") as f:
        json.dump(doc, f, indent=1, default=_jsonable)
    env = doc["env"]
    with open(base + ".md", "w") as f:
        f.write(f"# {name} on {env['device_name']} ({device})\n\n")
        f.write(f"mode {doc['mode']}, {env['date']}, git {env['git_revision']}, torch "
                f"{env['torch']}, {env['torch_threads']} threads")
        if "loadavg_1_5_15" in env:
            f.write(f", load average {env['loadavg_1_5_15'][0]:.2f} at the end")
        f.write("\n\n" + table + "\n")
    return base + ".json"


def _jsonable(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, torch.device):
        return str(o)
    return str(o)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table (also readable printed)."""
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _fmt(c) -> str:
    if c is None:
        return "-"
    if isinstance(c, float):
        if c != c:
            return "nan"
        if abs(c) >= 100:
            return f"{c:.0f}"
        if abs(c) >= 10:
            return f"{c:.1f}"
        return f"{c:.3g}" if abs(c) >= 0.01 or c == 0 else f"{c:.2e}"
    return str(c)


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def ratio(a: float | None, b: float | None) -> float | None:
    """How many times faster the contender is than the baseline: baseline / contender."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)
