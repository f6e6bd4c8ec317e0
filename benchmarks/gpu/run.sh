#!/usr/bin/env bash
# The whole GPU check in one call (on the device machine, from the repository root):
# install the carried wheels, build the kernels (CMake, this GPU's architecture and the default
# set), run the GPU tests, then the GPU suite (benchmarks/gpu/run.py). Logs and the results JSON
# go to $OUT (or out/ without it). Prepare with benchmarks/gpu/prepare.sh first.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-out}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
"$PY" -m pip install -q --no-deps --no-index .cache/gpu-wheels/*.whl 2>&1 | tail -2
"$PY" -m pip install -q --no-deps -e . 2>&1 | tail -2
arch=$("$PY" -c "import torch; print(';' + ''.join(map(str, torch.cuda.get_device_capability())))" 2>/dev/null)
cmake -S . -B build -DCMAKE_CUDA_ARCHITECTURES="80;86;89;90${arch}" > "$OUT/cmake.log" 2>&1 \
  && cmake --build build >> "$OUT/cmake.log" 2>&1 || echo "cmake build failed (see cmake.log); sdrt compiles with nvcc itself"
timeout 120 "$PY" -m pytest -q -x tests/test_kernels.py tests/test_fastpath.py -k "cuda or kernel or graph" \
  > "$OUT/gpu-tests.log" 2>&1; echo "GPU tests exit $?"; tail -3 "$OUT/gpu-tests.log"
[ $# -eq 0 ] && set -- --repeat 2
timeout 400 "$PY" benchmarks/gpu/run.py "$@" 2> "$OUT/gpu-suite.log"; rc=$?
cp benchmarks/results/gpu-*.json "$OUT/" 2>/dev/null
tail -5 "$OUT/gpu-suite.log"
exit $rc
