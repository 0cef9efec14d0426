#!/usr/bin/env bash
# What a lent-GPU session runs, one step per device call (each fits in the
# 10-minute limit of one call; the device keeps ignored build outputs between
# calls while it stays warm).  Writes logs and results under $OUT.
#
#   bash benchmarks/gpu_session.sh env            # GPU, driver, torch/triton versions
#   bash benchmarks/gpu_session.sh triton-tests   # Triton GPU tests + contract suite on CUDA
#   bash benchmarks/gpu_session.sh build          # CUDA extension (sm_90) + CMake self-test
#   bash benchmarks/gpu_session.sh cuda-tests     # CUDA backend tests, compute-sanitizer
#   bash benchmarks/gpu_session.sh bench-target   # N=M=8192, D=512: triton/cuda vs PML vs torch.mm
#   bash benchmarks/gpu_session.sh bench-full     # python -m benchmarks.mine --full
#   bash benchmarks/gpu_session.sh topk           # top-k / distance-weighted: tests on CUDA + benchmarks.topk
#   bash benchmarks/gpu_session.sh contrastive    # #18's Triton kernels: GPU tests + benchmarks.contrastive
#
# PML is pure Python but not on the GPU image: put its wheel in .gpu_wheels/
# on the CPU machine (`pip download pytorch-metric-learning==2.9.0 --no-deps
# -d .gpu_wheels`) and carry that path with the call; it is installed from there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fastmine-gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
step=${1:-env}

if ls .gpu_wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps .gpu_wheels/*.whl >"$OUT/pip.log" 2>&1 || cat "$OUT/pip.log"
fi
# The pure-Python package without rebuilding: make it importable from the tree.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

case "$step" in
  env)
    nvidia-smi | tee "$OUT/nvidia-smi.txt"
    $PY -c "import torch, triton; p = torch.cuda.get_device_properties(0); \
print('torch', torch.__version__, '| triton', triton.__version__, '|', p.name, p.multi_processor_count, 'SMs')" \
      | tee "$OUT/env.txt"
    ;;
  triton-tests)
    FASTMINE_TEST_GPU=1 $PY -m pytest -q -x tests/test_triton.py -m gpu 2>&1 | tee "$OUT/triton-gpu-tests.log" | tail -15
    FASTMINE_TEST_GPU=1 FASTMINE_TEST_DEVICE=cuda $PY -m pytest -q tests/test_contract.py -k triton \
      2>&1 | tee "$OUT/triton-contract-cuda.log" | tail -15
    ;;
  build)
    FASTMINE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
      $PY -m pip install --no-build-isolation --no-deps -q -e . >"$OUT/build.log" 2>&1 \
      || { tail -40 "$OUT/build.log"; exit 1; }
    cmake -S . -B build/cmake-cuda -DFASTMINE_WITH_TORCH=OFF -DFASTMINE_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 >"$OUT/cmake.log" 2>&1 \
      && cmake --build build/cmake-cuda -j 16 >>"$OUT/cmake.log" 2>&1 \
      && ./build/cmake-cuda/fastmine_cuda_selftest 2>&1 | tee "$OUT/selftest.log" | tail -15
    ;;
  cuda-tests)
    FASTMINE_TEST_GPU=1 $PY -m pytest -q tests/test_cuda.py 2>&1 | tee "$OUT/cuda-tests.log" | tail -15
    compute-sanitizer --tool memcheck ./build/cmake-cuda/fastmine_cuda_selftest >"$OUT/memcheck.log" 2>&1; tail -3 "$OUT/memcheck.log"
    compute-sanitizer --tool racecheck ./build/cmake-cuda/fastmine_cuda_selftest >"$OUT/racecheck.log" 2>&1; tail -3 "$OUT/racecheck.log"
    ;;
  bench-target)
    $PY -m benchmarks.mine --device cuda --n 8192 --d 512 --dtype tf32 bf16 \
      --strategies easy/hard --modes forward backward --out "$OUT/bench-8192-d512" --no-progress \
      2>&1 | tail -40
    ;;
  topk)
    FASTMINE_TEST_GPU=1 FASTMINE_TEST_DEVICE=cuda $PY -m pytest -q tests/test_topk_backends.py \
      2>&1 | tee "$OUT/topk-cuda-tests.log" | tail -15
    $PY -m benchmarks.topk --device cuda --out "$OUT/bench-topk" 2>&1 | tail -30
    ;;
  contrastive)
    FASTMINE_TEST_GPU=1 $PY -m pytest -q tests/test_contrastive_triton.py -m gpu \
      2>&1 | tee "$OUT/contrastive-gpu-tests.log" | tail -15
    $PY -m benchmarks.contrastive --device cuda --out "$OUT/bench-contrastive" 2>&1 | tail -30
    ;;
  bench-full)
    $PY -m benchmarks.mine --full --out "$OUT/bench-full" --no-progress 2>&1 | tail -60
    ;;
  *)
    echo "unknown step '$step'" >&2; exit 2
    ;;
esac
