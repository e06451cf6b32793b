"""The one CUDA metadata table (csrc/cuda/multi_tensor.h) as its builder makes it
(csrc/cuda/multi_tensor_builder.h) and as the kernels' view reads it, without a GPU: the builder
is standard C++, so a small harness compiled by the host compiler (loaded with ctypes) builds the
tables of the ops' layouts and walks them through ``TensorListTable::view`` (its host form).

Checked: the word layout (header, entries with their pointers, size, extra words, first chunk
and chunk count, then the chunks), the bucket table's size being ``mmmod._ops.table_words`` (what
``bucket_table``'s fake and the capturable path rely on), empty tensors keeping their entry and
owning no chunk, doubles stored bit for bit, and the view placing every section where the builder
wrote it."""
import ctypes
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

import mmmod._ops as ops

ROOT = Path(__file__).resolve().parents[2]

_HARNESS = r'''
#include "cuda/cuda_api.h"
#include "cuda/fused_update_api.h"
#include "cuda/multi_tensor_builder.h"

using namespace mmmod;

// the bucket table (modulate_) of n tensors: pointer 0x1000 (i + 1), numel[i], offset[i]
extern "C" int64_t build_bucket(const int64_t* numel, const int64_t* offset, int64_t n,
                                int64_t* out, int64_t cap) {
  mt::TableBuilder<bucket::kDepth, bucket::kExtra> b(MMMOD_CUDA_CHUNK);
  for (int64_t i = 0; i < n; ++i) {
    b.add({reinterpret_cast<const void*>(0x1000 * (i + 1))}, numel[i], {offset[i]});
  }
  const std::vector<int64_t> w = b.words();
  for (size_t i = 0; i < w.size() && static_cast<int64_t>(i) < cap; ++i) out[i] = w[i];
  return static_cast<int64_t>(w.size());
}

// the fused update's table: four pointers 0x10 (4 i + d + 1), extra {offset, flag, two doubles}
extern "C" int64_t build_fused(const int64_t* numel, const double* d0, const double* d1, int64_t n,
                               int64_t* out, int64_t cap) {
  mt::TableBuilder<fused::kDepth, fused::kExtra> b(MMMOD_FUSED_CHUNK);
  for (int64_t i = 0; i < n; ++i) {
    std::array<const void*, 4> p;
    for (int d = 0; d < 4; ++d) p[d] = reinterpret_cast<const void*>(0x10 * (4 * i + d + 1));
    b.add(p, numel[i], {7 * i, i % 2, mt::double_as_word(d0[i]), mt::double_as_word(d1[i])});
  }
  const std::vector<int64_t> w = b.words();
  for (size_t i = 0; i < w.size() && static_cast<int64_t>(i) < cap; ++i) out[i] = w[i];
  return static_cast<int64_t>(w.size());
}

// chunk c of a fused table through the kernels' view: {tensor, start, len, ptr[3], offset,
// the first double}
extern "C" void fused_chunk(const int64_t* words, int64_t c, int64_t* out, double* dout) {
  const auto tb = fused::Table::view(words, words[0], words[1]);
  const mt::ChunkEntry ch = tb.chunks[c];
  const auto te = tb.tensors[ch.tensor];
  out[0] = ch.tensor;
  out[1] = ch.start;
  out[2] = mt::chunk_len(te, ch, MMMOD_FUSED_CHUNK);
  out[3] = te.ptr[fused::kState2];
  out[4] = te.extra[fused::kOffset];
  dout[0] = mt::word_as_double(te.extra[fused::kNegStepSize]);
}
'''


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("needs a host C++ compiler")
    d = tmp_path_factory.mktemp("multi_tensor")
    (d / "harness.cpp").write_text(_HARNESS)
    lib = d / "libmt.so"
    out = subprocess.run([cxx, "-std=c++17", "-shared", "-fPIC", "-O1", "-Wall", "-Werror",
                          "-I" + str(ROOT / "csrc"), str(d / "harness.cpp"), "-o", str(lib)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    h = ctypes.CDLL(str(lib))
    for fn in (h.build_bucket, h.build_fused):
        fn.restype = ctypes.c_int64
    return h


def _i64(xs):
    return (ctypes.c_int64 * max(len(xs), 1))(*xs)


def _f64(xs):
    return (ctypes.c_double * len(xs))(*xs)


def _build(fn, *args, n):
    cap = 4096
    out = (ctypes.c_int64 * cap)()
    size = fn(*args, ctypes.c_int64(n), out, ctypes.c_int64(cap))
    assert size <= cap
    return list(out[:size])


def _chunks(numels, chunk):
    return [(t, s) for t, n in enumerate(numels) for s in range(0, n, chunk)]


def test_bucket_table_layout_is_what_python_sees(harness):
    C = ops.CUDA_CHUNK
    numels = [70000, 0, 3, 2 * C, C + 1]
    offsets = [0, 70000, 70000, 70003, 70003 + 2 * C]
    words = _build(harness.build_bucket, _i64(numels), _i64(offsets), n=len(numels))
    chunks = _chunks(numels, C)
    assert len(words) == ops.table_words(len(numels), len(chunks))
    want = [len(numels), len(chunks)]
    first = 0
    for t, (n, off) in enumerate(zip(numels, offsets)):
        count = -(-n // C)
        want += [0x1000 * (t + 1), n, off, first, count]  # {ptr, numel, offset, first, count}
        first += count
    for t, s in chunks:
        want += [t, s]
    assert words == want


def test_fused_table_doubles_and_view(harness):
    C = 16384  # MMMOD_FUSED_CHUNK
    numels = [C + 5, 0, 2 * C]
    d0 = [-0.1, float("inf"), -1e-300]
    d1 = [0.5, 2.0, 3.0]
    words = _build(harness.build_fused, _i64(numels), _f64(d0), _f64(d1), n=len(numels))
    chunks = _chunks(numels, C)
    assert words[:2] == [len(numels), len(chunks)]
    assert len(words) == 2 + 11 * len(numels) + 2 * len(chunks)
    entry = words[2 + 11:2 + 22]  # the empty tensor keeps its entry, with no chunk
    assert entry[4] == 0 and entry[10] == 0
    assert struct.unpack("<d", struct.pack("<q", entry[7]))[0] == float("inf")
    out, dout = (ctypes.c_int64 * 5)(), (ctypes.c_double * 1)()
    table = _i64(words)
    for c, (t, s) in enumerate(chunks):
        harness.fused_chunk(table, ctypes.c_int64(c), out, dout)
        assert list(out) == [t, s, min(C, numels[t] - s), 0x10 * (4 * t + 4), 7 * t]
        assert dout[0] == d0[t]  # bit for bit (-1e-300 included)
