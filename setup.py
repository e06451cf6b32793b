"""Build mmmod: the Python package, the Triton kernels (shipped as ``mmmod.kernels``) and,
when present, the C++/CUDA extension built with torch's BuildExtension (ninja).

MMMOD_NO_EXTENSION=1 skips compiling entirely; the package then runs on the torch and triton
backends only. Otherwise the CPU extension ``mmmod._C`` is always built, and the CUDA extension
``mmmod._C_cuda`` too when torch has CUDA and a CUDA toolkit is found (MMMOD_NO_CUDA=1 skips
it; the toolkit is located by :func:`find_cuda_home` and printed).
MAX_JOBS defaults to 2. A build record (backends, torch/CUDA versions, source hash) is compiled
into each binary and written to ``mmmod/_build_info.json`` beside them; ``mmmod._ext`` checks it
on load. Build in place with ``MAX_JOBS=2 pip install -e . --no-build-isolation``.
"""
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
ext_modules = []
cmdclass = {}


def _load_ext_helpers():
    """mmmod/_ext.py loaded as a plain file (the package itself is not importable yet)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_mmmod_ext_build", os.path.join(ROOT, "mmmod", "_ext.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _is_toolkit(home):
    """A CUDA toolkit root: bin/nvcc, the runtime library and its header (not a wrapper's dir)."""
    import glob
    if not home or not os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return False
    if not os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
        return False
    return any(glob.glob(os.path.join(home, d, "libcudart*"))
               for d in ("lib64", "lib", os.path.join("targets", "*", "lib")))


def _wrapped_nvcc_homes(nvcc):
    """Toolkit roots named by an nvcc that is a small wrapper script (``exec /x/bin/nvcc "$@"``)."""
    import re
    try:
        if os.path.getsize(nvcc) > 4096:
            return []  # the real (binary) nvcc
        with open(nvcc, errors="replace") as f:
            text = f.read()
    except OSError:
        return []
    return [os.path.dirname(os.path.dirname(p)) for p in re.findall(r"(/[^\s\"']*/bin/nvcc)\b", text)]


def find_cuda_home():
    """(toolkit root, how it was found) or (None, why not).

    torch's own guess takes the parent of the ``nvcc`` on PATH, which is wrong when that nvcc is
    a wrapper (e.g. /usr/local/bin/nvcc -> CUDA_HOME=/usr/local, and linking -lcudart fails).
    Candidates in order: $CUDA_HOME, $CUDA_PATH, the toolkit the PATH nvcc resolves to (symlinks
    followed, wrapper scripts read), /usr/local/cuda; the first that is a real toolkit wins."""
    import shutil
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append((os.environ[var], f"${var}"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append((os.path.dirname(os.path.dirname(real)), f"nvcc on PATH ({nvcc})"))
        candidates += [(h, f"wrapper {nvcc}") for h in _wrapped_nvcc_homes(real)]
    candidates.append(("/usr/local/cuda", "default location"))
    rejected = []
    for home, how in candidates:
        if _is_toolkit(home):
            return os.path.realpath(home), how
        rejected.append(f"{home} ({how})")
    return None, "no CUDA toolkit (bin/nvcc + include/cuda_runtime.h + libcudart) in: " + ", ".join(rejected)


def _extension():
    import json
    import subprocess
    import time

    import torch

    want_cuda = bool(torch.version.cuda) and os.environ.get("MMMOD_NO_CUDA", "0") in ("", "0")
    cuda_home = None
    if want_cuda:
        cuda_home, how = find_cuda_home()
        if cuda_home:
            # cpp_extension reads CUDA_HOME once, at import: set it before the import below (and
            # patch the module too, in case something imported it already)
            os.environ["CUDA_HOME"] = cuda_home
            print(f"mmmod setup: CUDA toolkit {cuda_home} (from {how}); building mmmod._C_cuda "
                  f"for torch {torch.__version__}", flush=True)
        else:
            print(f"mmmod setup: not building mmmod._C_cuda: {how}", flush=True)
    from torch.utils import cpp_extension as ce
    if cuda_home:
        ce.CUDA_HOME = cuda_home

    helpers = _load_ext_helpers()
    os.environ.setdefault("MAX_JOBS", "2")
    csrc = os.path.join(ROOT, "csrc")
    rel = lambda *names: [os.path.relpath(os.path.join(csrc, n), ROOT) for n in names]  # noqa: E731

    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    backends = ["cpu"] + (["cuda"] if nvcc else [])
    nvcc_version = ""
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        nvcc_version = out.strip().splitlines()[-1] if out.strip() else ""
    record = {
        "backends": backends,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "nvcc": nvcc_version,
        "source_hash": helpers.source_hash(csrc),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # the record compiled into the binaries (a generated header under build/, gitignored)
    gen = os.path.join(ROOT, "build", "mmmod_gen")
    os.makedirs(gen, exist_ok=True)
    header = "".join(f'#define {macro} "{record[key]}"\n' for key, macro in (
        ("torch", "MMMOD_TORCH_VERSION"), ("cuda", "MMMOD_CUDA_VERSION"),
        ("source_hash", "MMMOD_SOURCE_HASH")))
    header = "#pragma once\n" + header
    path = os.path.join(gen, "mmmod_build_record.h")
    if not os.path.exists(path) or open(path).read() != header:
        with open(path, "w") as f:
            f.write(header)

    x86 = os.uname().machine in ("x86_64", "AMD64")
    cxx = ["-O3", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi"]
    defines = [("MMMOD_HAVE_AVX2_TU", None)] if x86 else []
    # OpenMP when torch's intra-op backend is OpenMP, on Linux (gcc/clang take -fopenmp there;
    # Apple clang does not and MSVC spells it differently: those builds keep serial loops)
    import sys
    omp = (["-fopenmp"] if sys.platform.startswith("linux")
           and "OpenMP" in torch.__config__.parallel_info() else [])
    include = [csrc, gen]
    # csrc/ by layer: common/ (shared by both binaries), cpu/, cuda/, and module.cpp (the Python
    # module of each); includes are written from csrc/ ("common/philox.h")
    exts = [ce.CppExtension(
        "mmmod._C",
        # cpu/vec_avx2.cpp and cpu/vec_avx512.cpp switch their ISA on per file with a target
        # pragma; the linker keeps the first copy of an inline function several objects define,
        # and objects link in name order (module.o after them), so those two files must define
        # no inline function another object defines (tests/backends/test_cpu_link.py checks with nm)
        sources=rel("common/checks.cpp", "module.cpp", "cpu/isa.cpp", "cpu/cpu_kernels.cpp",
                    "cpu/fused_update_cpu.cpp", "cpu/modulate_all_cpu.cpp", "cpu/proximal_cpu.cpp",
                    "common/combine_checks.cpp", "cpu/combine_cpu.cpp",
                    "cpu/vec_avx2.cpp", "cpu/vec_avx512.cpp"),
        include_dirs=include,
        define_macros=defines + [("MMMOD_MODULE_NAME", "_C"), ("MMMOD_BACKEND_NAME", "cpu"),
                                 ("MMMOD_CPU_KERNELS_API", None)],
        # at::parallel_for is a header template: without OpenMP in *this* build it silently
        # runs every loop on one thread. torch's own libgomp (same soname) is the one loaded.
        extra_compile_args=cxx + omp,
        extra_link_args=omp,
    )]
    if nvcc:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        exts.append(ce.CUDAExtension(
            "mmmod._C_cuda",
            sources=rel("common/checks.cpp", "module.cpp", "cuda/multi_tensor_table.cpp",
                        "cuda/cuda_ops.cpp", "cuda/kernels.cu",
                        "cuda/proximal_cuda.cpp", "cuda/proximal.cu", "cuda/fused_update_cuda.cpp",
                        "cuda/fused_update.cu", "common/combine_checks.cpp",
                        "cuda/combine_cuda.cpp", "cuda/combine.cu"),
            include_dirs=include,
            define_macros=[("MMMOD_MODULE_NAME", "_C_cuda"), ("MMMOD_BACKEND_NAME", "cuda")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo", "-fmad=false"]},
        ))

    class BuildExt(ce.BuildExtension):
        def run(self):
            super().run()
            # the JSON twin of the compiled-in record, next to the built binaries
            dirs = {os.path.dirname(self.get_ext_fullpath(e.name)) for e in self.extensions}
            for d in dirs:
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, "_build_info.json"), "w") as f:
                    json.dump(record, f, indent=1)
                    f.write("\n")

    return exts, {"build_ext": BuildExt.with_options(use_ninja=True)}


def _version() -> str:
    """The one version string, mmmod/_version.py (read as text: mmmod is not importable here)."""
    import re
    with open(os.path.join(ROOT, "mmmod", "_version.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


NO_TORCH = """
mmmod: torch cannot be imported while building mmmod.
The compiled extension is built against the torch it will run with, and pip's isolated build
environment (the default of `pip install .`) has no torch. Install torch first, then either
  pip install --no-build-isolation .          # builds the C++ (and CUDA) kernels against it
or, without the compiled kernels (pure Python; the plain-torch backend is slower on CPU):
  MMMOD_NO_EXTENSION=1 pip install .
"""


def _torch_or_exit() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise SystemExit(NO_TORCH) from None


if os.environ.get("MMMOD_NO_EXTENSION", "0") in ("", "0"):
    _torch_or_exit()
    ext_modules, cmdclass = _extension()

setup(
    name="mmmod",
    version=_version(),
    description="Fast, exact, drop-in multimodal gradient modulation (OGM-GE, MLB) for PyTorch",
    # every subpackage under mmmod/ (found, so a new one cannot be left out of the wheel), and
    # the Triton kernels from kernels/ as mmmod.kernels
    packages=find_packages(include=["mmmod", "mmmod.*"]) + ["mmmod.kernels"],
    package_dir={"mmmod.kernels": "kernels"},
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "numpy"],
    # the framework integrations (mmmod.integrations): tested with the versions that
    # .ci/extras_lane.sh pins; `import mmmod` needs none of them
    extras_require={"triton": ["triton"], "demo": ["torchaudio", "matplotlib", "tqdm", "soundfile"],
                    "lightning": ["lightning>=2.6"], "accelerate": ["accelerate>=1.16"],
                    "hf": ["transformers>=5", "accelerate>=1.16"]},
    entry_points={"console_scripts": ["mmmod=mmmod.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
