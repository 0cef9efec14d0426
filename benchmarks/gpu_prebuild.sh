#!/usr/bin/env bash
# What a lent-GPU call carries (benchmarks/gpu_session.py), built here on the CPU
# machine so that no device time goes to compiling (the CUDA extension takes
# about 5 minutes on 2 cores, most of it one file, so 16 cores barely help):
#   .gpu_build/   fastmine._C for the GPU image (its Python 3.12 and torch
#                 2.11.0+cu130, sm_90) with its _build_config.py; the CUDA
#                 self-test (sm_90)
#   .gpu_wheels/  pytorch-metric-learning's wheel (pure Python; not on the image)
# Both are ignored by git; name them in the call's carry.
#
# The image's Python and torch, here: a virtualenv made once (about 4 GB),
#   python3.12 -m venv "$FASTMINE_GPU_VENV"
#   "$FASTMINE_GPU_VENV/bin/pip" install torch==2.11.0 numpy ninja setuptools wheel pybind11
# (default FASTMINE_GPU_VENV=/work/venv-cu130-py312).
#
# The extension is built from a copy of what the call sends (tracked and
# untracked, not ignored, files) in build/gpu-prebuild/, so the checkout's own
# build (fastmine/_C*.so, fastmine/_build_config.py) stays as it is; ninja
# rebuilds only what changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FASTMINE_GPU_VENV:-/work/venv-cu130-py312}
py="$venv/bin/python"
[ -x "$py" ] || { echo "no virtualenv with the GPU image's torch at $venv (see the header)" >&2; exit 1; }
want=$("$py" -c 'import sys, torch; print(sys.version_info[:2] == (3, 12), torch.__version__)')
[ "${want%% *}" = True ] || { echo "$venv: need Python 3.12 (the image's), got: $want" >&2; exit 1; }

src=build/gpu-prebuild/src
mkdir -p "$src" .gpu_build .gpu_wheels
git ls-files -co --exclude-standard -z | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$src"
(cd "$src" && FASTMINE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-2} \
   "$py" setup.py -q build_ext --inplace > ../extension.log 2>&1) \
  || { tail -40 build/gpu-prebuild/extension.log; exit 1; }
rm -f .gpu_build/_C.*.so
cp "$src"/fastmine/_C.cpython-312-*.so "$src/fastmine/_build_config.py" .gpu_build/

nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
cmake -S "$src" -B build/gpu-prebuild/selftest -DFASTMINE_WITH_TORCH=OFF -DFASTMINE_WITH_CUDA=ON \
  -DCMAKE_CUDA_COMPILER="$nvcc" -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release \
  > build/gpu-prebuild/selftest.log 2>&1 \
  && cmake --build build/gpu-prebuild/selftest -j2 --target fastmine_cuda_selftest \
  >> build/gpu-prebuild/selftest.log 2>&1 \
  || { tail -40 build/gpu-prebuild/selftest.log; exit 1; }
cp build/gpu-prebuild/selftest/fastmine_cuda_selftest .gpu_build/

# PML (the version requirements-test.txt installs here), without its dependencies (on the image).
pml=$(python -c 'import pytorch_metric_learning as p; print(p.__version__)')
rm -f .gpu_wheels/pytorch_metric_learning-*.whl
python -m pip download -q --no-deps --only-binary=:all: -d .gpu_wheels "pytorch-metric-learning==$pml"

# The sources it was built from: benchmarks/gpu_session.py installs the carried
# build only into a tree whose digest matches.
(cd "$src" && python -m benchmarks.gpu_session digest) > .gpu_build/source_digest
du -sh .gpu_build .gpu_wheels
ls -l .gpu_build .gpu_wheels
