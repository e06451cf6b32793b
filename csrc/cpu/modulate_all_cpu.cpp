// mmmod._C.modulate_all_cpu: the one-call CPU path of mmmod.functional.modulate_ (bound in
// csrc/module.cpp). A plain CPython function, like check_grads: the usual call (every gradient a
// contiguous CPU tensor, one dtype per modality, CPU coefficients) would otherwise pay, per call,
// a few tiny torch ops (isfinite, where, float, unbind) and one dispatcher call per modality,
// each 10-30 us with the caches cold after a pass over the gradients: measured, 0.12-0.16 ms per
// step on the 2-core EPYC, a tenth of the noise-free scaling of 22 M elements.
//
// It computes exactly what modulate_ computes through the ops: k_m = float32(coeffs[m]) and
// gate = 1 when every coefficient is finite, else k = 1 and gate = 0 (the gradients stay
// bit-for-bit untouched); each modality's non-empty tensors are one bucket run by the very code
// behind the mmmod::modulate_ CPU kernel (modulate_values_cpu). The coefficients are a CPU tensor
// read here: a memory read, not a device sync.
//
// It refuses nothing: whatever it does not handle (a tensor subclass, a CUDA or non-contiguous
// tensor, two dtypes in one modality, an inference tensor, a negative offset, coefficients that
// are not a CPU float vector of one value per modality) it declines by returning False before
// anything is written, and modulate_ takes its general path, which checks and raises. An
// unrecognised MMMOD_CPU_KERNELS raises ValueError, before anything is written, as the op does.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cmath>
#include <cstdint>
#include <exception>
#include <vector>

#include "cpu/cpu_kernels.h"
#include "common/ops.h"

namespace mmmod {
namespace cpu {

namespace {

struct Bucket {
  std::vector<at::Tensor> tensors;
  std::vector<int64_t> offsets;
};

// Modality m's bucket from its list of tensors (or None) and offsets; false: decline.
bool collect(PyObject* tensors, PyObject* offsets, Bucket& b) {
  if (!PyList_Check(tensors) || !PyList_Check(offsets) ||
      PyList_GET_SIZE(tensors) != PyList_GET_SIZE(offsets)) {
    return false;
  }
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(tensors); ++i) {
    PyObject* g = PyList_GET_ITEM(tensors, i);
    if (g == Py_None) continue;
    if (!THPVariable_CheckExact(g)) return false;
    const at::Tensor& t = THPVariable_Unpack(g);
    if (t.numel() == 0) continue;
    if (!t.device().is_cpu() || !t.is_contiguous() || t.is_inference() ||
        !at::isFloatingType(t.scalar_type()) ||
        (!b.tensors.empty() && t.scalar_type() != b.tensors[0].scalar_type())) {
      return false;
    }
    PyObject* o = PyList_GET_ITEM(offsets, i);
    if (!PyLong_Check(o)) return false;
    const long long off = PyLong_AsLongLong(o);
    if (off < 0) {  // also -1 with an overflow error set
      PyErr_Clear();
      return false;
    }
    b.tensors.push_back(t);
    b.offsets.push_back(off);
  }
  return true;
}

}  // namespace

// modulate_all_cpu(grads, offsets, coeffs, noise, scaled, seed, step) -> bool, with grads a list
// (one per modality) of lists of tensors or None, offsets the matching lists of stream offsets,
// seed and step already reduced as the ops take them (int64 seed, step mod 2^32).
PyObject* modulate_all_cpu(PyObject*, PyObject* args) {
  PyObject *grads = nullptr, *offsets = nullptr, *coeffs_obj = nullptr;
  int noise = 0, scaled = 0;
  long long seed = 0, step = 0;
  if (!PyArg_ParseTuple(args, "OOOppLL", &grads, &offsets, &coeffs_obj, &noise, &scaled, &seed,
                        &step)) {
    return nullptr;
  }
  try {
    if (!PyList_Check(grads) || !PyList_Check(offsets) || !THPVariable_CheckExact(coeffs_obj) ||
        PyList_GET_SIZE(grads) != PyList_GET_SIZE(offsets)) {
      Py_RETURN_FALSE;
    }
    const Py_ssize_t M = PyList_GET_SIZE(grads);
    const at::Tensor& coeffs = THPVariable_Unpack(coeffs_obj);
    if (!coeffs.device().is_cpu() || coeffs.dim() != 1 || coeffs.size(0) != M ||
        !at::isFloatingType(coeffs.scalar_type())) {
      Py_RETURN_FALSE;
    }
    std::vector<Bucket> buckets(static_cast<size_t>(M));
    for (Py_ssize_t m = 0; m < M; ++m) {
      if (!collect(PyList_GET_ITEM(grads, m), PyList_GET_ITEM(offsets, m), buckets[m])) {
        Py_RETURN_FALSE;
      }
    }
    kernels_for_op();  // may raise (a bad MMMOD_CPU_KERNELS): before anything is written
    // k = where(isfinite(coeffs).all(), coeffs.float(), 1), gate = that condition as a float
    std::vector<double> c(static_cast<size_t>(M));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, coeffs.scalar_type(), "mmmod_modulate_all_cpu", [&] {
      const scalar_t* p = coeffs.const_data_ptr<scalar_t>();
      for (Py_ssize_t m = 0; m < M; ++m) c[m] = static_cast<double>(p[m * coeffs.stride(0)]);
    });
    bool ok = true;
    for (double v : c) ok = ok && std::isfinite(v);
    const float gate = ok ? 1.0f : 0.0f;
    std::exception_ptr failed;  // nothing below fails on checked inputs; never unwind past the GIL
    Py_BEGIN_ALLOW_THREADS
    try {
      for (Py_ssize_t m = 0; m < M; ++m) {
        const Bucket& b = buckets[m];
        if (b.tensors.empty()) continue;
        // float32 rounding of the coefficient as coeffs.float() does it (round to nearest)
        const float k = ok ? static_cast<float>(c[m]) : 1.0f;
        modulate_values_cpu(b.tensors, b.offsets, k, gate, noise != 0, scaled != 0, seed, step,
                            static_cast<int64_t>(m));
        // what the op's in-place schema does for autograd: the tensors' versions move on
        for (const at::Tensor& t : b.tensors) t.unsafeGetTensorImpl()->bump_version();
      }
    } catch (...) {
      failed = std::current_exception();
    }
    Py_END_ALLOW_THREADS
    if (failed) std::rethrow_exception(failed);
    Py_RETURN_TRUE;
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

}  // namespace cpu
}  // namespace mmmod
