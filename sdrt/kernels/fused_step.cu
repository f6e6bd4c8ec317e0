// sdrt fused sampler step: CFG combine + model output -> denoised + sampler update + the next
// step's UNet input, in one pass over the latents. The math and its reference live in
// sdrt/kernels.py (fused_step_reference); the per-step coefficients in sdrt/fastpath.py.
//
//   out    (2B, C, h, w) T      UNet output: rows [0, B) conditional, rows [B, 2B) unconditional
//   x      (B, C, h, w)  float  latents, updated in place
//   d_prev (B, C, h, w)  float  previous step's denoised (DPM++ 2M), overwritten with this one's
//   x_in   (2B, C, h, w) T      next UNet input: both halves = x_next * c_in_next
//   noise  (B, C, h, w)  float  this step's ancestral noise (read only when coef[N] != 0)
//   coef   (8,)          float  one row of the step table: c_skip, c_out, a, b, e, n, c_in_next, 0
//   scale  (B,)          float  CFG scale per image
//
//   g  = u + s (c - u)                       (classifier-free guidance)
//   D  = c_skip x + c_out g                  (eps: 1, -sigma; v: 1/(s^2+1), -s/sqrt(s^2+1))
//   x' = a x + b D + e D_prev + n noise      (Euler, Euler a, DDIM, DPM++ 2M, LCM)
//
// Arithmetic is float32 whatever the storage type. The coefficients are read from device
// memory, so the same launch replays inside a captured CUDA graph with another table row.
#include <cuda_fp16.h>

namespace {

__device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load(const __half* p, long long i) { return __half2float(p[i]); }
__device__ __forceinline__ void store(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__half* p, long long i, float v) { p[i] = __float2half_rn(v); }

template <typename T>
__device__ __forceinline__ void fused_step(const T* __restrict__ out, float* __restrict__ x,
                                           float* __restrict__ d_prev, T* __restrict__ x_in,
                                           const float* __restrict__ noise,
                                           const float* __restrict__ coef,
                                           const float* __restrict__ scale, int per_image, int batch) {
  const float c_skip = coef[0], c_out = coef[1], a = coef[2], b = coef[3];
  const float e = coef[4], n = coef[5], c_in = coef[6];
  const long long total = (long long)per_image * batch;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int image = (int)(i / per_image);
    const float c = load(out, i);
    const float u = load(out, total + i);
    const float g = u + scale[image] * (c - u);
    const float xi = x[i];
    const float d = c_skip * xi + c_out * g;
    float xn = a * xi + b * d;
    if (e != 0.0f) xn += e * d_prev[i];     // skipped on the first step: d_prev is not yet written
    if (n != 0.0f) xn += n * noise[i];      // noise may be null when no step of the table uses it
    x[i] = xn;
    d_prev[i] = d;
    const float v = xn * c_in;
    store(x_in, i, v);
    store(x_in, total + i, v);
  }
}

}  // namespace

extern "C" __global__ void sdrt_fused_step_f32(const float* out, float* x, float* d_prev, float* x_in,
                                               const float* noise, const float* coef, const float* scale,
                                               int per_image, int batch) {
  fused_step<float>(out, x, d_prev, x_in, noise, coef, scale, per_image, batch);
}

extern "C" __global__ void sdrt_fused_step_f16(const __half* out, float* x, float* d_prev, __half* x_in,
                                               const float* noise, const float* coef, const float* scale,
                                               int per_image, int batch) {
  fused_step<__half>(out, x, d_prev, x_in, noise, coef, scale, per_image, batch);
}
