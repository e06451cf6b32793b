"""Global-memory bytes and launches of every GPU kernel per step, and the time they imply.

No GPU is needed: this is the design count the first GPU run is compared against. Each
function below models one kernel (the same formula is stated in a comment next to the kernel
in kernels/*.py or csrc/cuda/kernels.cu) as a :class:`Traffic`: launches, gradient bytes read and
written (DRAM: a gradient is far larger than L2), and the small side traffic (metadata table,
chunk partials, sigma, k; counted as DRAM bytes too, an upper bound). Summed per modality
bucket and step they give the ``B/elem`` of a backend; ``expected_seconds`` turns bytes and
launches into time with a copy bandwidth and a per-launch cost.

tests/backends/test_byte_model.py checks the model against the code (chunk counts from the real bucket
tables, gradient reads per element against the 16-byte accesses counted in the compiled PTX by
tests/kernels/test_triton_aot.py and in the CUDA cubin) and the 12 B/element floor of OGM-GE.

    python -m benchmarks.byte_model [--markdown]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Sequence

#: Triton backend block sizes (mmmod/backends/triton/__init__.py TritonBackend)
TRITON_BLOCK = 4096
TRITON_BLOCK_C = 256  # Philox counters per noise program (4 * 256 elements)
#: CUDA extension chunk (csrc/cuda/cuda_api.h MMMOD_CUDA_CHUNK)
CUDA_CHUNK = 65536

#: Assumed device numbers for the expected times (replace with measured ones: the copy
#: bandwidth of benchmarks/bandwidth.py on the machine). Peak HBM bandwidth is the vendor's
#: (H100 SXM5 HBM3 3.35 TB/s, H200 HBM3e 4.8 TB/s); a device-to-device copy reaches about 88 %
#: of it, the figure used here. ``launch_s``: the gap one more kernel launch adds to an eager
#: stream of small launches (CPU-side launch cost and the GPU's kernel-to-kernel gap); about
#: 1 us inside a CUDA graph.
DEVICES = {
    "H100-SXM": {"peak_GBps": 3350.0, "copy_GBps": 0.88 * 3350.0, "launch_s": 3e-6,
                 "graph_launch_s": 1e-6},
    "H200": {"peak_GBps": 4800.0, "copy_GBps": 0.88 * 4800.0, "launch_s": 3e-6,
             "graph_launch_s": 1e-6},
}

FLOOR_BYTES_PER_ELEM = {"ogm_ge": 12, "ogm": 8,  # float32: read (stats) + read + write; r + w
                        # two reads of the (g_mm, g_sum) pair and one write of g_sum
                        "mmpareto": 20}


@dataclass(frozen=True)
class Traffic:
    """Memory traffic of one kernel (all its launches in one step of one bucket)."""
    backend: str
    kernel: str
    launches: int
    grad_read: int      # bytes of gradient data read
    grad_written: int   # bytes of gradient data written
    side: int           # table, partials, sigma, k, gate, labels (small)
    # update kernels only: parameter and optimizer-state bytes read + written (kept apart so
    # the gradient columns stay the gradient's)
    update_rw: int = 0

    @property
    def bytes(self) -> int:
        return self.grad_read + self.grad_written + self.side + self.update_rw


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triton_noise_chunks(numel: int, offset: int, block_c: int = TRITON_BLOCK_C) -> int:
    """Noise programs of one tensor (mmmod/backends/triton/table.py noise_chunks: Philox-counter aligned)."""
    if numel == 0:
        return 0
    return _cdiv((offset + numel - 1) // 4 - offset // 4 + 1, block_c)


def _stream_offsets(numels):
    offs, run = [], 0
    for n in numels:
        offs.append(run)
        run += n
    return offs


# ------------------------------------------------------------------------------ Triton kernels
def triton_scale(numels, es: int, flat: bool = False, block: int = TRITON_BLOCK):
    """``_scale_kernel``: g read and written once; per program the stats_map entry and three
    table words (8 + 24 B) and k (4 B); a flat bucket reads no table."""
    n = sum(numels)
    programs = _cdiv(n, block) if flat else sum(_cdiv(x, block) for x in numels)
    side = programs * (4 if flat else 8 + 24 + 4)
    return Traffic("triton", "_scale_kernel", 1, n * es, n * es, side)


def triton_stats_partial(numels, es: int, block: int = TRITON_BLOCK):
    """``_stats_partial_kernel``: g read once (the chunk's two-pass is in registers); per
    program 8 + 24 B of table, 16 B of (sum, M2) written."""
    chunks = sum(_cdiv(x, block) for x in numels)
    return Traffic("triton", "_stats_partial_kernel", 1, sum(numels) * es, 0, chunks * (32 + 16))


def triton_sigma(numels, block: int = TRITON_BLOCK):
    """``_sigma_kernel``: per tensor two table words, k and gate (24 B), the chunk sums twice
    and the M2s once (24 B per chunk), sigma written (4 B)."""
    chunks = sum(_cdiv(x, block) for x in numels)
    return Traffic("triton", "_sigma_kernel", 1, 0, 0, len(numels) * 28 + chunks * 24)


def triton_noise(numels, es: int, offsets=None, block_c: int = TRITON_BLOCK_C,
                 step_ptr: bool = False):
    """``_modulate_noise_kernel``: g read and written once; per program the noise_map entry,
    four table words, k and sigma (8 + 32 + 8 B), the step counter with STEP_PTR (8 B)."""
    offsets = _stream_offsets(numels) if offsets is None else offsets
    programs = sum(triton_noise_chunks(x, o, block_c) for x, o in zip(numels, offsets))
    n = sum(numels)
    return Traffic("triton", "_modulate_noise_kernel", 1, n * es, n * es,
                   programs * (48 + (8 if step_ptr else 0)))


def triton_scores(B: int, Cs: Sequence[int], es: int = 4, rows: int = 16):
    """``_scores_partial_kernel`` + ``_finish_kernel``: every logit read once (the online
    log-sum-exp keeps one pass over C), z[i, y_i] once more per row (the same row, an L2 hit,
    counted anyway), the labels once per modality, M partials per program written and read."""
    M = len(Cs)
    programs = _cdiv(B, rows)
    partial = Traffic("triton", "_scores_partial_kernel", 1, 0, 0,
                      sum(B * c * es for c in Cs) + M * B * es + M * B * 8 + M * programs * 4)
    finish = Traffic("triton", "_finish_kernel", 1, 0, 0, M * programs * 4 + 8 * M)
    return [partial, finish]


def triton_modulation(numels, es: int, noise: bool, flat: bool = False, offsets=None):
    """The launches of one bucket: OGM / MLB one, OGM-GE three."""
    numels = [x for x in numels if x > 0]
    if not noise:
        return [triton_scale(numels, es, flat=flat)]
    return [triton_stats_partial(numels, es), triton_sigma(numels),
            triton_noise(numels, es, offsets)]


# -------------------------------------------------------------------------------- CUDA kernels
def triton_pair_moments(numels, es: int, scaled: bool = False, block: int = TRITON_BLOCK):
    """``_pair_moments_kernel`` (MMPareto, kernels/combine_kernel.py): the pair (g_mm, g_sum)
    read once; per program the stats_map entry and four table words (8 + 32 B), the scale
    (8 B when given) and the chunk's three float64 partials written (24 B)."""
    chunks = sum(_cdiv(x, block) for x in numels)
    return Traffic("triton", "_pair_moments_kernel", 1, 2 * sum(numels) * es, 0,
                   chunks * (8 + 32 + 24 + (8 if scaled else 0)))


def triton_pair_moments_finish(numels, block: int = TRITON_BLOCK):
    """``_pair_moments_finish_kernel``: one program per tensor, two table words and its row
    index (24 B), its chunks' partials read (24 B each), its row written (24 B)."""
    chunks = sum(_cdiv(x, block) for x in numels)
    return Traffic("triton", "_pair_moments_finish_kernel", 1, 0, 0,
                   len(numels) * 48 + chunks * 24)


def triton_combine(numels, es: int, scaled: bool = False, block: int = TRITON_BLOCK):
    """``_combine_kernel``: the pair read again and g_sum written once; per program the
    stats_map entry, four table words, the row index and the tensor's two float64 factors
    (8 + 32 + 8 + 16 B), the scale (8 B when given)."""
    n = sum(numels)
    chunks = sum(_cdiv(x, block) for x in numels)
    return Traffic("triton", "_combine_kernel", 1, 2 * n * es, n * es,
                   chunks * (64 + (8 if scaled else 0)))


def mmpareto_combine(numels, es: int, scaled: bool = False):
    """MMPareto's combine of one modality bucket on the Triton backend (ops ``_pair_moments``
    and ``combine_``): 5 ``es`` bytes of gradient traffic per element (two reads of each pair,
    one write), 20 B per float32 element; the weights between the passes are O(tensors)
    float64 scalars on the device (not counted: no gradient bytes)."""
    numels = [x for x in numels if x > 0]
    return [triton_pair_moments(numels, es, scaled), triton_pair_moments_finish(numels),
            triton_combine(numels, es, scaled)]


def cuda_chunks(numels, chunk: int = CUDA_CHUNK) -> int:
    return sum(_cdiv(x, chunk) for x in numels)


def cuda_stats(numels, es: int, single_pass: bool = True, chunk: int = CUDA_CHUNK):
    """``stats_kernel``: g read once (single pass: per-thread moments of register tiles merged
    in a fixed tree); per chunk its entry and its tensor's entry (16 + 40 B), 24 B of moments
    written. ``single_pass=False`` models the previous two-pass kernel, whose second pass went
    to DRAM (about 1,000 resident blocks x 256 KB chunks is far beyond L2)."""
    c = cuda_chunks(numels, chunk)
    reads = (1 if single_pass else 2) * sum(numels) * es
    return Traffic("cuda", "stats_kernel", 1, reads, 0, c * (56 + 24))


def cuda_sigma(numels, chunk: int = CUDA_CHUNK, kernel: str = "sigma_kernel"):
    """``sigma_kernel`` / ``std_kernel``: one block per tensor; its entry (40 B), k and gate,
    its chunks' moments (24 B each), sigma (4 B; std: 8 B) written."""
    c = cuda_chunks(numels, chunk)
    return Traffic("cuda", kernel, 1, 0, 0, len(numels) * 52 + c * 24)


def cuda_noise(numels, es: int, chunk: int = CUDA_CHUNK):
    """``noise_kernel``: g read and written once; per chunk 56 B of table, k and sigma."""
    n = sum(numels)
    return Traffic("cuda", "noise_kernel", 1, n * es, n * es, cuda_chunks(numels, chunk) * 64)


def cuda_scale(numels, es: int, chunk: int = CUDA_CHUNK):
    """``scale_kernel``: g read and written once; per chunk 56 B of table and k."""
    n = sum(numels)
    return Traffic("cuda", "scale_kernel", 1, n * es, n * es, cuda_chunks(numels, chunk) * 60)


#: Rows per block of the CUDA ``scores_kernel`` (one warp per row: kThreads / 32) and
#: modalities per call (csrc/cuda/cuda_api.h MMMOD_CUDA_SCORES_MAX_M)
CUDA_SCORE_ROWS = 8
CUDA_SCORES_MAX_M = 16


def cuda_scores(B: int, Cs: Sequence[int], es: int = 4):
    """``scores_kernel`` + ``scores_finish_kernel``, one launch each per call of up to 16
    modalities (a larger M takes ceil(M / 16) calls): a warp per row, every logit read twice
    (pass 1 max, pass 2 sum of exp; at small C pass 2 mostly hits L1/L2, counted as a DRAM read
    anyway, an upper bound), z[i, y_i] and the label once more per row and modality, 8 B of
    partial per row block and modality written and read back, 4 B of score written;
    ``coefficients_kernel`` reads M scores and writes M coefficients."""
    M = len(Cs)
    calls = _cdiv(M, CUDA_SCORES_MAX_M)
    blocks = _cdiv(B, CUDA_SCORE_ROWS)
    rows = Traffic("cuda", "scores_kernel", calls, 0, 0,
                   sum(2 * B * c * es for c in Cs) + M * B * (es + 8) + M * blocks * 8)
    finish = Traffic("cuda", "scores_finish_kernel", calls, 0, 0, M * blocks * 8 + 4 * M)
    return [rows, finish, Traffic("cuda", "coefficients_kernel", 1, 0, 0, 8 * M)]


def cuda_modulation(numels, es: int, noise: bool, single_pass: bool = True):
    numels = [x for x in numels if x > 0]
    if not noise:
        return [cuda_scale(numels, es)]
    return [cuda_stats(numels, es, single_pass), cuda_sigma(numels), cuda_noise(numels, es)]


# ----------------------------------------------------------------------------------- summing
def modulation(backend: str, numels, es: int, noise: bool, **kw):
    if backend == "triton":
        return triton_modulation(numels, es, noise, **kw)
    if backend == "cuda":
        return cuda_modulation(numels, es, noise, **kw)
    raise ValueError(f"no byte model for backend {backend!r}")


def bytes_per_elem(traffic: Sequence[Traffic], numel: int) -> float:
    """The B/elem column: all bytes of the launches over the gradient elements."""
    return sum(t.bytes for t in traffic) / max(1, numel)


def grad_reads_per_elem(traffic: Sequence[Traffic], numel: int, es: int) -> float:
    return sum(t.grad_read for t in traffic) / max(1, numel * es)


def expected_seconds(traffic: Sequence[Traffic], copy_GBps: float, launch_s: float) -> float:
    """Bytes at the copy bandwidth plus a fixed cost per launch."""
    return (sum(t.bytes for t in traffic) / (copy_GBps * 1e9)
            + sum(t.launches for t in traffic) * launch_s)


def step_traffic(backend: str, buckets: Sequence[Sequence[int]], es: int, method: str,
                 B: int = 64, C: int = 6):
    """One optimizer step: scores + coefficients of the M modalities, then each modality's
    bucket (OGM-GE: noise; OGM: scale only)."""
    Cs = [C] * len(buckets)
    out = list(triton_scores(B, Cs) if backend == "triton" else cuda_scores(B, Cs))
    for numels in buckets:
        out += modulation(backend, numels, es, noise=method == "ogm_ge")
    return out


# ------------------------------------------------ the fused modulated update (docs/fused.md)
#: optimizer-state tensors per parameter, each of the parameter's dtype (torch's own state):
#: SGD with momentum the momentum buffer; Adam/AdamW exp_avg and exp_avg_sq
UPDATE_STATE = {"sgd": 1, "adamw": 2}


def inner_update(numels, es: int, kind: str):
    """The inner optimizer's step at its one-pass floor (what torch's ``fused=True`` AdamW
    kernel moves; torch's default ``foreach`` path makes several passes and moves more): per
    element the gradient read, the parameter and each state tensor read and written. One launch
    per step (torch groups the tensors of a device and dtype)."""
    n = sum(x for x in numels)
    s = UPDATE_STATE[kind]
    return Traffic("torch", f"{kind} step (one pass)", 1, n * es, 0, 0, n * es * 2 * (1 + s))


#: mmmod/backends/triton/fused_update.py BLOCK_C (Philox counters per program) and table.py
#: FUSED_FIELDS (int64 words per table row) of kernels/fused_update_kernel.py
FUSED_BLOCK_C = 256
FUSED_FIELDS = 8
#: csrc/cuda/fused_update_api.h: elements per chunk (MMMOD_FUSED_CHUNK), bytes of a tensor entry
#: (csrc/cuda/multi_tensor.h TensorListEntry<4, 4>: 4 pointers, numel, 4 extra words, first_chunk,
#: chunk_count) and of a chunk entry (ChunkEntry)
FUSED_CUDA_CHUNK = 16384
FUSED_CUDA_TENSOR_ENTRY = 88
FUSED_CUDA_CHUNK_ENTRY = 16


def fused_update(backend: str, numels, es: int, kind: str, offsets=None):
    """The fused update kernel of one bucket (Triton: kernels/fused_update_kernel.py; CUDA:
    csrc/cuda/fused_update.cu; the CPU kernel is csrc/cpu/fused_update_cpu.cpp): the gradient read once,
    the modulated gradient ``k g + sigma n`` formed in registers and never stored, the parameter
    and each state tensor read and written once. Side traffic per program (Triton) or block
    (CUDA): Triton its map entry (8 B), its tensor's table row (8 int64 words), k, sigma and the
    update scale (12 B), the scalars (9 float64) and, for Adam, the tensor's two bias
    corrections; CUDA its chunk entry (16 B), its tensor's entry (88 B, bias corrections
    included), k, sigma and the update scale (12 B); the CUDA kernel's scalars are kernel
    arguments (constant bank, no DRAM traffic)."""
    numels = [x for x in numels if x > 0]
    offsets = _stream_offsets(numels) if offsets is None else offsets
    n = sum(numels)
    s = UPDATE_STATE[kind]
    if backend == "triton":
        scalars = 9 * 8 + (16 if kind == "adamw" else 0)
        programs = sum(triton_noise_chunks(x, o, FUSED_BLOCK_C) for x, o in zip(numels, offsets))
        side = programs * (8 + 8 * FUSED_FIELDS + 12 + scalars)
    else:
        programs = cuda_chunks(numels, FUSED_CUDA_CHUNK)
        side = programs * (FUSED_CUDA_CHUNK_ENTRY + FUSED_CUDA_TENSOR_ENTRY + 12)
    return Traffic(backend, "fused_update_kernel", 1, n * es, 0, side, n * es * 2 * (1 + s))


def statistics(backend: str, numels, es: int):
    """OGM-GE's statistics launches (each tensor's sigma), the same kernels as unfused."""
    numels = [x for x in numels if x > 0]
    if backend == "triton":
        return [triton_stats_partial(numels, es), triton_sigma(numels)]
    return [cuda_stats(numels, es), cuda_sigma(numels)]


def update_step_traffic(backend: str, buckets, es: int, method: str | None, kind: str,
                        fused: bool, B: int = 64, C: int = 6):
    """One optimizer step of the inner optimizer ``kind`` over the modality buckets:
    ``method=None`` the inner step alone; unfused: :func:`step_traffic` (scores, coefficients,
    modulation) then the inner step; fused: scores, coefficients, OGM-GE's statistics, then one
    fused update per bucket."""
    numels = [x for b in buckets for x in b]
    if method is None:
        return [inner_update(numels, es, kind)]
    if not fused:
        return step_traffic(backend, buckets, es, method, B, C) + [inner_update(numels, es, kind)]
    Cs = [C] * len(buckets)
    out = list(triton_scores(B, Cs) if backend == "triton" else cuda_scores(B, Cs))
    for b in buckets:
        if method == "ogm_ge":
            out += statistics(backend, b, es)
        out.append(fused_update(backend, b, es, kind))
    return out


def fused_markdown(workload_names=("resnet18_conv", "vit_b16")) -> str:
    """The fused-update tables of docs/benchmarks.md: per inner optimizer, the step alone,
    modulation then the step, and the fused step, with the bytes the fusion adds over the step
    alone (OGM-GE: the statistics read, 4 B/elem in float32; OGM: nothing)."""
    lines = []
    for wname in workload_names:
        buckets = workload_buckets(wname)
        numel = sum(map(sum, buckets))
        lines += [f"#### Fused update, `{wname}`: {numel / 1e6:.2f} M float32 elements", "",
                  "| backend | step | launches | MB moved | B/elem | B/elem over the inner step "
                  "| H100 us (eager) | H200 us (eager) |", "|---|---|---|---|---|---|---|---|"]
        for kind in ("sgd", "adamw"):
            inner = update_step_traffic("cuda", buckets, 4, None, kind, False)
            base = sum(t.bytes for t in inner) / numel
            cases = [("-", f"{kind} alone (one pass)", inner)]
            for backend in ("triton", "cuda"):
                for method in ("ogm_ge", "ogm"):
                    for fused in (False, True):
                        label = f"{method} + {kind}" + (" fused" if fused else " (unfused)")
                        cases.append((backend, label, update_step_traffic(
                            backend, buckets, 4, method, kind, fused)))
            for backend, label, traffic in cases:
                by = sum(t.bytes for t in traffic)
                h100 = expected_seconds(traffic, DEVICES["H100-SXM"]["copy_GBps"],
                                        DEVICES["H100-SXM"]["launch_s"])
                h200 = expected_seconds(traffic, DEVICES["H200"]["copy_GBps"],
                                        DEVICES["H200"]["launch_s"])
                lines.append(f"| {backend} | {label} | {sum(t.launches for t in traffic)} "
                             f"| {by / 1e6:.2f} | {by / numel:.3f} | {by / numel - base:+.3f} "
                             f"| {h100 * 1e6:.1f} | {h200 * 1e6:.1f} |")
        lines.append("")
    return "\n".join(lines)


def workload_buckets(name: str):
    """Per-modality tensor sizes of a benchmarks/workloads.py workload (built on the meta
    device: no memory)."""
    import torch

    from . import workloads
    w = {**workloads.WORKLOADS, **workloads.SMOKE}[name]
    model = w.build_model(torch.device("meta"))
    test = w.dim_test()
    return [[p.numel() for p in getattr(model.module, f"{m}_net").parameters() if test(p.dim())]
            for m in workloads.MODALITIES2]


def gap_report(measured_s: float, traffic: Sequence[Traffic], copy_GBps: float,
               launch_s: float) -> str:
    """One line for a GPU run: measured against expected, and where the gap is (bytes moved
    at the measured rate versus the launch term)."""
    exp = expected_seconds(traffic, copy_GBps, launch_s)
    by = sum(t.bytes for t in traffic)
    eff = by / max(measured_s - sum(t.launches for t in traffic) * launch_s, 1e-12) / 1e9
    return (f"measured {measured_s * 1e6:.1f} us, expected {exp * 1e6:.1f} us "
            f"({measured_s / exp:.2f}x); {by / 1e6:.1f} MB moved at an effective "
            f"{eff:.0f} GB/s after {sum(t.launches for t in traffic)} launches x "
            f"{launch_s * 1e6:.1f} us")


def markdown(workload_names=("resnet18_conv", "resnet18_all", "vit_b16", "many_small")) -> str:
    lines = []
    for wname in workload_names:
        buckets = workload_buckets(wname)
        numel = sum(map(sum, buckets))
        lines += [f"#### `{wname}`: {numel / 1e6:.2f} M float32 gradient elements in "
                  f"{sum(map(len, buckets))} tensors, M = {len(buckets)}", "",
                  "| backend | method | kernel | launches | MB moved | B/elem "
                  "| H100 us (eager) | H200 us (eager) |", "|---|---|---|---|---|---|---|---|"]
        for backend in ("triton", "cuda"):
            for method in ("ogm_ge", "ogm"):
                traffic = step_traffic(backend, buckets, 4, method)
                per = {}
                for t in traffic:
                    a = per.setdefault(t.kernel, [0, 0])
                    a[0] += t.launches
                    a[1] += t.bytes
                for kernel, (launches, nbytes) in per.items():
                    tt = [Traffic(backend, kernel, launches, 0, 0, nbytes)]
                    h100 = expected_seconds(tt, DEVICES["H100-SXM"]["copy_GBps"],
                                            DEVICES["H100-SXM"]["launch_s"])
                    h200 = expected_seconds(tt, DEVICES["H200"]["copy_GBps"],
                                            DEVICES["H200"]["launch_s"])
                    lines.append(f"| {backend} | {method} | `{kernel}` | {launches} "
                                 f"| {nbytes / 1e6:.2f} | {nbytes / numel:.3f} "
                                 f"| {h100 * 1e6:.1f} | {h200 * 1e6:.1f} |")
                h100 = expected_seconds(traffic, DEVICES["H100-SXM"]["copy_GBps"],
                                        DEVICES["H100-SXM"]["launch_s"])
                h200 = expected_seconds(traffic, DEVICES["H200"]["copy_GBps"],
                                        DEVICES["H200"]["launch_s"])
                by = sum(t.bytes for t in traffic)
                lines.append(f"| {backend} | {method} | **step** "
                             f"| {sum(t.launches for t in traffic)} | {by / 1e6:.2f} "
                             f"| {by / numel:.3f} | {h100 * 1e6:.1f} | {h200 * 1e6:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.byte_model",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--markdown", action="store_true", help="the docs/benchmarks.md tables")
    p.add_argument("--workloads", default="resnet18_conv,resnet18_all,vit_b16,many_small")
    p.add_argument("--fused", action="store_true",
                   help="the fused-update tables (inner step alone, unfused, fused)")
    a = p.parse_args(argv)
    names = tuple(a.workloads.split(","))
    print(fused_markdown(names) if a.fused else markdown(names))


if __name__ == "__main__":
    main()
