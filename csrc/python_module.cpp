// The importable Python module `fastmine._C`.  Importing it loads the shared
// library, whose static initialisers register the fastmine:: ops with torch
// (the ops themselves are reached through torch.ops.fastmine).  Only setup.py
// builds this file; the CMake build produces a plain library for
// torch.ops.load_library.
#include <torch/extension.h>

#include <string>

#include "cpu/cpu_clones.h"

namespace {
std::string build_info() {
  std::string info = "compiler=";
#if defined(__clang__)
  info += "clang " __clang_version__;
#elif defined(__GNUC__)
  info += "gcc " __VERSION__;
#endif
#if defined(_OPENMP)
  info += "; openmp=" + std::to_string(_OPENMP);
#else
  info += "; openmp=off";
#endif
  info += std::string("; cpu_clones=") + FASTMINE_CPU_CLONE_NAMES + " (runs " +
          fastmine::cpu::clone_in_use() + ")";
#if defined(FASTMINE_WITH_CUDA)
  info += "; cuda=on";
#else
  info += "; cuda=off";
#endif
  return info;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastmine compiled kernels (ops are registered under torch.ops.fastmine)";
  m.def("build_info", &build_info, "Compiler, OpenMP and CUDA flags of this build.");
}
