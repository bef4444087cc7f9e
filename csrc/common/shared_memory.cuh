#pragma once
// Shared-memory declarations for kernels. Under nvcc these are plain __shared__ arrays; in the
// SIMT emulation build they are checked views (simt/shared.h) that catch out-of-bounds indices,
// reads of unwritten memory and races. Kernels declare shared memory only through these.
#if defined(FSSKERN_SIMT)
#include "simt/simt.h"
#define FSSKERN_SHARED_KEY [] { static const char key = 0; return &key; }()
#define FSSKERN_SHARED_ARRAY(T, name, n) const ::fsskern::simt::SharedArray<T, (n)> name(#name, FSSKERN_SHARED_KEY)
#define FSSKERN_SHARED_ARRAY2D(T, name, rows, cols) \
  const ::fsskern::simt::SharedArray2D<T, (rows), (cols)> name(#name, FSSKERN_SHARED_KEY)
#define FSSKERN_DYNAMIC_SHARED(T, name) const auto name = ::fsskern::simt::dynamic_shared<T>(#name)
#else
#define FSSKERN_SHARED_ARRAY(T, name, n) __shared__ T name[n]
#define FSSKERN_SHARED_ARRAY2D(T, name, rows, cols) __shared__ T name[rows][cols]
// One byte array for the whole dynamic segment, viewed as T (extern __shared__ arrays of
// different types in one translation unit would clash).
#define FSSKERN_DYNAMIC_SHARED(T, name)                                 \
  extern __shared__ __align__(16) unsigned char fsskern_dynamic_shared_[]; \
  T* name = reinterpret_cast<T*>(fsskern_dynamic_shared_)
#endif
