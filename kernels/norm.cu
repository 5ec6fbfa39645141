// RMSNorm over the last dim (src/backend/cuda/ops/norm.rs). x, y, g, dx: contiguous [rows, d];
// w, dw: [d]; rstd: f32 [rows]. All arithmetic in f32.
//
//   forward:  r = 1 / sqrt(mean(x²) + eps),  y = x·r·w             (one block per row)
//   backward: dx = r·(g·w − x·r·m),  m = r·Σ_j(g·w·x)/d              (one block per row)
//             dw = Σ_rows g·x·r: deterministic two passes — per-chunk column sums
//             (rms_norm_dw_partial, one thread per column and row chunk) then a sum over chunks
//             (rms_norm_dw_reduce).

template <typename T>
__device__ __forceinline__ void rms_norm_fwd(const T* x, const T* w, T* y, float* rstd, i64 d, float eps) {
    __shared__ float scratch[32];
    const i64 row = blockIdx.x;
    const T* xr = x + row * d;
    T* yr = y + row * d;
    float ss = 0.f;
    for (i64 j = threadIdx.x; j < d; j += blockDim.x) {
        float v = ld(xr, j);
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    const float r = 1.f / sqrtf(ss / (float)d + eps);
    for (i64 j = threadIdx.x; j < d; j += blockDim.x) st(yr, j, ld(xr, j) * r * ld(w, j));
    if (threadIdx.x == 0) rstd[row] = r;
}

// dx_j = r · (g_j w_j − x_j · r · mean),  mean = r · Σ_k g_k w_k x_k / d.
template <typename T>
__device__ __forceinline__ void rms_norm_bwd_dx(const T* x, const T* w, const T* g, const float* rstd, T* dx, i64 d) {
    __shared__ float scratch[32];
    const i64 row = blockIdx.x;
    const T* xr = x + row * d;
    const T* gr = g + row * d;
    T* dr = dx + row * d;
    const float r = rstd[row];
    float dot = 0.f;
    for (i64 j = threadIdx.x; j < d; j += blockDim.x) dot += ld(gr, j) * ld(w, j) * ld(xr, j);
    dot = block_sum(dot, scratch);
    const float mean = dot * r / (float)d;
    for (i64 j = threadIdx.x; j < d; j += blockDim.x) st(dr, j, r * (ld(gr, j) * ld(w, j) - ld(xr, j) * r * mean));
}

// partial[c, j] = Σ_{rows of chunk c} g[row, j] · x[row, j] · rstd[row].
// grid (ceil(d / blockDim.x), chunks); chunk c covers rows [c·rows_per_chunk, (c+1)·rows_per_chunk).
template <typename T>
__device__ __forceinline__ void rms_norm_dw_partial(const T* x, const T* g, const float* rstd, float* partial, i64 rows,
                                                    i64 d, i64 rows_per_chunk) {
    const i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    const i64 c = blockIdx.y;
    const i64 r0 = c * rows_per_chunk;
    const i64 r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
    float acc = 0.f;
    for (i64 r = r0; r < r1; ++r) acc += ld(g, r * d + j) * ld(x, r * d + j) * rstd[r];
    partial[c * d + j] = acc;
}

// dw[j] = Σ_c partial[c, j] (grid-stride over the d columns).
template <typename T>
__device__ __forceinline__ void rms_norm_dw_reduce(const float* partial, T* dw, i64 chunks, i64 d) {
    GRID_LOOP(j, d) {
        float acc = 0.f;
        for (i64 c = 0; c < chunks; ++c) acc += partial[c * d + j];
        st(dw, j, acc);
    }
}

#define NORM_KERNELS(SFX, T)                                                                                     \
    extern "C" __global__ void rms_norm_fwd_##SFX(const T* x, const T* w, T* y, float* rstd, i64 d, float eps) {  \
        rms_norm_fwd<T>(x, w, y, rstd, d, eps);                                                                  \
    }                                                                                                            \
    extern "C" __global__ void rms_norm_bwd_dx_##SFX(const T* x, const T* w, const T* g, const float* rstd, T* dx, \
                                                     i64 d) {                                                    \
        rms_norm_bwd_dx<T>(x, w, g, rstd, dx, d);                                                                \
    }                                                                                                            \
    extern "C" __global__ void rms_norm_dw_partial_##SFX(const T* x, const T* g, const float* rstd, float* partial, \
                                                         i64 rows, i64 d, i64 rows_per_chunk) {                  \
        rms_norm_dw_partial<T>(x, g, rstd, partial, rows, d, rows_per_chunk);                                    \
    }                                                                                                            \
    extern "C" __global__ void rms_norm_dw_reduce_##SFX(const float* partial, T* dw, i64 chunks, i64 d) {         \
        rms_norm_dw_reduce<T>(partial, dw, chunks, d);                                                           \
    }

NORM_KERNELS(f32, float)
NORM_KERNELS(bf16, bf16_t)
