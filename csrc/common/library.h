#pragma once
// The op namespace and the dispatch key CUDA kernels register under. The SIMT emulation build
// (tests only) compiles the same sources into "fsskern_simt", registering the CUDA kernels for
// CPU tensors, so it can be loaded beside the real library and compared with it.
#include <torch/library.h>

#if defined(FSSKERN_SIMT)
#define FSSKERN_NAMESPACE fsskern_simt
#define FSSKERN_CUDA_KEY CPU
#else
#define FSSKERN_NAMESPACE fsskern
#define FSSKERN_CUDA_KEY CUDA
#endif
