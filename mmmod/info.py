"""``python -m mmmod.info``: versions, the compiled extension's build record, and which backends
are live on this machine (and why not)."""
from __future__ import annotations

import json
import os
import platform
import sys


def collect() -> dict:
    import torch

    from . import __version__, _ext, backends

    info = {
        "mmmod": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001 - report, never fail
        info["triton"] = f"not importable ({type(e).__name__})"
    info["build_record"] = _ext.build_record()
    mod, _ = _ext.load("cpu")
    info["extension"] = mod.build_info() if mod is not None else None
    # which CPU kernel table the extension dispatches to (AVX2+FMA or the portable scalar one)
    info["cpu_kernels"] = (mod.cpu_kernels() if mod is not None and hasattr(mod, "cpu_kernels")
                           else None)
    # built is not usable: the CUDA extension imports on a machine with no GPU (CI builds it there)
    cuda_rec, cuda_why = _ext.cuda_build_info()
    cuda_mod, cuda_not_usable = _ext.load("cuda")
    info["cuda_extension"] = {"built": cuda_rec is not None, "build_info": cuda_rec,
                              "why_not_built": cuda_why, "usable": cuda_mod is not None,
                              "why_not_usable": cuda_not_usable}
    info["backends"] = {}
    for name in backends.names():
        live, why = backends.status(name)
        if live:
            live, why = _runs_here(name, torch)
        info["backends"][name] = {"live": live, "why_not": "" if live else why,
                                  "note": why if live else ""}
    return info


def _runs_here(name: str, torch) -> tuple[bool, str]:
    """Whether a loaded backend can run on a device of this machine: Triton compiles for GPUs
    and runs on CPU tensors only under its interpreter (TRITON_INTERPRET=1, tests)."""
    if name != "triton" or torch.cuda.is_available():
        return True, ""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, "on CPU tensors through its interpreter: TRITON_INTERPRET=1"
    return False, ("triton is installed but there is no GPU, and it runs on CPU tensors only "
                   "under its interpreter (TRITON_INTERPRET=1, slow: for tests)")


def render(info: dict) -> str:
    lines = [f"mmmod {info['mmmod']}  (python {info['python']}, {info['platform']})",
             f"torch {info['torch']}  CUDA {info['torch_cuda'] or '-'}  "
             f"cuda available: {info['cuda_available']}  threads: {info['cpu_threads']}",
             f"triton {info['triton']}"]
    for i, d in enumerate(info["devices"]):
        lines.append(f"  cuda:{i} {d}")
    rec = info["build_record"]
    if rec:
        lines.append(f"extension build record: backends {rec.get('backends')}, torch {rec.get('torch')}, "
                     f"CUDA {rec.get('cuda') or '-'}, nvcc {rec.get('nvcc') or '-'}, "
                     f"sources {rec.get('source_hash')}, built {rec.get('built_at')}")
    else:
        lines.append("extension build record: none (extension not built)")
    ce = info.get("cuda_extension")
    if ce:
        if ce["built"]:
            bi = ce["build_info"]
            lines.append(f"cuda extension: built (torch {bi.get('torch')}, CUDA {bi.get('cuda')}, "
                         f"sources {bi.get('source_hash')}); "
                         + ("usable" if ce["usable"] else f"not usable: {ce['why_not_usable']}"))
        else:
            lines.append(f"cuda extension: not built: {ce['why_not_built']}")
    ck = info.get("cpu_kernels")
    if ck:
        lines.append(f"cpu kernels: {ck.get('active')} (AVX-512 supported: "
                     f"{ck.get('avx512_supported')}, AVX2+FMA supported: {ck.get('avx2_supported')}; "
                     f"MMMOD_CPU_KERNELS=scalar|avx2|avx512 caps the table)")
    lines.append("backends:")
    for name, st in info["backends"].items():
        lines.append(f"  {name:7s} {'live' if st['live'] else 'not available'}"
                     + (f" ({st['note']})" if st.get("note") else "")
                     + ("" if st["live"] else f": {st['why_not']}"))
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    info = collect()
    print(json.dumps(info, indent=1, default=str) if "--json" in argv else render(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
