"""The GPU byte model (benchmarks/byte_model.py) against the code, and the CUDA statistics'
float64 merge order replayed in numpy (no GPU needed).

- The model's launches, programs and per-element gradient traffic are those of the real
  launchers (recorded Triton launches, real bucket tables) and of the compiled CUDA kernels
  (16-byte / 4-element vector accesses counted in the sm_90 SASS of csrc/cuda/kernels.cu);
  OGM-GE reads each gradient element twice and writes it once on both backends: 12 B/element
  in float32 plus under 0.1 B/element of side traffic on the benchmark workloads.
- ``cuda_moments`` is the exact float64 operation order of the CUDA ``StatsChunk`` +
  ``sigma_kernel`` / ``std_kernel`` (per-thread register tiles, Chan merges, warp-shuffle tree,
  block per tensor). Its float32 sigma must equal the reference's (two-pass float64 over the
  whole tensor, then ``float32(std + 1e-8)``); tests/backends/test_ext_cuda.py checks on a GPU that the
  kernels produce this model's float64 std bit for bit.
- The Triton ``ALIGNED`` variants (vector accesses) give the same bits as the scalar variants
  and the reference, in the interpreter, on odd sizes, partial chunks and every dtype.
"""
import os
import re
import subprocess

import numpy as np
import pytest
import torch

from benchmarks import byte_model as bm
from mmmod import reference

import _toolchain

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# ----------------------------------------------------------------- the CUDA merge order in numpy
CUDA_THREADS, CUDA_VEC = 256, 8
CUDA_TILE = CUDA_THREADS * CUDA_VEC


def _merge(a, b):
    """mmmod::moments_merge (csrc/common/philox.h), elementwise over arrays of (n, mean, m2)."""
    an, am, aq = a
    bn, bm_, bq = b
    with np.errstate(invalid="ignore", divide="ignore"):
        n = an + bn
        delta = bm_ - am
        mean = am + delta * (bn / n)
        m2 = aq + bq + delta * delta * (an * bn / n)
    take_b, take_a = an == 0, bn == 0
    return (np.where(take_b, bn, np.where(take_a, an, n)),
            np.where(take_b, bm_, np.where(take_a, am, mean)),
            np.where(take_b, bq, np.where(take_a, aq, m2)))


def _block_merge(m):
    """block_merge: per warp lane i <- merge(lane i, lane i + off), off = 16 .. 1, then the
    warps' results in warp order; m: arrays of shape [..., 256]."""
    lanes = tuple(x.reshape(x.shape[:-1] + (CUDA_THREADS // 32, 32)) for x in m)
    off = 16
    while off:
        lanes = _merge(tuple(x[..., :off] for x in lanes), tuple(x[..., off:2 * off] for x in lanes))
        off //= 2
    warps = tuple(x[..., 0] for x in lanes)
    total = tuple(np.zeros(x.shape[:-1]) for x in warps)
    for w in range(CUDA_THREADS // 32):
        total = _merge(total, tuple(x[..., w] for x in warps))
    return total


def _chunk_moments(x):
    """StatsChunk on one chunk (float64 values): thread t's tiles are elements
    base + 8t .. base + 8t + 7, each reduced by the exact two-pass formula, then merged."""
    n = x.size
    tiles = -(-n // CUDA_TILE)
    v = np.zeros(tiles * CUDA_TILE)
    v[:n] = x
    v = v.reshape(tiles, CUDA_THREADS, CUDA_VEC)
    first = (np.arange(tiles)[:, None] * CUDA_TILE + np.arange(CUDA_THREADS)[None, :] * CUDA_VEC)
    cnt = np.clip(n - first, 0, CUDA_VEC)
    s = np.zeros(cnt.shape)
    for e in range(CUDA_VEC):
        s = np.where(e < cnt, s + v[..., e], s)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s / cnt
    q = np.zeros(cnt.shape)
    for e in range(CUDA_VEC):
        d = v[..., e] - mean
        q = np.where(e < cnt, q + d * d, q)
    acc = tuple(np.zeros(CUDA_THREADS) for _ in range(3))
    for t in range(tiles):
        acc = _merge(acc, (cnt[t].astype(np.float64), mean[t], q[t]))
    return _block_merge(acc)


def cuda_moments(x: np.ndarray, chunk: int = bm.CUDA_CHUNK):
    """(n, mean, M2) of one tensor as the CUDA kernels compute them (float64 numpy scalars)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    parts = [_chunk_moments(x[c:c + chunk]) for c in range(0, x.size, chunk)]
    rounds = -(-len(parts) // CUDA_THREADS)
    per = tuple(np.zeros((rounds, CUDA_THREADS)) for _ in range(3))
    for c, p in enumerate(parts):  # thread c % 256 takes chunks c, c + 256, ... in order
        for arr, val in zip(per, p):
            arr[c // CUDA_THREADS, c % CUDA_THREADS] = val
    acc = tuple(np.zeros(CUDA_THREADS) for _ in range(3))
    for r in range(rounds):
        acc = _merge(acc, tuple(a[r] for a in per))
    return _block_merge(acc)


def cuda_std(x) -> float:
    """std_kernel: sqrt(M2 / (n - 1)), 0 below two elements."""
    n, _, m2 = cuda_moments(x)
    return float(np.sqrt(m2 / (n - 1.0))) if n >= 2 else 0.0


def cuda_sigma(x) -> np.float32:
    return np.float32(cuda_std(x) + 1e-8)


def _values(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _cases(seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (1, 2, 3, 7, 8, 9, 2047, 2048, 2049, 65535, 65536, 65537, 3 * 65536 + 11, 300_001):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            scale = float(torch.empty(()).uniform_(-6, 2, generator=g).exp())
            shift = float(torch.randn((), generator=g)) * scale * 50  # a mean far from 0
            out.append(((torch.randn(n, generator=g) * scale + shift).to(dtype), n, dtype))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_cuda_single_pass_sigma_equals_the_reference(seed):
    """The float32 sigma from the single-pass merge order equals the reference's two-pass
    float64 one on every case, and the float64 stds differ by at most
    64 eps64 (1 + (mean / std)^2) relative (summation error of either order, and the Chan
    merge's delta^2 term carries the mean's rounding): far below the 2^-24 relative distance
    float32 rounding needs; sigma can only differ when the float64 std lies within that bound
    of a float32 rounding midpoint."""
    eps64 = 2.0 ** -52
    for t, n, dtype in _cases(seed):
        x = _values(t)
        ref_std = float(reference.tensor_std(t))
        got = cuda_std(x)
        if ref_std:
            bound = 64 * eps64 * (1 + (x.mean() / ref_std) ** 2)
            assert abs(got - ref_std) / ref_std <= bound, (n, dtype, got, ref_std)
        ref_sigma = reference.tensor_sigma(t, torch.tensor(1.0), "raw").numpy()
        assert cuda_sigma(x) == ref_sigma, (n, dtype, got, ref_std)


def test_cuda_moments_model_with_a_large_mean():
    """A mean 7000 times the spread: the merge order loses nothing to cancellation."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(200_003, generator=g) * 1e-3 + 7.0).double().numpy()
    a, b = cuda_std(x), cuda_std(x.copy())
    assert a == b
    two_pass = float(np.sqrt(((x - x.mean()) ** 2).sum() / (x.size - 1)))
    assert abs(a - two_pass) / two_pass < 1e-12


# ---------------------------------------------------------------------------- the byte model
def test_ogm_ge_reads_twice_writes_once_on_both_backends():
    for backend in ("triton", "cuda"):
        for es in (2, 4, 8):
            numels = [7, 5000, 65537, 3]
            t = bm.modulation(backend, numels, es, noise=True)
            n = sum(numels)
            assert bm.grad_reads_per_elem(t, n, es) == 2, backend
            assert sum(x.grad_written for x in t) == n * es
            assert [x.launches for x in t] == [1, 1, 1]
            t = bm.modulation(backend, numels, es, noise=False)
            assert bm.grad_reads_per_elem(t, n, es) == 1 and len(t) == 1
    # the previous CUDA statistics read the chunk twice from DRAM: 16 B/element
    old = bm.cuda_modulation([1 << 20], 4, noise=True, single_pass=False)
    assert bm.grad_reads_per_elem(old, 1 << 20, 4) == 3


@pytest.mark.parametrize("workload", ["resnet18_conv", "many_small"])
def test_workload_bytes_per_element_at_the_floor(workload):
    buckets = bm.workload_buckets(workload)
    numel = sum(map(sum, buckets))
    for backend in ("triton", "cuda"):
        traffic = []
        for numels in buckets:
            traffic += bm.modulation(backend, numels, 4, noise=True)
        b = bm.bytes_per_elem(traffic, numel)
        assert 12 <= b < 12.2, (backend, b)
        # expected time: bytes at the copy bandwidth plus the launches
        dev = bm.DEVICES["H100-SXM"]
        exp = bm.expected_seconds(traffic, dev["copy_GBps"], dev["launch_s"])
        assert exp == pytest.approx(b * numel / (dev["copy_GBps"] * 1e9) + 6 * dev["launch_s"])


def test_model_constants_are_the_code():
    from mmmod.backends.triton import TritonBackend
    assert (bm.TRITON_BLOCK, bm.TRITON_BLOCK_C) == (TritonBackend.block, TritonBackend.block_c)
    header = open(os.path.join(ROOT, "csrc", "cuda", "cuda_api.h")).read()
    assert int(re.search(r"#define MMMOD_CUDA_CHUNK (\d+)", header).group(1)) == bm.CUDA_CHUNK
    src = open(os.path.join(ROOT, "csrc", "cuda", "kernels.cu")).read()
    assert int(re.search(r"constexpr int kThreads = (\d+);", src).group(1)) == CUDA_THREADS
    assert int(re.search(r"constexpr int kVec = (\d+);", src).group(1)) == CUDA_VEC


def test_model_programs_and_launches_are_the_launchers():
    """Grid sizes and kernels of the recorded Triton launches are the model's programs."""
    pytest.importorskip("triton")  # tools.aot imports mmmod.kernels
    from mmmod.backends.triton import TritonBackend
    from tools import aot
    from mmmod.backends.triton.table import BucketMeta
    be = TritonBackend()
    one = torch.ones(1)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        numels = [int(x) for x in torch.randint(1, 20000, (int(torch.randint(1, 6, ())),),
                                                generator=g)]
        ts = [torch.empty(n) for n in numels]
        offs = [0]
        for n in numels[:-1]:
            offs.append(offs[-1] + n)
        with aot.record_launches(execute=False) as launches:
            be.modulate_bucket_(ts, offs, one, one, noise=True, noise_std="raw", seed=0, step=0,
                                modality=0)
        model = bm.triton_modulation(numels, 4, noise=True, offsets=offs)
        assert [launch["kernel"].split(":")[1] for launch in launches] == [t.kernel for t in model]
        meta = BucketMeta(ts, offs, be.block, be.block_c)
        assert launches[0]["grid"] == [meta.n_stats_chunks] == [sum(-(-n // bm.TRITON_BLOCK)
                                                                   for n in numels)]
        assert launches[2]["grid"] == [meta.n_noise_chunks] == [sum(
            bm.triton_noise_chunks(n, o) for n, o in zip(numels, offs))]
        assert launches[1]["grid"] == [len(numels)]


# ------------------------------------------------------------- vector widths in the CUDA cubin


@pytest.fixture(scope="module")
def sass(tmp_path_factory):
    nvcc, dump = _toolchain.nvcc(), _toolchain.cuobjdump()
    if not nvcc or not dump:
        pytest.skip("needs nvcc and cuobjdump")
    d = tmp_path_factory.mktemp("cubin")
    cubin = d / "kernels.cubin"
    subprocess.run([nvcc, "-cubin", "-arch=sm_90", "-std=c++17", "-O3", "-fmad=false",
                    "-I" + os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "cuda", "kernels.cu"),
                    "-o", str(cubin)], check=True, capture_output=True, timeout=600)
    out = subprocess.run([dump, "-sass", str(cubin)], check=True, capture_output=True,
                         text=True).stdout
    funcs = {}
    for part in re.split(r"\n\s+Function : ", out)[1:]:
        name = part.split("\n", 1)[0].strip()
        funcs[name] = part
    return funcs


# SASS of ld.global.cg / st.global.cg (the gradient accesses; table reads are plain LDG):
# LDG.E[.64|.128|.U16].STRONG.GPU
_CG = re.compile(r"\b(LDG|STG)\.E((?:\.(?:64|128|U16|U8))?)\.STRONG\.GPU\b")
_WIDTH = {"": 4, ".64": 8, ".128": 16, ".U16": 2, ".U8": 1}
_TYPES = {"f": ("float", 4), "h": ("__half", 2), "b": ("__nv_bfloat16", 2), "d": ("double", 8)}
# Itanium template-argument codes of the instantiations
_MANGLED = {"f": "IfE", "h": "I6__halfE", "b": "I13__nv_bfloat16E", "d": "IdE"}


def _grad_accesses(sass, kernel, t):
    """Gradient accesses of the multi_tensor_kernel instance applying functor `kernel` to type t."""
    name = next(n for n in sass if "multi_tensor_kernel" in n and kernel + _MANGLED[t] in n)
    acc = {"LDG": {}, "STG": {}}
    for op, w in _CG.findall(sass[name]):
        acc[op][_WIDTH[w]] = acc[op].get(_WIDTH[w], 0) + 1
    return acc


def test_cuda_kernels_use_vector_accesses(sass):
    """StatsChunk reads a thread's 8 elements per tile with 16-byte loads, exactly once; the
    scale and noise kernels read and write a 4-element group with one access of 4 elements'
    width (16 B float, 8 B half2/bfloat162 pairs, 2 x 16 B double); plus the scalar accesses of
    unaligned chunks and partial tails. Gradient reads of OGM-GE: stats + noise = 2."""
    for t, (_, es) in _TYPES.items():
        st = _grad_accesses(sass, "StatsChunk", t)
        assert st["LDG"].get(16, 0) * 16 == CUDA_VEC * es, (t, st)
        assert not st["STG"]
        assert st["LDG"].get(es, 0) > 0  # the scalar fallback exists too
        for kernel in ("ScaleChunk", "NoiseChunk"):
            acc = _grad_accesses(sass, kernel, t)
            width = min(4 * es, 16)
            assert acc["LDG"].get(width, 0) * width == 4 * es, (kernel, t, acc)
            assert acc["STG"].get(width, 0) * width == 4 * es, (kernel, t, acc)
        noise = _grad_accesses(sass, "NoiseChunk", t)
        reads = (st["LDG"].get(16, 0) * 16 / (CUDA_VEC * es)
                 + noise["LDG"].get(min(4 * es, 16), 0) * min(4 * es, 16) / (4 * es))
        assert reads == 2
        model = bm.cuda_modulation([100_000], es, noise=True)
        assert bm.grad_reads_per_elem(model, 100_000, es) == reads


def _function_body(src: str, signature: str) -> str:
    """The text of the C function that starts with ``signature``, up to its closing brace."""
    start = src.index(signature)
    depth, i = 0, src.index("{", start)
    for j in range(i, len(src)):
        depth += {"{": 1, "}": -1}.get(src[j], 0)
        if depth == 0:
            return src[start:j + 1]
    raise AssertionError(signature)


def test_cuda_scores_model_is_the_launcher():
    """The scores model's rows per block, modalities per call and launches per call are the
    code's: kScoreRows warps of one row each, MMMOD_CUDA_SCORES_MAX_M descriptors per launch,
    two launches in mmmod_cuda_scores, and the glue calls it once per group of that many."""
    kernels = open(os.path.join(ROOT, "csrc", "cuda", "kernels.cu")).read()
    header = open(os.path.join(ROOT, "csrc", "cuda", "cuda_api.h")).read()
    glue = open(os.path.join(ROOT, "csrc", "cuda", "cuda_ops.cpp")).read()
    assert re.search(r"constexpr int kScoreRows = kThreads / 32;", kernels)
    assert bm.CUDA_SCORE_ROWS == CUDA_THREADS // 32
    assert int(re.search(r"#define MMMOD_CUDA_SCORES_MAX_M (\d+)", header).group(1)) == \
        bm.CUDA_SCORES_MAX_M
    launcher = _function_body(kernels, "int mmmod_cuda_scores(")
    assert launcher.count("<<<") == 2
    assert "scores_kernel<<<" in launcher and "scores_finish_kernel<<<" in launcher
    assert launcher.count("launch_status()") == 2  # checked after each launch
    assert "atomic" not in _function_body(kernels, "__global__ void __launch_bounds__(kThreads) "
                                                   "scores_kernel(")
    glue_scores = _function_body(glue, "at::Tensor scores_cuda(")
    assert "m0 += MMMOD_CUDA_SCORES_MAX_M" in glue_scores
    assert glue_scores.count("mmmod_cuda_scores(") == 1
    for M in (1, 2, 5, 16, 17, 33):
        calls = -(-M // bm.CUDA_SCORES_MAX_M)
        t = bm.cuda_scores(1000, [32000] * M, 4)
        assert [x.kernel for x in t] == ["scores_kernel", "scores_finish_kernel",
                                         "coefficients_kernel"]
        assert [x.launches for x in t] == [calls, calls, 1]
        blocks = -(-1000 // bm.CUDA_SCORE_ROWS)
        # logits twice, z[i, y_i] and the label once per row, partials written then read
        assert t[0].side == M * (2 * 1000 * 32000 * 4 + 1000 * (4 + 8) + blocks * 8)
        assert t[1].side == M * (blocks * 8 + 4)


def test_cuda_scores_kernels_have_no_atomics(sass):
    """Determinism of the CUDA scores: no atomic or reduction instruction in either stage."""
    names = [n for n in sass if "scores_kernel" in n or "scores_finish_kernel" in n]
    assert len(names) == 2, names
    for n in names:
        assert not re.search(r"\b(ATOM|ATOMG|RED|ATOMS)\b", sass[n]), n


# ------------------------------------------------- Triton ALIGNED variants (interpreter parity)
def _triton_live():
    from mmmod import backends
    return backends.status("triton")[0] and os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not _triton_live(), reason="needs the Triton interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_triton_aligned_variant_matches_scalar_variant_and_reference(dtype):
    from mmmod.backends.triton import TritonBackend
    from tools import aot
    be = TritonBackend()
    be.block, be.block_c, be.block_p = 64, 8, 4  # partial last chunks at small sizes
    g = torch.Generator().manual_seed(7)
    sizes = [4, 64, 128, 43]  # stream offsets 0, 4, 68, 196: multiples of 4 (noise variant)
    offs = [0]
    for n in sizes[:-1]:
        offs.append(offs[-1] + n)
    src = [(torch.randn(n, generator=g) * 0.3 + 0.1).to(dtype) for n in sizes]
    k, gate = torch.tensor(0.7), torch.tensor(1.0)
    for noise in (False, True):
        results, flags = [], []
        for aligned in (True, False):
            store = torch.empty(sum(sizes) + 64, dtype=dtype)
            ts, pos = [], 0 if aligned else 1
            for x in src:  # each tensor 16-byte aligned (or each one element off)
                step = -(-x.numel() // 16) * 16
                t = store[pos:pos + x.numel()]
                t.copy_(x)
                ts.append(t)
                pos += step
            if aligned:
                assert all(t.data_ptr() % 16 == 0 for t in ts)
            else:
                assert all(t.data_ptr() % 16 != 0 for t in ts)
            with aot.record_launches(execute=True) as launches:
                be.modulate_bucket_(ts, offs, k, gate, noise=noise, noise_std="raw", seed=11,
                                    step=3, modality=1)
            flags.append({launch["kwargs"]["ALIGNED"] for launch in launches
                          if "ALIGNED" in launch["kwargs"]})
            results.append([t.clone() for t in ts])
        assert flags == [{True}, {False}]
        ref = [x.clone() for x in src]
        reference.modulate_bucket_(ref, offs, k, gate, noise=noise, noise_std="raw", seed=11,
                                   step=3, modality=1)
        for a, b, r in zip(results[0], results[1], ref):
            assert torch.equal(a, b)  # same bits whichever variant
            if not noise:
                assert torch.equal(a, r)
            else:
                tol = {torch.float32: 1e-5, torch.float64: 1e-5, torch.float16: 2e-3,
                       torch.bfloat16: 1.6e-2}[dtype]
                torch.testing.assert_close(a.double(), r.double(), rtol=tol, atol=tol)


# ---------------------------------------------------------------------- MMPareto's combine
def test_mmpareto_combine_reads_each_pair_twice_and_writes_once():
    numels = [7, 5000, 0, 65537, 3]
    n = sum(numels)
    for es in (2, 4, 8):
        t = bm.mmpareto_combine(numels, es)
        # grad_reads_per_elem counts reads of one tensor: two passes over two tensors
        assert bm.grad_reads_per_elem(t, n, es) == 4
        assert sum(x.grad_written for x in t) == n * es
        assert [x.launches for x in t] == [1, 1, 1]
    big = [1 << 22, 1 << 20]
    b = bm.bytes_per_elem(bm.mmpareto_combine(big, 4), sum(big))
    assert bm.FLOOR_BYTES_PER_ELEM["mmpareto"] <= b < bm.FLOOR_BYTES_PER_ELEM["mmpareto"] + 0.1


def test_mmpareto_model_is_the_launchers():
    """The recorded launches of the combine ops are the model's kernels and grids."""
    pytest.importorskip("triton")
    from mmmod.backends.triton import TritonBackend, combine
    from tools import aot
    be = TritonBackend()
    g = torch.Generator().manual_seed(1)
    for scaled in (False, True):
        numels = [int(x) for x in torch.randint(1, 20000, (4,), generator=g)] + [0]
        fused = [torch.empty(n) for n in numels]
        summed = [torch.empty(n) for n in numels]
        scale = torch.ones(1, dtype=torch.float64) if scaled else None
        moments = torch.ones(len(numels), 3, dtype=torch.float64)
        with aot.record_launches(execute=False) as launches:
            combine.pair_moments(be, fused, summed, scale)
            combine.combine_(be, summed, fused, moments, [2, len(numels) - 2], 1.5, scale)
        model = bm.mmpareto_combine(numels, 4, scaled)
        assert [launch["kernel"].split(":")[1] for launch in launches] == [t.kernel for t in model]
        chunks = sum(-(-n // bm.TRITON_BLOCK) for n in numels)
        assert [launch["grid"] for launch in launches] == [[chunks], [4], [chunks]]
        assert combine.BLOCK == bm.TRITON_BLOCK
