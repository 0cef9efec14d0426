// The one list of forward kernel variants: (input type, dot path).  Both the
// torch extension (mine_cuda.cu) and the self-test (selftest.cu) expand it, so
// the self-test instantiates exactly the templates the extension ships; each
// variant instantiates mine_select_launch<T, P>, i.e. its forward kernels for
// every distance x pass, plus pair_backward_launch<T> for every distance.
//   X(type, DotPath member, short name)
#pragma once
#include "mine_kernels.cuh"

#define FASTMINE_CUDA_VARIANTS(X)                   \
  X(__half, Wmma, "float16/wmma")                   \
  X(__nv_bfloat16, Wmma, "bfloat16/wmma")           \
  X(float, Tf32, "float32/tf32")                    \
  X(float, Ffma, "float32/ffma")                    \
  X(double, Ffma, "float64/ffma")
