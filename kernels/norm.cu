// RMSNorm over the last dim (src/backend/cuda/ops/norm.rs). x, y, g, dx: contiguous [rows, d];
// w, dw: [d]; rstd: f32 [rows]. All arithmetic in f32.
//
//   forward:  r = 1 / sqrt(mean(x²) + eps),  y = x·r·w             (one block per row)
//   backward: dx = r·(g·w − x·r·m),  m = r·Σ_j(g·w·x)/d              (one block per row)
//             dw = Σ_rows g·x·r: deterministic two passes — per-chunk column sums
//             (rms_norm_dw_partial, one thread per column and row chunk) then a sum over chunks
//             (rms_norm_dw_sum: col_partials_sum of common.cuh).

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

#define NORM_KERNELS(SFX, T)                                                                                        \
    extern "C" __global__ void rms_norm_fwd_##SFX(const T* x, const T* w, T* y, float* rstd, i64 d, float eps) {    \
        rms_norm_fwd<T>(x, w, y, rstd, d, eps);                                                                     \
    }                                                                                                               \
    extern "C" __global__ void rms_norm_bwd_dx_##SFX(const T* x, const T* w, const T* g, const float* rstd, T* dx,  \
                                                     i64 d) {                                                       \
        rms_norm_bwd_dx<T>(x, w, g, rstd, dx, d);                                                                   \
    }                                                                                                               \
    extern "C" __global__ void rms_norm_dw_partial_##SFX(const T* x, const T* g, const float* rstd, float* partial, \
                                                         i64 rows, i64 d, i64 rows_per_chunk) {                     \
        rms_norm_dw_partial<T>(x, g, rstd, partial, rows, d, rows_per_chunk);                                       \
    }                                                                                                               \
    extern "C" __global__ void rms_norm_dw_sum_##SFX(const float* partial, T* dw, i64 chunks, i64 d) {              \
        col_partials_sum<T>(partial, dw, chunks, d);                                                                \
    }

NORM_KERNELS(f32, float)
NORM_KERNELS(bf16, bf16_t)

// ---------------------------------------------------------------- vectorised fast paths
//
// Used when d is a multiple of N = 16 / sizeof(T) (8 bf16, 4 f32) and every row pointer is
// 16-byte aligned (checked on the host, src/backend/cuda/ops/norm.rs); the kernels above are
// the fallback. The row stays in registers between the reduction and the output (one read of
// x per kernel). Launch: blockDim (TPR, RPB).
//   TPR = 32:  one warp per row, RPB rows per block, grid = ceil(rows / RPB);
//   TPR > 32:  one block per row, RPB = 1, grid = rows.
// Thread t of a row holds the 16-byte vectors t + k·TPR, k < VPT (VPT a template constant).

// Sum over the threads of a row (see the launch note): every thread gets it. In block mode this
// synchronises the block (all threads call it).
__device__ __forceinline__ float rn_row_sum(float v, float* scratch) {
    return blockDim.x == 32 ? warp_sum(v) : block_sum(v, scratch);
}

// ADD (add_rms_norm): the normalised row is h = x + b, rounded to T and stored to h_out, as the
// separate add would store it; the norm reads the rounded h. Otherwise b and h_out are unused.
template <typename T, int VPT, bool ADD>
__device__ __forceinline__ void rms_norm_fwd_vec(const T* x, const T* b, T* h_out, const T* w, T* y, float* rstd,
                                                 i64 rows, i64 d, float eps) {
    constexpr int N = Vec<T>::N;
    __shared__ float scratch[32];
    const i64 row = (i64)blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= rows) return;  // warp mode only: whole warps leave, no block barrier there
    const int nv = (int)(d / N);
    const uint4* xr = reinterpret_cast<const uint4*>(x + row * d);
    const uint4* wv = reinterpret_cast<const uint4*>(w);
    uint4* yr = reinterpret_cast<uint4*>(y + row * d);
    uint4 xv[VPT];
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
        const int j = (int)threadIdx.x + k * (int)blockDim.x;
        xv[k] = j < nv ? xr[j] : make_uint4(0u, 0u, 0u, 0u);  // zero bits = 0.f in both types
    }
    if (ADD) {
        const uint4* br = reinterpret_cast<const uint4*>(b + row * d);
        uint4* hr = reinterpret_cast<uint4*>(h_out + row * d);
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
            const int j = (int)threadIdx.x + k * (int)blockDim.x;
            if (j < nv) {
                float f[N], g[N];
                unpack16<T>(xv[k], f);
                unpack16<T>(br[j], g);
#pragma unroll
                for (int e = 0; e < N; ++e) f[e] += g[e];
                xv[k] = pack16<T>(f);
                hr[j] = xv[k];
            }
        }
    }
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
        float f[N];
        unpack16<T>(xv[k], f);
#pragma unroll
        for (int e = 0; e < N; ++e) ss += f[e] * f[e];
    }
    ss = rn_row_sum(ss, scratch);
    const float r = 1.f / sqrtf(ss / (float)d + eps);
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
        const int j = (int)threadIdx.x + k * (int)blockDim.x;
        if (j < nv) {
            float f[N], g[N];
            unpack16<T>(xv[k], f);
            unpack16<T>(wv[j], g);
#pragma unroll
            for (int e = 0; e < N; ++e) f[e] = f[e] * r * g[e];
            yr[j] = pack16<T>(f);
        }
    }
    if (threadIdx.x == 0) rstd[row] = r;
}

// dx_j = r · (g_j w_j − x_j · r · mean),  mean = r · Σ_k g_k w_k x_k / d (as rms_norm_bwd_dx).
// ADD (add_rms_norm's backward): gh, the gradient of the sum h itself, is added before the
// store: dx = gh + the norm's gradient, rounded once. Otherwise gh is unused.
template <typename T, int VPT, bool ADD>
__device__ __forceinline__ void rms_norm_bwd_dx_vec(const T* x, const T* w, const T* g, const float* rstd,
                                                    const T* gh, T* dx, i64 rows, i64 d) {
    constexpr int N = Vec<T>::N;
    __shared__ float scratch[32];
    const i64 row = (i64)blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= rows) return;  // warp mode only
    const int nv = (int)(d / N);
    const uint4* xr = reinterpret_cast<const uint4*>(x + row * d);
    const uint4* gr = reinterpret_cast<const uint4*>(g + row * d);
    const uint4* wv = reinterpret_cast<const uint4*>(w);
    uint4* dr = reinterpret_cast<uint4*>(dx + row * d);
    uint4 xv[VPT], gv[VPT];
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
        const int j = (int)threadIdx.x + k * (int)blockDim.x;
        xv[k] = j < nv ? xr[j] : make_uint4(0u, 0u, 0u, 0u);
        gv[k] = j < nv ? gr[j] : make_uint4(0u, 0u, 0u, 0u);
    }
    const float r = rstd[row];
    float dot = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
        const int j = (int)threadIdx.x + k * (int)blockDim.x;
        if (j < nv) {
            float xf[N], gf[N], wf[N];
            unpack16<T>(xv[k], xf);
            unpack16<T>(gv[k], gf);
            unpack16<T>(wv[j], wf);
#pragma unroll
            for (int e = 0; e < N; ++e) dot += gf[e] * wf[e] * xf[e];
        }
    }
    dot = rn_row_sum(dot, scratch);
    const float mean = dot * r / (float)d;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
        const int j = (int)threadIdx.x + k * (int)blockDim.x;
        if (j < nv) {
            float xf[N], gf[N], wf[N];
            unpack16<T>(xv[k], xf);
            unpack16<T>(gv[k], gf);
            unpack16<T>(wv[j], wf);
#pragma unroll
            for (int e = 0; e < N; ++e) xf[e] = r * (gf[e] * wf[e] - xf[e] * r * mean);
            if (ADD) {
                float hf[N];
                unpack16<T>(reinterpret_cast<const uint4*>(gh + row * d)[j], hf);
#pragma unroll
                for (int e = 0; e < N; ++e) xf[e] += hf[e];
            }
            dr[j] = pack16<T>(xf);
        }
    }
}

// rms_norm_dw_partial with one 16-byte vector (N columns) per thread: col_partials_vec of
// common.cuh with the product g·x·rstd. grid (ceil((d / N) / blockDim.x), chunks).
// Launch bounds: at most 256 threads per block for VPT <= 4 and 512 for VPT = 8 (the host's
// plan, row_vec_plan in src/backend/cuda/ops/reduce.rs); VPT <= 2 also fits 8 blocks per SM
// (32 registers, no spills), except add_rms_norm's backward at VPT = 2, which needs 6 blocks
// (40 registers) not to spill.
#define NORM_VEC_KERNELS(SFX, T, VPT, MAXT, MINB, ADD_MINB)                                                  \
    extern "C" __global__ void __launch_bounds__(MAXT, MINB)                                                 \
        rms_norm_fwd_v##VPT##_##SFX(const T* x, const T* w, T* y, float* rstd, i64 rows, i64 d, float eps) { \
        rms_norm_fwd_vec<T, VPT, false>(x, nullptr, nullptr, w, y, rstd, rows, d, eps);                      \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(MAXT, MINB) rms_norm_bwd_dx_v##VPT##_##SFX(                 \
        const T* x, const T* w, const T* g, const float* rstd, T* dx, i64 rows, i64 d) {                     \
        rms_norm_bwd_dx_vec<T, VPT, false>(x, w, g, rstd, nullptr, dx, rows, d);                             \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(MAXT, MINB) add_rms_norm_fwd_v##VPT##_##SFX(                \
        const T* x, const T* b, T* h, const T* w, T* y, float* rstd, i64 rows, i64 d, float eps) {           \
        rms_norm_fwd_vec<T, VPT, true>(x, b, h, w, y, rstd, rows, d, eps);                                   \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(MAXT, ADD_MINB) add_rms_norm_bwd_dx_v##VPT##_##SFX(         \
        const T* x, const T* w, const T* g, const float* rstd, const T* gh, T* dx, i64 rows, i64 d) {        \
        rms_norm_bwd_dx_vec<T, VPT, true>(x, w, g, rstd, gh, dx, rows, d);                                   \
    }

NORM_VEC_KERNELS(f32, float, 1, 256, 8, 8)
NORM_VEC_KERNELS(f32, float, 2, 256, 8, 6)
NORM_VEC_KERNELS(f32, float, 4, 256, 1, 1)
NORM_VEC_KERNELS(f32, float, 8, 512, 1, 1)
NORM_VEC_KERNELS(bf16, bf16_t, 1, 256, 8, 8)
NORM_VEC_KERNELS(bf16, bf16_t, 2, 256, 8, 6)
NORM_VEC_KERNELS(bf16, bf16_t, 4, 256, 1, 1)
NORM_VEC_KERNELS(bf16, bf16_t, 8, 512, 1, 1)

extern "C" __global__ void rms_norm_dw_partial_vec_f32(const float* x, const float* g, const float* rstd,
                                                       float* partial, i64 rows, i64 d, i64 rows_per_chunk) {
    col_partials_vec<float, true>(g, x, rstd, partial, rows, d, rows_per_chunk);
}
extern "C" __global__ void rms_norm_dw_partial_vec_bf16(const bf16_t* x, const bf16_t* g, const float* rstd,
                                                        float* partial, i64 rows, i64 d, i64 rows_per_chunk) {
    col_partials_vec<bf16_t, true>(g, x, rstd, partial, rows, d, rows_per_chunk);
}
