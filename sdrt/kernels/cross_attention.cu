// sdrt cross-attention for Stable Diffusion: queries attend to a short text context (77 tokens
// per window) whose keys and values were projected once per conditioning (sdrt/attention.py).
// Reference: sdrt.kernels.cross_attention_reference.
//
//   q (B, Lq, H*D) T     the to_q projection as it comes out of the linear layer (no transpose)
//   k (B, H, Lk, D) T    cached keys, v the same for values
//   o (B, Lq, H*D) T     written in the layout to_out takes (no transpose either)
//
// One block per (16 queries, batch*head); the block's keys and values sit in shared memory,
// each warp takes 4 queries: scores over the Lk keys (lanes over keys), softmax with warp
// reductions, then the weighted sum of values (lanes over the head dimension). float32
// arithmetic on float16 or float32 storage. Dynamic shared memory:
//   align16(2 * Lk * D * sizeof(T)) + warps * (D + Lk) * 4 bytes   (sdrt.kernels.attention_smem_bytes)
#include <cuda_fp16.h>

namespace {

constexpr int kWarps = 4;
constexpr int kQueriesPerWarp = 4;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ void put(float* p, float v) { *p = v; }
__device__ __forceinline__ void put(__half* p, float v) { *p = __float2half_rn(v); }

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ void cross_attention(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                T* __restrict__ o, int heads, int lq, int lk, int d, float scale) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* ks = reinterpret_cast<T*>(smem);
  T* vs = ks + (size_t)lk * d;
  const size_t kv_bytes = (2 * (size_t)lk * d * sizeof(T) + 15) & ~(size_t)15;   // float rows 16-byte aligned
  float* qs = reinterpret_cast<float*>(smem + kv_bytes);        // kWarps * d
  float* ps = qs + kWarps * d;                                   // kWarps * lk
  const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* kg = k + (size_t)bh * lk * d;
  const T* vg = v + (size_t)bh * lk * d;
  for (int i = threadIdx.x; i < lk * d; i += blockDim.x) {
    ks[i] = kg[i];
    vs[i] = vg[i];
  }
  __syncthreads();
  float* qw = qs + warp * d;
  float* pw = ps + warp * lk;
  const size_t row = (size_t)heads * d;
  for (int n = 0; n < kQueriesPerWarp; ++n) {
    const int l = (blockIdx.x * kWarps + warp) * kQueriesPerWarp + n;
    if (l >= lq) break;                                   // the whole warp leaves together
    const T* qg = q + ((size_t)b * lq + l) * row + (size_t)h * d;
    for (int i = lane; i < d; i += 32) qw[i] = to_f(qg[i]) * scale;
    __syncwarp();
    float m = -INFINITY;
    for (int j = lane; j < lk; j += 32) {
      const T* kj = ks + (size_t)j * d;
      float s = 0.f;
      for (int i = 0; i < d; ++i) s += qw[i] * to_f(kj[i]);
      pw[j] = s;
      m = fmaxf(m, s);
    }
    m = warp_max(m);
    float sum = 0.f;
    for (int j = lane; j < lk; j += 32) {
      const float e = __expf(pw[j] - m);
      pw[j] = e;
      sum += e;
    }
    sum = warp_sum(sum);
    __syncwarp();
    const float inv = 1.f / sum;
    T* og = o + ((size_t)b * lq + l) * row + (size_t)h * d;
    for (int i = lane; i < d; i += 32) {
      float acc = 0.f;
      for (int j = 0; j < lk; ++j) acc += pw[j] * to_f(vs[(size_t)j * d + i]);
      put(og + i, acc * inv);
    }
    __syncwarp();                                         // qw and pw are reused by the next query
  }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kWarps * 32)
sdrt_cross_attention_f32(const float* q, const float* k, const float* v, float* o, int heads, int lq, int lk,
                         int d, float scale) {
  cross_attention<float>(q, k, v, o, heads, lq, lk, d, scale);
}

extern "C" __global__ void __launch_bounds__(kWarps * 32)
sdrt_cross_attention_f16(const __half* q, const __half* k, const __half* v, __half* o, int heads, int lq, int lk,
                         int d, float scale) {
  cross_attention<__half>(q, k, v, o, heads, lq, lk, d, scale);
}
