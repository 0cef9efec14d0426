// The torch launchers of the CUDA backend (csrc/cuda/mine_cuda.cu,
// mine_topk_cuda.cu) built for the CPU over the host CUDA emulation: the ops
// fastmine::mine_cuda_emulated, mine_backward_cuda_emulated and
// mine_topk_cuda_emulated, and fastmine_cuda_emulated::mine_select (same schema
// as fastmine::mine_select; CPU tensors).  Test-only: tests/
// _cuda_emulated.py builds it with torch.utils.cpp_extension.load and registers
// it as the backend "cuda-emulated", which the contract suite then covers.
#if !defined(FASTMINE_CUDA_EMULATION)
#error "build with -DFASTMINE_CUDA_EMULATION (and link cuda_emulation.cpp)"
#endif

#include "mine_cuda.cu"       // csrc/cuda, on the include path
#include "mine_topk_cuda.cu"  // fastmine::mine_topk_cuda_emulated (top-k, distance-weighted)
#include "fastmine/schema.h"

TORCH_LIBRARY(fastmine_cuda_emulated, m) { m.def(FASTMINE_MINE_SELECT_SCHEMA); }
