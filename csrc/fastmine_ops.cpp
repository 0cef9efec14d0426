// The op schemas of the compiled backends: one schema, one implementation per
// device (csrc/cpu/*.cpp registers CPU, csrc/cuda/*.cu registers CUDA).
// Fake (meta) implementations live in fastmine/_ops.py.
#include <torch/library.h>

#include "fastmine/schema.h"

TORCH_LIBRARY(fastmine, m) { m.def(FASTMINE_MINE_SELECT_SCHEMA); }
