"""The built CUDA extension, checked where no GPU is needed (the CUDA CI lane, .ci/cuda_lane.sh).

Runs against a CUDA build of torch with mmmod installed (regular install) by the lane; in a CPU
torch venv every test is skipped with the reason. What needs no GPU: ``mmmod._C_cuda`` imports
and carries the build record of this torch; the CUDA kernels of every op are registered with the
dispatcher; the binary holds sm_80 and sm_90 code; the fake implementations pass
torch.library.opcheck on meta tensors and produce the right shapes for fake CUDA tensors; and
``python -m mmmod.info`` reports the extension as built and says why it is not usable here.
The kernels themselves are checked on a GPU by tests/backends/test_ext_cuda.py (scripts/gpu_check.sh).
Also here, for every venv: scripts/gpu_check.sh refuses a machine without a GPU at once.
"""
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _toolchain

needs_cuda_torch = pytest.mark.skipif(
    torch.version.cuda is None,
    reason=f"torch {torch.__version__} is a CPU build: the CUDA extension is built and checked by "
           f"the CUDA lane (bash .ci/cuda_lane.sh, a venv with the CUDA torch)")

# set by the lane: there the extension must be built, so a missing one fails instead of skipping
EXPECT_BUILD = os.environ.get("MMMOD_EXPECT_CUDA_BUILD", "0") == "1"
OPS = ("scores", "coefficients", "modulate_", "modulate_.capturable", "bucket_table",
       "_bucket_std", "_philox_normal_", "fused_sgd_", "fused_adam_", "modulate_sigma_",
       "proximal_", "_bucket_moments")


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cuda_ext():
    try:
        mod = importlib.import_module("mmmod._C_cuda")
    except ImportError as e:
        if EXPECT_BUILD:
            raise
        pytest.skip(f"mmmod._C_cuda is not built here ({e})")
    return mod


@needs_cuda_torch
def test_installed_package_is_the_one_tested():
    """In the lane the tests must exercise the regular install, not the checkout's mmmod/."""
    import mmmod
    src = os.environ.get("MMMOD_SOURCE_TREE")
    if not src:
        pytest.skip("MMMOD_SOURCE_TREE not set (only the CUDA lane pins where mmmod comes from)")
    pkg = Path(mmmod.__file__).resolve().parent
    assert pkg != Path(src).resolve() / "mmmod", f"mmmod imported from the checkout: {pkg}"
    assert pkg.parent.name == "site-packages", pkg


@needs_cuda_torch
def test_cuda_extension_imports_with_matching_build_record(cuda_ext):
    info = cuda_ext.build_info()
    assert info["backend"] == "cuda"
    assert info["torch"] == torch.__version__
    assert info["cuda"] == torch.version.cuda
    cpu_ext = importlib.import_module("mmmod._C")
    assert info["source_hash"] == cpu_ext.build_info()["source_hash"]  # one build, one source


@needs_cuda_torch
@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_cuda_kernel(cuda_ext, op):
    name = "mmmod::" + op  # "ns::op" or "ns::op.overload"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), \
        torch._C._dispatch_dump_table(name)
    # the CPU extension (which holds the schemas) registers CPU kernels for all but the table
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU") == (op != "bucket_table")


def fatbin_entries(path):
    """(kind, sm) of every entry of the CUDA fat binaries embedded in a shared object.

    Layout (as nvcc writes it): a fat binary starts with magic 0xBA55ED50, u16 version, u16 header
    size, u64 payload size; each entry has u16 kind (1 PTX, 2 ELF cubin), u16 version, u32 header
    size, u64 payload size, and at byte 28 the u32 SM version (80 for sm_80). Parsed here because
    cuobjdump is not part of every toolkit install (it is not in this machine's)."""
    import struct
    data = Path(path).read_bytes()
    out = []
    magic = struct.pack("<I", 0xBA55ED50)
    at = data.find(magic)
    while at != -1:
        _, hsize, size = struct.unpack_from("<HHQ", data, at + 4)
        p, end = at + hsize, at + hsize + size
        while p + 32 <= end:
            kind, _, ehsize, payload = struct.unpack_from("<HHIQ", data, p)
            (sm,) = struct.unpack_from("<I", data, p + 28)
            out.append((kind, sm))
            p += ehsize + payload
        at = data.find(magic, end)
    return out


@needs_cuda_torch
def test_cuda_binary_holds_sm80_and_sm90_code(cuda_ext):
    """The lane builds with TORCH_CUDA_ARCH_LIST="8.0;9.0": one cubin per architecture."""
    entries = fatbin_entries(cuda_ext.__file__)
    # one cubin per architecture and .cu file: the set of architectures is what the lane asked for
    cubins = sorted({sm for kind, sm in entries if kind == 2})
    assert entries, "no CUDA fat binary in the extension"
    want = os.environ.get("MMMOD_EXPECT_SM")  # e.g. "80,90" (set by the lane)
    if want:
        assert cubins == sorted(int(x) for x in want.split(",")), entries
    else:
        assert cubins, entries


# -- the fused update's kernels (csrc/cuda/fused_update.cu) in the fat binary ---------------------------
# every instantiation: functor (applied by mmmod::mt::multi_tensor_kernel, csrc/cuda/multi_tensor.cuh)
# x dtype (Itanium template-argument code, element size) x noise
FUSED_KERNELS = ("SgdChunk", "AdamChunk")
FUSED_TYPES = {"f": 4, "d": 8, "6__half": 2, "13__nv_bfloat16": 2}
# arrays each kernel reads / writes per element: SGD g, p, buf / p, buf; Adam g, p, m, v / p, m, v
FUSED_ARRAYS = {"SgdChunk": (3, 2), "AdamChunk": (4, 3)}


def _fused_instances():
    return [(k, t, n) for k in FUSED_KERNELS for t in FUSED_TYPES for n in (0, 1)]


def _instance_of(function: str):
    """(functor, type code, noise) of a mangled fused-update kernel name, or None."""
    if "multi_tensor_kernel" not in function:
        return None
    m = re.search(r"\d+((?:Sgd|Adam)Chunk)I(f|d|6__half|13__nv_bfloat16)Lb([01])E", function)
    return (m.group(1), m.group(2), int(m.group(3))) if m else None


def _tool(name, found):
    if found is None:
        if EXPECT_BUILD:
            pytest.fail(f"{name} not found: the CUDA lane needs it to read the fat binary")
        pytest.skip(f"{name} not found")
    return found


def _by_arch(text: str):
    """Split cuobjdump output into (sm, section text) per embedded ELF."""
    parts = re.split(r"^arch = sm_(\d+)\s*$", text, flags=re.M)
    return [(int(sm), body) for sm, body in zip(parts[1::2], parts[2::2])]


@pytest.fixture(scope="module")
def fused_resources(cuda_ext):
    """{(sm, kernel, type, noise): {"REG": .., "STACK": .., "LOCAL": ..}} of the shipped binary."""
    dump = _tool("cuobjdump", _toolchain.cuobjdump())
    out = subprocess.run([dump, "-res-usage", cuda_ext.__file__], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    res = {}
    for sm, body in _by_arch(out):
        for fn, usage in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", body):
            inst = _instance_of(fn)
            if inst is not None:
                assert (sm, *inst) not in res, f"{fn} twice for sm_{sm}"
                res[(sm, *inst)] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", usage)}
    return res


def _expected_sms():
    want = os.environ.get("MMMOD_EXPECT_SM")  # "80,90" in the lane
    return sorted(int(x) for x in want.split(",")) if want else None


@needs_cuda_torch
def test_fat_binary_holds_every_fused_kernel(cuda_ext, fused_resources):
    """16 instantiations (SGD and Adam x 4 dtypes x noise on/off) per architecture, none using
    local memory."""
    sms = _expected_sms() or sorted({key[0] for key in fused_resources})
    assert sms, "no fused-update kernel in the fat binary"
    for sm in sms:
        have = sorted(key[1:] for key in fused_resources if key[0] == sm)
        assert have == sorted(_fused_instances()), (sm, have)
    assert all(r["LOCAL"] == 0 for r in fused_resources.values()), fused_resources


@needs_cuda_torch
def test_fused_kernels_have_no_register_spills(cuda_ext, fused_resources, tmp_path):
    """ptxas -v on csrc/cuda/fused_update.cu with the extension's nvcc flags, for each architecture of
    the binary: no spill stores or loads in any instantiation, and the same registers and stack
    frame as the shipped cubins (so the report is about the code that ships). The noise variants'
    32-byte stack frame is sincosf's argument-reduction array (Payne-Hanek, for |x| > 105615:
    never taken, the angle is 2 pi u with u < 1), not spills."""
    from torch.utils import cpp_extension as ce
    nvcc = _tool("nvcc", _toolchain.nvcc())
    sms = sorted({key[0] for key in fused_resources})
    flags = [f for f in ce.COMMON_NVCC_FLAGS if f.startswith(("-D", "--expt"))]
    cmd = [nvcc, "-c", "-std=c++20", "-O3", "-lineinfo", "-fmad=false", "-Xptxas", "-v",
           *flags, "-I" + str(ROOT / "csrc"), str(ROOT / "csrc" / "cuda" / "fused_update.cu"),
           "-o", str(tmp_path / "fused_update.o")]
    for sm in sms:
        cmd[1:1] = ["-gencode", f"arch=compute_{sm},code=sm_{sm}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = {}
    for fn, sm, frame, st, ld, regs in re.findall(
            r"Compiling entry function '(\S+)' for 'sm_(\d+)'\s*\n"
            r"(?:ptxas info\s*: Function properties for \S+\s*\n)?"
            r"\s*(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\s*\n"
            r"ptxas info\s*: Used (\d+) registers", out.stderr):
        inst = _instance_of(fn)
        if inst is not None:
            report[(int(sm), *inst)] = dict(frame=int(frame), spill=int(st) + int(ld), reg=int(regs))
    assert sorted(report) == sorted(fused_resources), (sorted(report), out.stderr[-3000:])
    for key, r in report.items():
        assert r["spill"] == 0, (key, r)
        assert r["reg"] == fused_resources[key]["REG"], (key, r, fused_resources[key])
        assert r["frame"] == fused_resources[key]["STACK"], (key, r, fused_resources[key])
        assert r["frame"] == (32 if key[3] else 0), (key, r)  # sincosf's array, noise only


@needs_cuda_torch
def test_fused_kernels_use_vector_accesses(cuda_ext, fused_resources):
    """In the shipped SASS each array is read and written a Philox group (4 elements) at a time:
    one 16-byte access per array for float32, one 8-byte (2 x half2 / bfloat162) for 16-bit
    types, two 16-byte for float64 (ld.global.cg / st.global.cg: LDG/STG .STRONG.GPU), beside
    the scalar accesses of misaligned chunks and partial groups."""
    dump = _tool("cuobjdump", _toolchain.cuobjdump())
    out = subprocess.run([dump, "-sass", cuda_ext.__file__], capture_output=True, text=True,
                         check=True, timeout=600).stdout
    access = re.compile(r"\b(LDG|STG)\.E((?:\.(?:64|128|U16))?)\.STRONG\.GPU\b")
    width_of = {"": 4, ".64": 8, ".128": 16, ".U16": 2}
    seen = set()
    for sm, body in _by_arch(out):
        for part in re.split(r"\n\s+Function : ", body)[1:]:
            inst = _instance_of(part.split("\n", 1)[0])
            if inst is None:
                continue
            kernel, t, _ = inst
            es = FUSED_TYPES[t]
            width = min(4 * es, 16)
            count = {"LDG": {}, "STG": {}}
            for op, w in access.findall(part):
                count[op][width_of[w]] = count[op].get(width_of[w], 0) + 1
            loads, stores = FUSED_ARRAYS[kernel]
            per_array = 4 * es // width
            assert count["LDG"].get(width, 0) == loads * per_array, (sm, inst, count)
            assert count["STG"].get(width, 0) == stores * per_array, (sm, inst, count)
            assert count["LDG"].get(es, 0) == 4 * loads, (sm, inst, count)  # the scalar path
            seen.add((sm, *inst))
    assert seen == set(fused_resources)


def _meta_bucket():
    d = "meta"
    return ([torch.empty(5, device=d), torch.empty(3, 4, device=d)], [0, 5],
            torch.empty((), device=d), torch.empty((), device=d))


@needs_cuda_torch
def test_opcheck_fake_implementations_on_meta(cuda_ext):
    from torch.library import opcheck
    import mmmod  # noqa: F401  (registers the fakes through the loader)
    from mmmod import _ext
    from mmmod.reference.native_rules import NativeRule
    _ext._register_fakes()
    ops = torch.ops.mmmod
    d = "meta"
    ts, offs, k, gate = _meta_bucket()
    opcheck(ops.scores.default, ([torch.empty(6, 4, device=d)] * 2,
                                 torch.empty(6, dtype=torch.long, device=d)))
    opcheck(ops.coefficients.default, (torch.empty(3, device=d), int(NativeRule.OGM), 0.8, 2.0))
    opcheck(ops.modulate_.default, (ts, offs, k, gate, True, False, 7, 3, 1))
    opcheck(ops.modulate_.capturable,
            (ts, offs, k, gate, True, False, 7, 0, 1,
             torch.empty(2 + 5 * 2 + 2 * 2, dtype=torch.long, device=d),
             torch.empty((), dtype=torch.long, device=d)))
    opcheck(ops.bucket_table.default, (ts, offs))
    opcheck(ops._bucket_std.default, (ts,))
    opcheck(ops._bucket_moments.default, (ts,))
    opcheck(ops._philox_normal_.default, (torch.empty(11, device=d), 7, 2, 0, 3))


@needs_cuda_torch
def test_fake_cuda_tensors_get_the_right_outputs(cuda_ext):
    """Under FakeTensorMode CUDA tensors need no GPU: the fakes give device/dtype/shape."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from mmmod import _ext
    from mmmod.reference.native_rules import NativeRule
    _ext._register_fakes()
    ops = torch.ops.mmmod
    with FakeTensorMode(allow_non_fake_inputs=False):
        z = torch.empty(6, 4, device="cuda")
        y = torch.empty(6, dtype=torch.long, device="cuda")
        s = ops.scores([z, z, z], y)
        assert s.device.type == "cuda" and s.dtype == torch.float32 and s.shape == (3,)
        k = ops.coefficients(s, int(NativeRule.MLB), 0.5, 2.0)
        assert k.device.type == "cuda" and k.shape == (3,)
        ts = [torch.empty(70000, device="cuda"), torch.empty(0, device="cuda"),
              torch.empty(3, 5, device="cuda")]
        table = ops.bucket_table(ts, [0, 70000, 70000])
        # 2 header words, 5 per tensor, 2 per chunk: 70000 elements are 2 chunks of 65536
        assert table.device.type == "cuda" and table.dtype == torch.int64
        assert table.shape == (2 + 5 * 3 + 2 * 3,)
        ops.modulate_.capturable(ts, [0, 70000, 70000], k[0], k[1], True, False, 1, 0, 0, table,
                                 torch.empty((), dtype=torch.long, device="cuda"))
        std = ops._bucket_std(ts)
        assert std.dtype == torch.float64 and std.shape == (3,)
        rows = ops._bucket_moments(ts)
        assert rows.device.type == "cuda" and rows.dtype == torch.float64 and rows.shape == (3, 3)


@needs_cuda_torch
def test_info_reports_built_but_not_usable_without_gpu(cuda_ext, tmp_path):
    out = subprocess.run([sys.executable, "-m", "mmmod.info", "--json"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    ce = info["cuda_extension"]
    assert ce["built"], ce
    assert ce["build_info"]["backend"] == "cuda" and ce["build_info"]["cuda"] == torch.version.cuda
    assert "cuda" in info["build_record"]["backends"]
    if torch.cuda.is_available():
        assert ce["usable"] and info["backends"]["cuda"]["live"]
    else:
        assert not ce["usable"] and "no CUDA device" in ce["why_not_usable"]
        assert not info["backends"]["cuda"]["live"]
        assert "no CUDA device" in info["backends"]["cuda"]["why_not"]
    text = subprocess.run([sys.executable, "-m", "mmmod.info"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120).stdout
    assert "cuda extension: built" in text


# -- scripts/gpu_check.sh on a machine without a GPU (runs in every venv) -------------------------
def _path_without_nvidia_smi(extra=()):
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not os.path.exists(os.path.join(d, "nvidia-smi"))]
    return os.pathsep.join([*extra, *dirs])


def _gpu_check(tmp_path, path, venv):
    marker = tmp_path / "python_was_run"
    fake_python = tmp_path / "fake_python"
    fake_python.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    fake_python.chmod(0o755)
    env = {**os.environ, "PATH": path, "PYTHON": str(fake_python), "MMMOD_GPU_VENV": str(venv)}
    import time
    t0 = time.monotonic()
    out = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True,
                         text=True, env=env, timeout=120)
    return out, time.monotonic() - t0, marker


def test_gpu_check_refuses_without_nvidia_smi(tmp_path):
    venv = tmp_path / "venv"
    out, seconds, marker = _gpu_check(tmp_path, _path_without_nvidia_smi(), venv)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "no CUDA GPU here" in out.stderr and "nvidia-smi is not on PATH" in out.stderr
    assert seconds < 20 and not venv.exists() and not marker.exists()  # nothing installed


def test_gpu_check_refuses_when_nvidia_smi_lists_no_gpu(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    venv = tmp_path / "venv"
    out, seconds, marker = _gpu_check(tmp_path, _path_without_nvidia_smi([str(bin_dir)]), venv)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "lists no GPU" in out.stderr
    assert seconds < 20 and not venv.exists() and not marker.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this venv's torch sees a GPU")
def test_gpu_check_refuses_when_torch_sees_no_gpu(tmp_path):
    """nvidia-smi claims a GPU (faked), but the venv's torch sees none: exit before building."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'Fake GPU 9000'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    venv = Path(sys.prefix)  # an existing venv (this one), whose torch sees no GPU
    results = ROOT / "benchmarks" / "results"
    before = set(results.glob("gpu_*"))
    out, seconds, marker = _gpu_check(tmp_path, _path_without_nvidia_smi([str(bin_dir)]), venv)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "does not see a CUDA GPU" in out.stderr and "nothing was built" in out.stderr
    assert seconds < 60 and not marker.exists()
    assert set(results.glob("gpu_*")) == before  # no results folder for a machine without GPU
