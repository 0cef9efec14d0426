// The GPU self-test (tests/csrc/selftest.cu), compiled as C++ over the host CUDA
// emulation: build with -DFASTMINE_CUDA_EMULATION and link cuda_emulation.cpp
// (CMake: -DFASTMINE_CUDA_EMULATION=ON; tests/test_cuda_emulation.py).
#include "../selftest.cu"
