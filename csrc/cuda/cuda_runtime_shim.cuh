// The CUDA runtime, device types and WMMA for the kernels: the toolkit's
// headers, or -- in the test builds that run the kernels on a CPU
// (-DFASTMINE_CUDA_EMULATION) -- the host emulation, tests/csrc/emulation/
// cuda_emulation.h, which only those builds have on their include path.
// The one place production sources name the emulation.
#pragma once

#if defined(FASTMINE_CUDA_EMULATION)
#include "cuda_emulation.h"
#else
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>
#endif
