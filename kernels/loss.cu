// Fused losses from logits, never materialising the softmax (src/backend/cuda/ops/loss.rs, CPU
// reference src/ops/loss.rs). x: contiguous logits [rows, v]; t: the target id of each row,
// i64 or u32 (kernel names ..._i64_<T> / ..._u32_<T>), read on the device: a row whose id
// equals `ignore` (when has_ignore != 0) is ignored, an id outside 0..v is invalid and gives a
// NaN loss and a NaN gradient row (the host cannot report it without a synchronisation);
// lse, picked: f32 [rows].
//
//   lse_pick:        per row: lse = log Σ_j e^{x_j}, picked = x_t − lse (0 for ignored rows,
//                    NaN for invalid ones). Three variants with the same arguments:
//                    lse_pick_v{VPT} (row in registers, 16-byte loads; launch as RowVec in
//                    src/backend/cuda/ops/reduce.rs: one warp per row for short rows (blockDim
//                    (32, R)), else one block per row), lse_pick_loop (one block per row,
//                    16-byte loads, online max/sum per vector: long rows) and lse_pick (one
//                    block per row, scalar online max/sum: any v and alignment).
//   ce_mean:         one block: out[0] = −Σ_rows picked · inv, inv = 1 / max(#counted rows, 1)
//                    (counted = not ignored), inv_count[0] = inv for the backward.
//   lse_pick_bwd:    dx_j = (e^{x_j − lse} − [j = t]) · g_r · scale · inv, 0 on ignored rows,
//                    NaN on invalid rows; g_r = g[row] when g_per_row, else g[0]; inv =
//                    inv_count[0], or 1 when inv_count is null.
//                    cross_entropy: scale = 1, g scalar, inv_count from ce_mean.
//                    log_prob_of: scale = −1, g per row, no inv_count.
//                    lse_pick_bwd_vec: grid (rows, ceil(v / N / (blockDim.x · 4))), 4 16-byte
//                    vectors per thread; lse_pick_bwd: one block per row, scalar.
// The 16-byte variants need v % N == 0 (N = 8 bf16, 4 f32) and 16-byte aligned x / dx (the
// host checks). Launch bounds of lse_pick_v{VPT}: at most 256 threads per block for VPT <= 4,
// 512 for VPT = 8 (RowVec); VPT <= 2 also fits 8 blocks per SM (32 registers, no spills).

#define CE_IGNORED (-1)
#define CE_INVALID (-2)
#define CE_NAN __int_as_float(0x7fffffff)

// The class of row r: 0 <= c < v, CE_IGNORED or CE_INVALID.
template <typename I>
__device__ __forceinline__ i64 ce_class(const I* t, i64 r, i64 v, i64 ignore, i64 has_ignore) {
    const i64 c = (i64)t[r];
    if (has_ignore && c == ignore) return CE_IGNORED;
    return c >= 0 && c < v ? c : CE_INVALID;
}

// lse and picked of one row (called by one thread of the row).
template <typename T, typename I>
__device__ __forceinline__ void ce_write_row(const T* xr, const I* t, float* lse, float* picked, i64 row, i64 v,
                                             i64 ignore, i64 has_ignore, float l) {
    lse[row] = l;
    const i64 c = ce_class(t, row, v, ignore, has_ignore);
    picked[row] = c >= 0 ? ld(xr, c) - l : (c == CE_IGNORED ? 0.f : CE_NAN);
}

// Scalar fallback: one block per row, per thread a running max m and Σ e^{x − m} over its
// strided elements, then combined over the block.
template <typename T, typename I>
__device__ __forceinline__ void lse_pick(const T* x, const I* t, float* lse, float* picked, i64 v, i64 ignore,
                                         i64 has_ignore) {
    __shared__ float scratch[32];
    const i64 row = blockIdx.x;
    const T* xr = x + row * v;
    float m = NEG_INF, s = 0.f;
    for (i64 j = threadIdx.x; j < v; j += blockDim.x) {
        const float e = ld(xr, j);
        if (e > m) {
            s = s * expf(m - e) + 1.f;  // m = −inf on the first element: s = 0·0 + 1
            m = e;
        } else if (m > NEG_INF) {
            s += expf(e - m);
        }
    }
    const float bm = block_max(m, scratch);
    const float sc = m > NEG_INF ? s * expf(m - bm) : 0.f;
    const float bs = block_sum(sc, scratch);
    const float l = bm + logf(bs);  // all −inf (or v = 0): −inf, as the CPU logsumexp
    if (threadIdx.x == 0) ce_write_row(xr, t, lse, picked, row, v, ignore, has_ignore, l);
}

// Long rows, 16-byte loads: one block per row, the running max / sum updated once per vector.
template <typename T, typename I>
__device__ __forceinline__ void lse_pick_loop(const T* x, const I* t, float* lse, float* picked, i64 v, i64 ignore,
                                              i64 has_ignore) {
    constexpr int N = Vec<T>::N;
    __shared__ float scratch[32];
    const i64 row = blockIdx.x;
    const T* xr = x + row * v;
    const uint4* xv = reinterpret_cast<const uint4*>(xr);
    const i64 nv = v / N;
    float m = NEG_INF, s = 0.f;
#pragma unroll 2
    for (i64 j = threadIdx.x; j < nv; j += blockDim.x) {
        float f[N];
        unpack16<T>(xv[j], f);
        float vm = f[0];
#pragma unroll
        for (int e = 1; e < N; ++e) vm = fmaxf(vm, f[e]);
        if (vm > m) {
            s = m > NEG_INF ? s * expf(m - vm) : 0.f;
            m = vm;
        }
        if (m > NEG_INF) {
#pragma unroll
            for (int e = 0; e < N; ++e) s += expf(f[e] - m);
        }
    }
    const float bm = block_max(m, scratch);
    const float sc = m > NEG_INF ? s * expf(m - bm) : 0.f;
    const float bs = block_sum(sc, scratch);
    const float l = bm + logf(bs);
    if (threadIdx.x == 0) ce_write_row(xr, t, lse, picked, row, v, ignore, has_ignore, l);
}

// Sum / max over the threads of a row (RowVec launch): warp mode or block mode.
__device__ __forceinline__ float ce_row_sum(float v, float* scratch) {
    return blockDim.x == 32 ? warp_sum(v) : block_sum(v, scratch);
}
__device__ __forceinline__ float ce_row_max(float v, float* scratch) {
    return blockDim.x == 32 ? warp_max(v) : block_max(v, scratch);
}

// Row in registers: thread t of a row holds the 16-byte vectors t + k·blockDim.x, k < VPT.
template <typename T, typename I, int VPT>
__device__ __forceinline__ void lse_pick_vec(const T* x, const I* t, float* lse, float* picked, i64 rows, i64 v,
                                             i64 ignore, i64 has_ignore) {
    constexpr int N = Vec<T>::N;
    __shared__ float scratch[32];
    const i64 row = (i64)blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= rows) return;  // warp mode only (whole warps; no block barrier in warp mode)
    const T* xr = x + row * v;
    const uint4* xv = reinterpret_cast<const uint4*>(xr);
    const int nv = (int)(v / N);
    const int tid = threadIdx.x, nt = blockDim.x;
    float f[VPT][N];
    float m = NEG_INF;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
        const int j = tid + k * nt;
        if (j < nv) {
            unpack16<T>(xv[j], f[k]);
#pragma unroll
            for (int e = 0; e < N; ++e) m = fmaxf(m, f[k][e]);
        }
    }
    m = ce_row_max(m, scratch);
    float s = 0.f;
    if (m > NEG_INF) {  // uniform over the row
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
            if (tid + k * nt < nv) {
#pragma unroll
                for (int e = 0; e < N; ++e) s += expf(f[k][e] - m);
            }
        }
    }
    s = ce_row_sum(s, scratch);
    const float l = m > NEG_INF ? m + logf(s) : NEG_INF;  // all −inf: −inf, as the CPU logsumexp
    if (tid == 0) ce_write_row(xr, t, lse, picked, row, v, ignore, has_ignore, l);
}

template <typename T, typename I>
__device__ __forceinline__ void ce_mean(const float* picked, const I* t, T* out, float* inv_count, i64 rows,
                                        i64 ignore, i64 has_ignore) {
    __shared__ float scratch[32];
    __shared__ unsigned int count;
    if (threadIdx.x == 0) count = 0u;
    float acc = 0.f;
    unsigned int cnt = 0u;
    for (i64 r = threadIdx.x; r < rows; r += blockDim.x) {
        acc += picked[r];
        if (!(has_ignore && (i64)t[r] == ignore)) ++cnt;
    }
    acc = block_sum(acc, scratch);  // its barriers also order `count = 0` before the adds
    atomicAdd(&count, cnt);
    __syncthreads();
    if (threadIdx.x == 0) {
        const float inv = 1.f / (float)(count > 0u ? count : 1u);
        st(out, 0, 0.f - acc * inv);
        inv_count[0] = inv;
    }
}

template <typename T>
__device__ __forceinline__ float ce_grad_scale(const T* g, const float* inv_count, i64 row, float scale,
                                               i64 g_per_row) {
    return ld(g, g_per_row ? row : 0) * scale * (inv_count ? inv_count[0] : 1.f);
}

// Scalar fallback: one block per row.
template <typename T, typename I>
__device__ __forceinline__ void lse_pick_bwd(const T* x, const I* t, const float* lse, const T* g,
                                             const float* inv_count, T* dx, i64 v, i64 ignore, i64 has_ignore,
                                             float scale, i64 g_per_row) {
    const i64 row = blockIdx.x;
    const T* xr = x + row * v;
    T* dr = dx + row * v;
    const i64 c = ce_class(t, row, v, ignore, has_ignore);
    if (c < 0) {
        const float fill = c == CE_IGNORED ? 0.f : CE_NAN;
        for (i64 j = threadIdx.x; j < v; j += blockDim.x) st(dr, j, fill);
        return;
    }
    const float gs = ce_grad_scale(g, inv_count, row, scale, g_per_row);
    const float l = lse[row];
    for (i64 j = threadIdx.x; j < v; j += blockDim.x) {
        const float p = expf(ld(xr, j) - l) * gs;
        st(dr, j, j == c ? p - gs : p);
    }
}

// 16-byte vectors: block (blockIdx.y) of row blockIdx.x covers the vectors
// [blockIdx.y · blockDim.x · 4, (blockIdx.y + 1) · blockDim.x · 4), thread t the 4 vectors
// base + t + k · blockDim.x.
template <typename T, typename I>
__device__ __forceinline__ void lse_pick_bwd_vec(const T* x, const I* t, const float* lse, const T* g,
                                                 const float* inv_count, T* dx, i64 v, i64 ignore, i64 has_ignore,
                                                 float scale, i64 g_per_row) {
    constexpr int N = Vec<T>::N;
    constexpr int K = 4;
    const i64 row = blockIdx.x;
    const i64 nv = v / N;
    const i64 j0 = (i64)blockIdx.y * blockDim.x * K + threadIdx.x;
    const uint4* xv = reinterpret_cast<const uint4*>(x + row * v);
    uint4* dv = reinterpret_cast<uint4*>(dx + row * v);
    const i64 c = ce_class(t, row, v, ignore, has_ignore);
    if (c < 0) {
        float fill[N];
#pragma unroll
        for (int e = 0; e < N; ++e) fill[e] = c == CE_IGNORED ? 0.f : CE_NAN;
        const uint4 u = pack16<T>(fill);
#pragma unroll
        for (int k = 0; k < K; ++k) {
            const i64 j = j0 + (i64)k * blockDim.x;
            if (j < nv) dv[j] = u;
        }
        return;
    }
    const float gs = ce_grad_scale(g, inv_count, row, scale, g_per_row);
    const float l = lse[row];
    uint4 u[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const i64 j = j0 + (i64)k * blockDim.x;
        if (j < nv) u[k] = xv[j];
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const i64 j = j0 + (i64)k * blockDim.x;
        if (j < nv) {
            float f[N];
            unpack16<T>(u[k], f);
            const i64 off = c - j * N;  // element e of this vector is the target when e == off
#pragma unroll
            for (int e = 0; e < N; ++e) {
                const float p = expf(f[e] - l) * gs;
                f[e] = e == off ? p - gs : p;
            }
            dv[j] = pack16<T>(f);
        }
    }
}

#define LOSS_KERNELS(SFX, T, ISFX, I)                                                                            \
    extern "C" __global__ void lse_pick_##ISFX##_##SFX(const T* x, const I* t, float* lse, float* picked,        \
                                                       i64 rows, i64 v, i64 ignore, i64 has_ignore) {            \
        lse_pick<T, I>(x, t, lse, picked, v, ignore, has_ignore);                                                \
    }                                                                                                            \
    extern "C" __global__ void lse_pick_loop_##ISFX##_##SFX(const T* x, const I* t, float* lse, float* picked,   \
                                                            i64 rows, i64 v, i64 ignore, i64 has_ignore) {       \
        lse_pick_loop<T, I>(x, t, lse, picked, v, ignore, has_ignore);                                           \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256, 8) lse_pick_v1_##ISFX##_##SFX(                             \
        const T* x, const I* t, float* lse, float* picked, i64 rows, i64 v, i64 ignore, i64 has_ignore) {        \
        lse_pick_vec<T, I, 1>(x, t, lse, picked, rows, v, ignore, has_ignore);                                   \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256, 8) lse_pick_v2_##ISFX##_##SFX(                             \
        const T* x, const I* t, float* lse, float* picked, i64 rows, i64 v, i64 ignore, i64 has_ignore) {        \
        lse_pick_vec<T, I, 2>(x, t, lse, picked, rows, v, ignore, has_ignore);                                   \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256) lse_pick_v4_##ISFX##_##SFX(                                \
        const T* x, const I* t, float* lse, float* picked, i64 rows, i64 v, i64 ignore, i64 has_ignore) {        \
        lse_pick_vec<T, I, 4>(x, t, lse, picked, rows, v, ignore, has_ignore);                                   \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(512) lse_pick_v8_##ISFX##_##SFX(                                \
        const T* x, const I* t, float* lse, float* picked, i64 rows, i64 v, i64 ignore, i64 has_ignore) {        \
        lse_pick_vec<T, I, 8>(x, t, lse, picked, rows, v, ignore, has_ignore);                                   \
    }                                                                                                            \
    extern "C" __global__ void ce_mean_##ISFX##_##SFX(const float* picked, const I* t, T* out, float* inv_count, \
                                                      i64 rows, i64 ignore, i64 has_ignore) {                    \
        ce_mean<T, I>(picked, t, out, inv_count, rows, ignore, has_ignore);                                      \
    }                                                                                                            \
    extern "C" __global__ void lse_pick_bwd_##ISFX##_##SFX(const T* x, const I* t, const float* lse, const T* g, \
                                                           const float* inv_count, T* dx, i64 v, i64 ignore,     \
                                                           i64 has_ignore, float scale, i64 g_per_row) {         \
        lse_pick_bwd<T, I>(x, t, lse, g, inv_count, dx, v, ignore, has_ignore, scale, g_per_row);                \
    }                                                                                                            \
    extern "C" __global__ void lse_pick_bwd_vec_##ISFX##_##SFX(                                                  \
        const T* x, const I* t, const float* lse, const T* g, const float* inv_count, T* dx, i64 v, i64 ignore,  \
        i64 has_ignore, float scale, i64 g_per_row) {                                                            \
        lse_pick_bwd_vec<T, I>(x, t, lse, g, inv_count, dx, v, ignore, has_ignore, scale, g_per_row);            \
    }

LOSS_KERNELS(f32, float, i64, i64)
LOSS_KERNELS(bf16, bf16_t, i64, i64)
LOSS_KERNELS(f32, float, u32, unsigned int)
LOSS_KERNELS(bf16, bf16_t, u32, unsigned int)
