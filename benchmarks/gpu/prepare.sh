#!/usr/bin/env bash
# Run HERE (with network) before a GPU call: downloads the pure-Python wheels the GPU machine's
# image lacks (it has torch, transformers, safetensors, onnx, onnxruntime, cuda-bindings, pytest)
# into .cache/gpu-wheels/, which the device call carries:
#   bash benchmarks/gpu/prepare.sh
#   device run: command "bash benchmarks/gpu/run.sh", carry [".cache/gpu-wheels"], timeout_s 590
# On an H200 (2026-11-26) the whole call ran in 200 s (all variants, --repeat 2), and in 490 s with
#   --repeat 3 --variants static-kernel+kv --compile default --only fatbin kernel decode_text end_to_end
#   unet_graph compile --inductor conv_1x1_as_mm=True coordinate_descent_tuning=True epilogue_fusion=False
# (compile at batch 1 and 4, about 70 s each; the inductor settings' compile alone took 215 s),
# plus about 30 s to start. Give SUITE_TIMEOUT so the GPU tests keep their time within the call.
# On 2026-11-30 (H200, 15 minutes of device time): compile_batch1 55 s, compile_batch4 64 s, each
# compiled end-to-end section about 35 s, fp8_check 10 s, fp8_batch4 100 s (compiles the float8
# copy), and the compiled peer's own process needs about 3 minutes (load, compile at 1 and 4):
# run the peer (--peer-compile reduce-overhead --only peer) and SDXL (--only sdxl) in calls of
# their own rather than after everything else. The interrogator section (--only interrogator) needs
# clip-interrogator's term lists (its wheel, data files only).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .cache/gpu-wheels
pip download -q --no-deps -d .cache/gpu-wheels diffusers==0.42.1 torchsde==0.2.6 trampoline==0.1.2 \
    open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth lark clip-interrogator==0.6.0
ls .cache/gpu-wheels
