// The one translation unit CMake and sdrt.kernels compile into sdrt_kernels.fatbin.
#include "fused_step.cu"
#include "cross_attention.cu"
