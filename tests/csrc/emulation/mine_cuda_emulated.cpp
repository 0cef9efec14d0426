// The torch launcher of the CUDA backend (csrc/cuda/mine_cuda.cu) built for the
// CPU over the host CUDA emulation, as the op fastmine_cuda_emulated::mine_select
// (same schema as fastmine::mine_select; CPU tensors).  Test-only: tests/
// _cuda_emulated.py builds it with torch.utils.cpp_extension.load and registers
// it as the backend "cuda-emulated", which the contract suite then covers.
#if !defined(FASTMINE_CUDA_EMULATION)
#error "build with -DFASTMINE_CUDA_EMULATION (and link cuda_emulation.cpp)"
#endif

#include "mine_cuda.cu"  // csrc/cuda, on the include path
#include "fastmine/schema.h"

TORCH_LIBRARY(fastmine_cuda_emulated, m) { m.def(FASTMINE_MINE_SELECT_SCHEMA); }
