#!/usr/bin/env bash
# The whole GPU check in one call (on the device machine, from the repository root):
# install the carried wheels (the machine is offline), build the kernels (CMake, this GPU's
# architecture and the default set), run the GPU suite (benchmarks/gpu/run.py, arguments
# passed through; the numbers come first), then the GPU tests. Logs and the results JSON
# are written straight into $OUT (or out/ without it), so a run cut short keeps what it measured.
# Prepare with benchmarks/gpu/prepare.sh first.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-out}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
"$PY" -m pip install -q --no-deps --no-index .cache/gpu-wheels/*.whl 2>&1 | grep -v "running pip as" | tail -2
# offline: no build isolation (it would fetch setuptools); the image's setuptools builds it
"$PY" -m pip install -q --no-deps --no-index --no-build-isolation -e . 2>&1 | grep -v "running pip as" | tail -2
if ! "$PY" -c "import sdrt.export" 2>/dev/null; then
  # seen on the H200 image: the offline editable install fails; sdrt imports from the working
  # tree as it is (sdrt/_tree.py finds export/ beside the package)
  echo "editable install failed: importing sdrt from the working tree"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import sdrt, sdrt.export, diffusers; print('sdrt', sdrt.__file__, 'diffusers', diffusers.__version__)" \
  || { echo "sdrt does not import: stopping"; exit 3; }
arch=$("$PY" -c "import torch; print(';' + ''.join(map(str, torch.cuda.get_device_capability())))" 2>/dev/null)
t=$SECONDS
cmake -S . -B build -DCMAKE_CUDA_ARCHITECTURES="80;86;89;90${arch}" > "$OUT/cmake.log" 2>&1 \
  && cmake --build build >> "$OUT/cmake.log" 2>&1 && echo "cmake built the kernels in $((SECONDS - t)) s" \
  && export SDRT_KERNELS="$PWD/build/sdrt_kernels.fatbin" \
  || echo "cmake build failed (see cmake.log); sdrt compiles with nvcc itself"
[ $# -eq 0 ] && set -- --repeat 2
timeout "${SUITE_TIMEOUT:-400}" "$PY" benchmarks/gpu/run.py --out "$OUT" "$@" 2> "$OUT/gpu-suite.log"; rc=$?
tail -8 "$OUT/gpu-suite.log"
# the tests that skip without a GPU (the compile tests ran on the CPU, in CI)
timeout "${GPU_TEST_TIMEOUT:-150}" "$PY" -m pytest -q -p no:cacheprovider -rs \
  tests/test_kernels.py tests/test_fastpath.py tests/test_quantize.py -k "gpu or cuda or kernel_matches or kernel_replays" \
  > "$OUT/gpu-tests.log" 2>&1; trc=$?; echo "GPU tests exit $trc"; tail -4 "$OUT/gpu-tests.log"
[ $rc -eq 0 ] && rc=$trc
exit $rc
