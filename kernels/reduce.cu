// Reductions and softmax (src/backend/cuda/ops/reduce.rs).
//
// Every kernel here sees its input as a contiguous [outer, n, inner] tensor and works on the
// middle dim: "row" r (0 <= r < rows = outer * inner) is the n elements at
// row_base(r) + j * inner, j < n, and a per-row result is stored at index r (the
// [outer, inner] keep-dim layout). inner = 1 is the plain last-dim case.
//
// Row kernels (reduce_rows, max_backward, softmax, softmax_backward, logsumexp_backward) give
// each row to a group of threads:
//   warp mode:  blockDim = (32, R): warp threadIdx.y of block b handles row b * R + threadIdx.y;
//   block mode: blockDim = (T, 1), T a multiple of 32 (> 32): block b handles row b.
// reduce_cols (inner >= 32): blockDim = (32, Y); block b handles columns
// [c0, c0 + 32) of one outer index, threadIdx.y strides over n, partial results are combined
// through shared memory (coalesced reads for leading-dim reductions such as bias gradients).
//
// All sums are in a fixed order (deterministic), accumulated in float.

#define R_SUM 0
#define R_MAX 1
#define R_LSE 2  // log sum exp (stable; -inf for an empty or all -inf row)

__device__ __forceinline__ i64 row_base(i64 r, i64 n, i64 inner) {
    return (r / inner) * n * inner + r % inner;
}

__device__ __forceinline__ i64 group_row() {
    return (i64)blockIdx.x * blockDim.y + threadIdx.y;
}

// Sum / max over the thread group of a row (see the header). Every thread gets the result.
// In block mode these synchronise the block: call them from all threads.
__device__ __forceinline__ float group_sum(float v, float* scratch) {
    return blockDim.x == 32 ? warp_sum(v) : block_sum(v, scratch);
}
__device__ __forceinline__ float group_max(float v, float* scratch) {
    return blockDim.x == 32 ? warp_max(v) : block_max(v, scratch);
}

__device__ __forceinline__ i64 min_i64(i64 a, i64 b) { return a < b ? a : b; }
__device__ __forceinline__ i64 warp_min_i64(i64 v) {
    for (int o = 16; o > 0; o >>= 1) v = min_i64(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ i64 group_min_i64(i64 v, i64* scratch) {
    v = warp_min_i64(v);
    if (blockDim.x == 32) return v;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int nw = (blockDim.x + 31) >> 5;
    v = lane < nw ? scratch[lane] : 0x7fffffffffffffffll;
    return warp_min_i64(v);
}

// ------------------------------------------------------------------------------ reductions

template <typename T>
__device__ void reduce_rows_impl(const T* x, T* out, i64 rows, i64 n, i64 inner, i64 op) {
    __shared__ float scratch[32];
    const i64 r = group_row();
    if (r >= rows) return;  // warp mode only (block mode launches exactly `rows` blocks)
    const T* p = x + row_base(r, n, inner);
    const int t = threadIdx.x, nt = blockDim.x;
    float res;
    if (op == R_SUM) {
        float acc = 0.f;
        for (i64 j = t; j < n; j += nt) acc += ld(p, j * inner);
        res = group_sum(acc, scratch);
    } else {
        float m = NEG_INF;
        for (i64 j = t; j < n; j += nt) m = fmaxf(m, ld(p, j * inner));
        m = group_max(m, scratch);
        if (op == R_MAX || m == NEG_INF) {
            res = m;
        } else {
            float s = 0.f;
            for (i64 j = t; j < n; j += nt) s += expf(ld(p, j * inner) - m);
            res = m + logf(group_sum(s, scratch));
        }
    }
    if (t == 0) st(out, r, res);
}

template <typename T>
__device__ void reduce_cols_impl(const T* x, T* out, i64 outer, i64 n, i64 inner, i64 op) {
    __shared__ float part[32][33];
    __shared__ float colmax[32];
    const int tx = threadIdx.x, ty = threadIdx.y, ny = blockDim.y;
    const i64 cblocks = (inner + 31) / 32;
    const i64 o = blockIdx.x / cblocks;
    const i64 c = (blockIdx.x % cblocks) * 32 + tx;
    const bool valid = o < outer && c < inner;
    const T* p = x + o * n * inner + c;  // dereferenced only when valid
    float res = 0.f;
    if (op == R_SUM) {
        float acc = 0.f;
        if (valid)
            for (i64 j = ty; j < n; j += ny) acc += ld(p, j * inner);
        part[ty][tx] = acc;
        __syncthreads();
        if (ty == 0) {
            float s = 0.f;
            for (int k = 0; k < ny; ++k) s += part[k][tx];
            res = s;
        }
    } else {
        float m = NEG_INF;
        if (valid)
            for (i64 j = ty; j < n; j += ny) m = fmaxf(m, ld(p, j * inner));
        part[ty][tx] = m;
        __syncthreads();
        if (ty == 0) {
            float mm = NEG_INF;
            for (int k = 0; k < ny; ++k) mm = fmaxf(mm, part[k][tx]);
            colmax[tx] = mm;
        }
        __syncthreads();  // also: every read of `part` above is done before it is rewritten
        m = colmax[tx];
        if (op == R_MAX) {
            res = m;
        } else {
            // Block-uniform branch (it synchronises); m = -inf (all -inf column, or a column
            // past `inner`) skips the exp loop and gives -inf.
            float s = 0.f;
            if (valid && m != NEG_INF)
                for (i64 j = ty; j < n; j += ny) s += expf(ld(p, j * inner) - m);
            part[ty][tx] = s;
            __syncthreads();
            if (ty == 0) {
                float ss = 0.f;
                for (int k = 0; k < ny; ++k) ss += part[k][tx];
                res = m == NEG_INF ? NEG_INF : m + logf(ss);
            }
        }
    }
    if (ty == 0 && valid) st(out, o * inner + c, res);
}

// dx = one-hot of the first maximal element of each row (NaN ignored, as on the CPU; the
// first element when it is NaN or no element exceeds it), times g[row].
template <typename T>
__device__ void max_backward_impl(const T* x, const T* g, T* dx, i64 rows, i64 n, i64 inner) {
    __shared__ float scratch[32];
    __shared__ i64 iscratch[32];
    const i64 r = group_row();
    if (r >= rows) return;
    const i64 base = row_base(r, n, inner);
    const T* p = x + base;
    const int t = threadIdx.x, nt = blockDim.x;
    float m = NEG_INF;
    for (i64 j = t; j < n; j += nt) m = fmaxf(m, ld(p, j * inner));
    m = group_max(m, scratch);
    i64 first = n;
    for (i64 j = t; j < n; j += nt) {
        if (ld(p, j * inner) == m) {
            first = j;
            break;
        }
    }
    first = group_min_i64(first, iscratch);
    const float x0 = n > 0 ? ld(p, 0) : 0.f;
    if (first >= n || x0 != x0) first = 0;
    const float gv = ld(g, r);
    for (i64 j = t; j < n; j += nt) st(dx, base + j * inner, j == first ? gv : 0.f);
}

// ------------------------------------------------------------------------------ softmax

// y = softmax(x) (log = 0) or log_softmax(x) (log = 1) along the middle dim.
template <typename T>
__device__ void softmax_impl(const T* x, T* y, i64 rows, i64 n, i64 inner, i64 log) {
    __shared__ float scratch[32];
    const i64 r = group_row();
    if (r >= rows) return;
    const i64 base = row_base(r, n, inner);
    const T* p = x + base;
    const int t = threadIdx.x, nt = blockDim.x;
    float m = NEG_INF;
    for (i64 j = t; j < n; j += nt) m = fmaxf(m, ld(p, j * inner));
    m = group_max(m, scratch);
    float s = 0.f;
    for (i64 j = t; j < n; j += nt) s += expf(ld(p, j * inner) - m);
    s = group_sum(s, scratch);
    if (log) {
        const float lse = m == NEG_INF ? NEG_INF : m + logf(s);
        for (i64 j = t; j < n; j += nt) st(y, base + j * inner, ld(p, j * inner) - lse);
    } else {
        const float inv = 1.f / s;
        for (i64 j = t; j < n; j += nt) st(y, base + j * inner, expf(ld(p, j * inner) - m) * inv);
    }
}

// softmax:     dx = y * (g - Σ g*y)
// log_softmax: dx = g - exp(y) * Σ g
template <typename T>
__device__ void softmax_backward_impl(const T* y, const T* g, T* dx, i64 rows, i64 n, i64 inner, i64 log) {
    __shared__ float scratch[32];
    const i64 r = group_row();
    if (r >= rows) return;
    const i64 base = row_base(r, n, inner);
    const int t = threadIdx.x, nt = blockDim.x;
    float s = 0.f;
    if (log) {
        for (i64 j = t; j < n; j += nt) s += ld(g, base + j * inner);
    } else {
        for (i64 j = t; j < n; j += nt) {
            const i64 k = base + j * inner;
            s += ld(g, k) * ld(y, k);
        }
    }
    s = group_sum(s, scratch);
    for (i64 j = t; j < n; j += nt) {
        const i64 k = base + j * inner;
        const float yv = ld(y, k), gv = ld(g, k);
        st(dx, k, log ? gv - expf(yv) * s : yv * (gv - s));
    }
}

// d logsumexp / dx = softmax(x): dx = g[row] * exp(x - max) / Σ exp(x - max), recomputed
// from x in float (the saved logsumexp may be bf16).
template <typename T>
__device__ void logsumexp_backward_impl(const T* x, const T* g, T* dx, i64 rows, i64 n, i64 inner) {
    __shared__ float scratch[32];
    const i64 r = group_row();
    if (r >= rows) return;
    const i64 base = row_base(r, n, inner);
    const T* p = x + base;
    const int t = threadIdx.x, nt = blockDim.x;
    float m = NEG_INF;
    for (i64 j = t; j < n; j += nt) m = fmaxf(m, ld(p, j * inner));
    m = group_max(m, scratch);
    float s = 0.f;
    for (i64 j = t; j < n; j += nt) s += expf(ld(p, j * inner) - m);
    s = group_sum(s, scratch);
    const float scale = ld(g, r) / s;
    for (i64 j = t; j < n; j += nt) st(dx, base + j * inner, expf(ld(p, j * inner) - m) * scale);
}

// ------------------------------------------------------------------------------ softmax, vectorised

// Fast paths of softmax / softmax_backward for the last dim (inner = 1) when n is a multiple of
// N = 16 / sizeof(T) (8 bf16, 4 f32) and every pointer is 16-byte aligned (checked on the
// host, RowVec in src/backend/cuda/ops/reduce.rs). The row stays in registers: one read of x
// (forward) or of y and g (backward). Launch as the row kernels above (warp mode blockDim
// (32, R), block mode (T, 1)); thread t of a row holds the 16-byte vectors t + k·blockDim.x,
// k < VPT. Same formulas as softmax_impl / softmax_backward_impl, with e^x as fast_exp2
// (kernels/common.cuh) and bf16 rounded by one cvt per pair: with expf and the bitwise f2bf
// the forward ran at ~25 instructions per element, issue-bound at bf16 bandwidth.

template <typename T, int VPT>
__device__ __forceinline__ void softmax_vec_impl(const T* x, T* y, i64 rows, i64 n, i64 log) {
    constexpr int N = Vec<T>::N;
    __shared__ float scratch[32];
    const i64 r = group_row();
    if (r >= rows) return;  // warp mode only (whole warps; no block barrier in warp mode)
    const int nv = (int)(n / N);
    const uint4* xr = reinterpret_cast<const uint4*>(x + r * n);
    T* yr = y + r * n;
    const int t = threadIdx.x, nt = blockDim.x;
    float v[VPT][N];
    float m = NEG_INF;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
        const int j = t + k * nt;
        if (j < nv) {
            unpack16<T>(xr[j], v[k]);
#pragma unroll
            for (int e = 0; e < N; ++e) m = fmaxf(m, v[k][e]);
        }
    }
    m = group_max(m, scratch);
    // e^{x - m} = 2^{x·log2e − m·log2e}: one fma and one MUFU.EX2 per element (expf costs ~8
    // instructions, which made this kernel issue-bound at bf16 bandwidth). m = ±inf gives NaN
    // where x = m, as expf(x - m) does.
    const float mlog2e = m * LOG2E_F;
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
        if (t + k * nt < nv) {
#pragma unroll
            for (int e = 0; e < N; ++e) {
                const float ex = fast_exp2(fmaf(v[k][e], LOG2E_F, -mlog2e));
                s += ex;
                if (!log) v[k][e] = ex;  // softmax keeps e^{x - m}, log_softmax keeps x
            }
        }
    }
    s = group_sum(s, scratch);
    // softmax: y = e^{x - m} / s;  log_softmax: y = x - lse.
    const float lse = m == NEG_INF ? NEG_INF : m + logf(s);
    const float inv = 1.f / s;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
        const int j = t + k * nt;
        if (j < nv) {
            float o[N];
            if (log) {
#pragma unroll
                for (int e = 0; e < N; ++e) o[e] = v[k][e] - lse;
            } else {
#pragma unroll
                for (int e = 0; e < N; ++e) o[e] = v[k][e] * inv;
            }
            st16_rn(yr + j * N, o);
        }
    }
}

// softmax:     dx = y * (g - Σ g*y)
// log_softmax: dx = g - exp(y) * Σ g
template <typename T, int VPT>
__device__ __forceinline__ void softmax_backward_vec_impl(const T* y, const T* g, T* dx, i64 rows, i64 n, i64 log) {
    constexpr int N = Vec<T>::N;
    __shared__ float scratch[32];
    const i64 r = group_row();
    if (r >= rows) return;  // warp mode only
    const int nv = (int)(n / N);
    const uint4* yr = reinterpret_cast<const uint4*>(y + r * n);
    const uint4* gr = reinterpret_cast<const uint4*>(g + r * n);
    T* dr = dx + r * n;
    const int t = threadIdx.x, nt = blockDim.x;
    uint4 yv[VPT], gv[VPT];
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
        const int j = t + k * nt;
        yv[k] = j < nv ? yr[j] : make_uint4(0u, 0u, 0u, 0u);  // zero bits = 0.f: adds nothing
        gv[k] = j < nv ? gr[j] : make_uint4(0u, 0u, 0u, 0u);
    }
    // `log` is uniform: separate loops, so softmax does not evaluate the exp of log_softmax.
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
        float yf[N], gf[N];
        unpack16<T>(yv[k], yf);
        unpack16<T>(gv[k], gf);
        if (log) {
#pragma unroll
            for (int e = 0; e < N; ++e) s += gf[e];
        } else {
#pragma unroll
            for (int e = 0; e < N; ++e) s += gf[e] * yf[e];
        }
    }
    s = group_sum(s, scratch);
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
        const int j = t + k * nt;
        if (j < nv) {
            float yf[N], gf[N];
            unpack16<T>(yv[k], yf);
            unpack16<T>(gv[k], gf);
            if (log) {
#pragma unroll
                for (int e = 0; e < N; ++e) yf[e] = gf[e] - fast_exp2(yf[e] * LOG2E_F) * s;
            } else {
#pragma unroll
                for (int e = 0; e < N; ++e) yf[e] = yf[e] * (gf[e] - s);
            }
            st16_rn(dr + j * N, yf);
        }
    }
}

// Launch bounds: the host plan uses at most 256 threads per block for VPT <= 4, 512 for VPT = 8;
// the forward with VPT <= 2 also fits 8 blocks per SM (32 registers, no spills; the backward
// would spill).
#define SOFTMAX_VEC_KERNELS(SFX, T, VPT, MAXT, MINB)                                               \
    extern "C" __global__ void __launch_bounds__(MAXT, MINB)                                       \
        softmax_v##VPT##_##SFX(const T* x, T* y, i64 rows, i64 n, i64 log) {                       \
        softmax_vec_impl<T, VPT>(x, y, rows, n, log);                                              \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(MAXT)                                             \
        softmax_backward_v##VPT##_##SFX(const T* y, const T* g, T* dx, i64 rows, i64 n, i64 log) { \
        softmax_backward_vec_impl<T, VPT>(y, g, dx, rows, n, log);                                 \
    }

SOFTMAX_VEC_KERNELS(f32, float, 1, 256, 8)
SOFTMAX_VEC_KERNELS(f32, float, 2, 256, 8)
SOFTMAX_VEC_KERNELS(f32, float, 4, 256, 1)
SOFTMAX_VEC_KERNELS(f32, float, 8, 512, 1)
SOFTMAX_VEC_KERNELS(bf16, bf16_t, 1, 256, 8)
SOFTMAX_VEC_KERNELS(bf16, bf16_t, 2, 256, 8)
SOFTMAX_VEC_KERNELS(bf16, bf16_t, 4, 256, 1)
SOFTMAX_VEC_KERNELS(bf16, bf16_t, 8, 512, 1)

#define REDUCE_KERNELS(SFX, T)                                                                    \
    extern "C" __global__ void reduce_rows_##SFX(const T* x, T* out, i64 rows, i64 n, i64 inner,  \
                                                 i64 op) {                                        \
        reduce_rows_impl<T>(x, out, rows, n, inner, op);                                          \
    }                                                                                             \
    extern "C" __global__ void reduce_cols_##SFX(const T* x, T* out, i64 outer, i64 n, i64 inner, \
                                                 i64 op) {                                        \
        reduce_cols_impl<T>(x, out, outer, n, inner, op);                                         \
    }                                                                                             \
    extern "C" __global__ void max_backward_##SFX(const T* x, const T* g, T* dx, i64 rows, i64 n, \
                                                  i64 inner) {                                    \
        max_backward_impl<T>(x, g, dx, rows, n, inner);                                           \
    }                                                                                             \
    extern "C" __global__ void softmax_##SFX(const T* x, T* y, i64 rows, i64 n, i64 inner,        \
                                             i64 log) {                                           \
        softmax_impl<T>(x, y, rows, n, inner, log);                                               \
    }                                                                                             \
    extern "C" __global__ void softmax_backward_##SFX(const T* y, const T* g, T* dx, i64 rows,    \
                                                      i64 n, i64 inner, i64 log) {                \
        softmax_backward_impl<T>(y, g, dx, rows, n, inner, log);                                  \
    }                                                                                             \
    extern "C" __global__ void logsumexp_backward_##SFX(const T* x, const T* g, T* dx, i64 rows,  \
                                                        i64 n, i64 inner) {                       \
        logsumexp_backward_impl<T>(x, g, dx, rows, n, inner);                                     \
    }

REDUCE_KERNELS(f32, float)
REDUCE_KERNELS(bf16, bf16_t)
