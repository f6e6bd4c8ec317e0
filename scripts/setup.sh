#!/usr/bin/env bash
# Installs sdrt and what it needs, in the order that keeps the CPU build of torch:
#   scripts/setup.sh         the runtime
#   scripts/setup.sh test    the runtime and the test dependencies (k-diffusion for parity tests,
#                            Ray Serve and the webuiapi client for the server tests)
set -euo pipefail
cd "$(dirname "$0")/.."
pip install "torch==2.13.0"
# the CLIP BPE vocabulary ships in this wheel; its dependencies (torchvision) would break torch
pip install --no-deps "open_clip_torch==3.3.0"
# the interrogator's term lists (artists, flavors, ...) ship in this wheel; only its data files are
# read (its dependencies would pull torchvision and download models at run time)
pip install --no-deps "clip-interrogator==0.6.0"
if [ "${1:-}" = "test" ]; then
  # k-diffusion's own dependencies include training packages; the parity tests need only these
  pip install --no-deps "k-diffusion==0.1.1.post1"
  pip install -e ".[test,onnx,serve]"
  # the real TensorRT 11.4 binding (not importable without NVIDIA's libraries): the TensorRT tests
  # check every API name sdrt uses against its name table
  pip download --no-deps -q -d .cache/wheels "tensorrt-cu13-bindings==11.4.0.106"
else
  pip install -e ".[onnx,bench]"
fi
