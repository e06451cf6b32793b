"""Every launch of the Triton backend compiles ahead of time for real GPU targets (no GPU needed).

The interpreter the other Triton tests use accepts code the compiler rejects and hides what the
compiler does to the arithmetic, so here ``python -m tools.aot`` (in a subprocess,
without ``TRITON_INTERPRET``, into an empty ``TRITON_CACHE_DIR``) records the launches the
backend's launchers make over a matrix of inputs, dedupes them by compiled signature, compiles
the full matrix for sm_90 and a representative subset for sm_80 / sm_100 / sm_120 (all of them
would take about three times as long), runs ptxas -v on the PTX and counts instructions.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # tools/ is a package of the source tree

pytest.importorskip("triton")

MODULATION = ("_modulate_noise_kernel", "_scale_kernel")
STATISTICS = ("_stats_partial_kernel", "_sigma_kernel", "_moments_kernel")
COMBINE = ("_pair_moments_kernel", "_pair_moments_finish_kernel", "_combine_kernel")
PARTIALS_ONLY = ("_sigma_kernel", "_moments_kernel")  # read the chunk partials, no gradient
GRADIENT_OR_LOGIT_READERS = MODULATION + ("_stats_partial_kernel", "_scores_partial_kernel")


def _env(cache):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the real @jit kernels, not the interpreter's
    env["TRITON_CACHE_DIR"] = str(cache)
    return env


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    d = tmp_path_factory.mktemp("aot")
    cache = d / "cache"
    cache.mkdir()
    out = d / "report.json"
    proc = subprocess.run([sys.executable, "-m", "tools.aot", "--jobs", "2",
                           "--json", str(out)], env=_env(cache), capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert out.exists(), f"aot did not write a report:\n{proc.stdout}\n{proc.stderr[-8000:]}"
    rep = json.loads(out.read_text())
    rep["cache_files"] = sum(len(f) for _, _, f in os.walk(cache))
    rep["stderr"] = proc.stderr
    return rep


def _ok(report, control=False):
    return [r for r in report["results"] if "error" not in r and r["control"] == control]


def test_every_launch_compiles_for_every_target(report):
    errors = [r for r in report["results"] if "error" in r]
    assert not errors, "\n\n".join(f"{r['kernel']} sm_{r['cc']} [{r['label']}]:\n{r['error']}"
                                   for r in errors)
    assert report["cache_files"] > 0  # the empty cache given was the one compiled into
    kernels = {r["kernel"] for r in report["results"]}
    assert kernels == {"_scores_partial_kernel", "_finish_kernel", "_stats_partial_kernel",
                       "_sigma_kernel", "_moments_kernel", "_modulate_noise_kernel",
                       "_scale_kernel",
                       "_proximal_kernel", "_proximal_finish_kernel",
                       "_pair_moments_kernel", "_pair_moments_finish_kernel", "_combine_kernel",
                       "_fused_sgd_kernel", "_fused_adam_kernel"}
    for cc in (80, 90, 100, 120):
        assert {r["kernel"] for r in report["results"] if r["cc"] == cc} == kernels, cc
    full = [r for r in _ok(report) if r["cc"] == 90]
    assert len(full) == len(report["units"])  # sm_90: every distinct variant
    # the sm_90a / sm_100a / sm_120a PTX targets Triton picks for these capabilities
    assert {r["ptx_target"] for r in _ok(report) if r["cc"] == 80} == {"sm_80"}
    assert {r["ptx_target"] for r in _ok(report) if r["cc"] == 90} == {"sm_90a"}


def test_launch_matrix_covers_what_the_launchers_produce(report):
    """The recorded variants span dtypes, M, step kinds, bucket kinds and method codes."""
    seen = {}
    for u in report["units"]:
        kernel = u["launch"]["kernel"].split(":")[1]
        kw = {k: (v["tl_dtype"] if isinstance(v, dict) else v)
              for k, v in u["launch"]["kwargs"].items()}
        for k, v in kw.items():
            seen.setdefault((kernel, k), set()).add(v)
        if kernel == "_scores_partial_kernel":
            dts = {a["tensor"] for a in u["launch"]["args"][0]["tuple"]}
            seen.setdefault((kernel, "dtypes", kw["M"]), set()).update(dts)
    all_dt = {"fp32", "fp16", "bf16", "fp64"}
    for kernel in ("_scale_kernel", "_modulate_noise_kernel", "_stats_partial_kernel"):
        assert seen[(kernel, "DT")] == all_dt
        assert seen[(kernel, "enable_fp_fusion")] == {False}
        assert seen[(kernel, "ALIGNED")] == {True, False}
    assert seen[("_scale_kernel", "FLAT")] == {True, False}
    assert seen[("_modulate_noise_kernel", "STEP_PTR")] == {True, False}
    assert seen[("_sigma_kernel", "SCALED")] == {True, False}
    assert seen[("_finish_kernel", "METHOD")] == {0, 1, 2}
    assert seen[("_finish_kernel", "M")] == {2, 3, 4}
    for m in (2, 3, 4):
        assert seen[("_scores_partial_kernel", "dtypes", m)] >= {"float32", "float16",
                                                                   "bfloat16", "float64"}
    # duplicates were removed: fewer compiled variants than launches
    assert len(report["units"]) < report["n_launches"]


def test_no_register_spills_in_modulation_and_statistics(report):
    rows = [r for r in _ok(report) if r["kernel"] in MODULATION + STATISTICS + COMBINE]
    assert rows
    spills = [f"{r['kernel']} sm_{r['cc']} [{r['label']}]: {r['spill_stores']} B stores, "
              f"{r['spill_loads']} B loads\n{r['ptxas_log']}" for r in rows
              if r["spill_stores"] or r["spill_loads"]]
    assert not spills, "\n".join(spills)
    assert all(r["registers"] and r["registers"] <= 255 for r in _ok(report))


def test_modulation_rounds_each_step(report):
    """No FMA contraction and a correctly rounded sqrt in the modulation kernels."""
    for r in _ok(report):
        c = r["ptx_counts"]
        assert c["sqrt_approx"] == 0, r["label"]
        assert c["contractible_f32"] == 0, (r["kernel"], r["label"])  # every f32 op is .rn
        assert c["div_approx"] == 0, (r["kernel"], r["label"])
        if r["kernel"] == "_scale_kernel":
            assert c["fma_f32"] == c["fma_f64"] == 0
        if r["kernel"] == "_modulate_noise_kernel":
            assert c["sqrt_rn"] > 0 and c["lg2_approx"] == c["sin_approx"] == c["cos_approx"] == 0
    # the control (same variant, contraction on) shows what fusion off removed: exactly the
    # k * g + sigma * n of every element a thread holds; the fmas left are libdevice's own
    controls = {(r["kernel"], r["unit"]): r for r in _ok(report, control=True)}
    plain = {(r["kernel"], r["unit"]): r for r in _ok(report) if r["cc"] == 90}
    key = next(k for k in controls if k[0] == "_modulate_noise_kernel")
    on, off = controls[key], plain[key]
    kw = next(u for u in report["units"] if u["id"] == key[1])["launch"]["kwargs"]
    per_thread = 4 * kw["BLOCK_C"] // (32 * kw["num_warps"])
    assert on["ptx_counts"]["fma_f32"] - off["ptx_counts"]["fma_f32"] == per_thread
    assert on["ptx_counts"]["contractible_f32"] > 0  # the check above can fail


def test_block_offsets_are_64_bit(report):
    """Offsets into gradients and logits are int64 (a tensor past 2**31 elements works)."""
    for r in _ok(report):
        if r["kernel"] in GRADIENT_OR_LOGIT_READERS:
            t = r["ttir_counts"]
            assert t["block_addptr_i32"] == 0 and t["block_addptr_i64"] > 0, (r["kernel"],
                                                                                r["label"])


SPECIALIZATION_PROBE = r"""
import json, torch
from mmmod.backends.triton import TritonBackend
from tools import aot
be = TritonBackend()
ts, one = [torch.empty(50)], torch.ones(1)
keys, sigs = {}, []
with aot.record_launches(execute=False) as launches:
    for v in (0, 1, 2, 16, 2**31 - 1, 2**31, 2**32 + 5, 2**63 - 1, -1, -2**63):
        be.modulate_bucket_(ts, [0], one, one, noise=True, noise_std="raw", seed=v,
                            step=v, modality=1 if v == 1 else 0)
for launch in launches:
    if launch["kernel"].endswith("_modulate_noise_kernel"):
        keys[aot.variant_key(launch)] = 1
        sigs.append(aot.specialize(launch, 90)[2])
sig = {k: sigs[0][k] for k in ("seed", "step", "modality")}
print(json.dumps({"variants": len(keys), "sig": sig, "launches": len(sigs)}))
"""


def test_seed_and_step_crossing_2_31_add_no_compile_variant(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SPECIALIZATION_PROBE], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["launches"] == 10
    assert out["variants"] == 1
    assert out["sig"] == {"seed": "i64", "step": "i64", "modality": "i32"}


ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}


def _kwargs(report, r):
    kw = next(u for u in report["units"] if u["id"] == r["unit"])["launch"]["kwargs"]
    return {k: (v["tl_dtype"] if isinstance(v, dict) else v) for k, v in kw.items()}


def _bytes_per_thread(r, kw):
    """(elements a thread holds in one program, bytes per element) of a gradient kernel."""
    threads = 32 * kw["num_warps"]
    per_prog = 4 * kw["BLOCK_C"] if r["kernel"] == "_modulate_noise_kernel" else kw["BLOCK"]
    return per_prog // threads, ELEMENT_BYTES[kw["DT"]]


def _vector_bytes(r, op):
    return 16 * r["global_access"][op].get("16", 0)


def test_aligned_inputs_take_16_byte_accesses(report):
    """On aligned inputs the modulation and statistics kernels read (and the modulation kernels
    write) every element of a full chunk through 16-byte vector accesses, exactly once: the
    16-byte instructions of the PTX carry elements-per-thread x element-size bytes. Without
    the alignment hint (table pointers carry none) they fall back to scalar accesses: the
    unaligned variants have no 16-byte access to the gradient, which shows the check can fail."""
    checked = {True: 0, False: 0}
    for r in _ok(report):
        if r["kernel"] not in MODULATION + STATISTICS or r["kernel"] in PARTIALS_ONLY:
            continue
        kw = _kwargs(report, r)
        if kw.get("FLAT"):
            continue  # a flat range's alignment is the argument's own specialisation
        elems, size = _bytes_per_thread(r, kw)
        where = (r["kernel"], r["cc"], r["label"])
        if kw["ALIGNED"]:
            assert _vector_bytes(r, "ld") == elems * size, where
            if r["kernel"] in MODULATION:
                assert _vector_bytes(r, "st") == elems * size, where
        else:
            assert _vector_bytes(r, "ld") == 0 and _vector_bytes(r, "st") == 0, where
        checked[kw["ALIGNED"]] += 1
    assert checked[True] >= 12 and checked[False] >= 3, checked


def test_ogm_ge_reads_a_gradient_twice_and_writes_it_once(report):
    """The OGM-GE launches of one aligned bucket (statistics, sigma, noisy rescale) read each
    gradient element twice and write it once, counted from the compiled PTX (16-byte accesses
    per thread over the bytes a thread owns), and the byte model (benchmarks/byte_model.py)
    says the same: 12 B/element for float32."""
    from benchmarks import byte_model
    reads = {}
    writes = {}
    for r in _ok(report):
        kw = _kwargs(report, r)
        if r["cc"] != 90 or not kw.get("ALIGNED") or kw.get("FLAT"):
            continue
        if r["kernel"] not in ("_stats_partial_kernel", "_modulate_noise_kernel"):
            continue  # _sigma_kernel reads partials only, never a gradient
        elems, size = _bytes_per_thread(r, kw)
        key = (r["kernel"], kw["DT"])
        reads[key] = _vector_bytes(r, "ld") / (elems * size)
        writes[key] = _vector_bytes(r, "st") / (elems * size)
    for dt, size in ELEMENT_BYTES.items():
        total_reads = reads[("_stats_partial_kernel", dt)] + reads[("_modulate_noise_kernel", dt)]
        total_writes = (writes[("_stats_partial_kernel", dt)]
                        + writes[("_modulate_noise_kernel", dt)])
        assert total_reads == 2 and total_writes == 1, (dt, reads, writes)
        traffic = byte_model.triton_modulation([5000, 7, 3], size, noise=True)
        assert byte_model.grad_reads_per_elem(traffic, 5010, size) == total_reads
        assert sum(t.grad_written for t in traffic) == total_writes * 5010 * size
