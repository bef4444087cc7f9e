// The fsskern operator library. Each op declares its schema in its own ops/<op>.cpp with
// TORCH_LIBRARY_FRAGMENT; this file opens the namespace and answers what the build contains.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers only (setup.py)
#include "common/library.h"

#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include <algorithm>
#include <string>

#ifndef FSSKERN_WITH_CUDA
#define FSSKERN_WITH_CUDA 0
#endif
// The compile flags, from setup.py or CMakeLists.txt, as one token with "_" for spaces.
#ifndef FSSKERN_CXX_FLAGS
#define FSSKERN_CXX_FLAGS unknown
#endif
#define FSSKERN_STRINGIFY_(x) #x
#define FSSKERN_STRINGIFY(x) FSSKERN_STRINGIFY_(x)

namespace fsskern {

std::string build_info() {
  std::string info = "cuda=" + std::to_string(FSSKERN_WITH_CUDA);
  info += ";cpu_dispatch=";
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  info += "x86-64-v4+vpopcntdq,x86-64-v4,x86-64-v3,default";  // the first for bit-counting loops only
#else
  info += "default";
#endif
  info += ";compiler=" __VERSION__;
  std::string flags = FSSKERN_STRINGIFY(FSSKERN_CXX_FLAGS);
  std::replace(flags.begin(), flags.end(), '_', ' ');
  info += ";cxx_flags=" + flags;
  return info;
}

TORCH_LIBRARY(FSSKERN_NAMESPACE, m) {
  m.def("_build_info() -> str", &build_info);
}

// The backward ops have no derivative of their own: under create_graph (double backward) they must raise.
// Without an Autograd kernel torch's fallback only warns and treats their outputs as constants, so a second
// derivative came out silently wrong.
TORCH_LIBRARY_IMPL(FSSKERN_NAMESPACE, Autograd, m) {
  for (const char* op : {"_masked_average_pool_backward_features", "_masked_average_pool_backward_masks",
                         "_max_cosine_backward", "_cluster_means_backward", "_prototype_attention_backward",
                         "_local_conditional_attention_backward"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}

}  // namespace fsskern
