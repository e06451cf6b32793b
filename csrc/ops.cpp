// The mmmod operators are defined in Python (mmmod/ops.py: schemas, fake implementations and the
// plain-torch reference as the default implementation), so they exist whether or not this
// extension is built. The binaries only add device kernels with TORCH_LIBRARY_IMPL(mmmod, ...)
// (cpu_kernels.cpp, cuda_ops.cpp) and must never define an op again: mmmod._ext imports
// mmmod.ops before it loads a binary, and refuses a stale one without loading it.
//
// Conventions every kernel follows: no op reads a device value on the host (k and gate arrive
// as 0-d device tensors, seed/step/modality as integers, or the step as a 0-d device counter
// in modulate_.capturable); the metadata checks shared by the CPU and CUDA kernels live in
// checks.cpp.
