// Fused losses from logits, never materialising the softmax (src/backend/cuda/ops/loss.rs, CPU
// reference src/ops/loss.rs). x: contiguous logits [rows, v]; t: i64 [rows], the target id of
// each row or −1 for an ignored row; lse, picked: f32 [rows].
//
//   lse_pick:        one block per row: lse = log Σ_j e^{x_j} (online max/sum, one pass),
//                    picked = x_t − lse (0 for ignored rows)
//   ce_mean:         one block: out[0] = −Σ_rows picked · scale  (scale = 1 / #counted rows)
//   lse_pick_bwd:    one block per row: dx_j = (e^{x_j − lse} − [j = t]) · g_r · scale, 0 for
//                    ignored rows; g_r = g[row] when g_per_row, else g[0].
//                    cross_entropy: scale = 1/n, g scalar.  log_prob_of: scale = −1, g per row.

template <typename T>
__device__ __forceinline__ void lse_pick(const T* x, const i64* t, float* lse, float* picked, i64 v) {
    __shared__ float scratch[32];
    const i64 row = blockIdx.x;
    const T* xr = x + row * v;
    // Per thread: running max m and Σ e^{x − m} over its strided elements.
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
    if (threadIdx.x == 0) {
        lse[row] = l;
        const i64 c = t[row];
        picked[row] = c >= 0 ? ld(xr, c) - l : 0.f;
    }
}

template <typename T>
__device__ __forceinline__ void ce_mean(const float* picked, T* out, i64 rows, float scale) {
    __shared__ float scratch[32];
    float acc = 0.f;
    for (i64 r = threadIdx.x; r < rows; r += blockDim.x) acc += picked[r];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) st(out, 0, 0.f - acc * scale);
}

template <typename T>
__device__ __forceinline__ void lse_pick_bwd(const T* x, const i64* t, const float* lse, const T* g, T* dx, i64 v,
                                             float scale, i64 g_per_row) {
    const i64 row = blockIdx.x;
    const T* xr = x + row * v;
    T* dr = dx + row * v;
    const i64 c = t[row];
    if (c < 0) {
        for (i64 j = threadIdx.x; j < v; j += blockDim.x) st(dr, j, 0.f);
        return;
    }
    const float gs = ld(g, g_per_row ? row : 0) * scale;
    const float l = lse[row];
    for (i64 j = threadIdx.x; j < v; j += blockDim.x) {
        const float p = expf(ld(xr, j) - l) * gs;
        st(dr, j, j == c ? p - gs : p);
    }
}

#define LOSS_KERNELS(SFX, T)                                                                                      \
    extern "C" __global__ void lse_pick_##SFX(const T* x, const i64* t, float* lse, float* picked, i64 v) {        \
        lse_pick<T>(x, t, lse, picked, v);                                                                        \
    }                                                                                                             \
    extern "C" __global__ void ce_mean_##SFX(const float* picked, T* out, i64 rows, float scale) {                \
        ce_mean<T>(picked, out, rows, scale);                                                                     \
    }                                                                                                             \
    extern "C" __global__ void lse_pick_bwd_##SFX(const T* x, const i64* t, const float* lse, const T* g, T* dx,   \
                                                  i64 v, float scale, i64 g_per_row) {                            \
        lse_pick_bwd<T>(x, t, lse, g, dx, v, scale, g_per_row);                                                   \
    }

LOSS_KERNELS(f32, float)
LOSS_KERNELS(bf16, bf16_t)
