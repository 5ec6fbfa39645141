// Flash-style scaled-dot-product attention (the "simple correct" version): forward with an
// online softmax in f32 that saves lse = logsumexp of each row's scaled scores, and a
// backward that recomputes P = exp(S - lse) from q, k and lse.
//
// q [B, Hq, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv], each read through its (b, h, t)
// element strides with a unit stride along the head dim. Query head h reads kv head
// h / (Hq / Hkv) (GQA without repeating K/V). out [B, Hq, Tq, Dv] and the gradients are
// contiguous; lse and delta are f32 [B, Hq, Tq].
//
// Visibility of key j for query i of batch b (all optional, combined):
//   causal:   j <= i + (Tk - Tq)                       (bottom-right aligned)
//   kpad:     kpad[b * Tk + j] != 0                     (f32 0/1, [B, Tk])
//   segments: seg_lo[i] <= j < seg_hi[i]                (cu_seqlens; Tq == Tk)
// A row with no visible key outputs zeros (lse = -inf; the backward never reads it).
//
// Tiles: ATT_BQ = 16 queries, ATT_BK = 32 keys (one per lane), 128 threads = 4 warps.
// Head dims up to 32 * ATT_MAXC = 256: a lane owns columns lane + 32 c. Shared tiles are f32
// with an odd row stride (D | 1) so lanes reading different rows hit different banks.

#define ATT_BQ 16
#define ATT_BK 32
#define ATT_THREADS 128
#define ATT_WARPS 4
#define ATT_MAXC 8
#define ATT_ROWS (ATT_BQ / ATT_WARPS)   // query rows per warp (forward, dQ)
#define ATT_KROWS (ATT_BK / ATT_WARPS)  // key rows per warp (dK/dV)
#define FULL_MASK 0xffffffffu

struct AttnShape {
    i64 B, Hq, Hkv, Tq, Tk, D, Dv;
    i64 q_sb, q_sh, q_st;  // element strides of q along b, h, t
    i64 k_sb, k_sh, k_st;
    i64 v_sb, v_sh, v_st;
    i64 causal;            // 0 or 1
};

__device__ __forceinline__ bool att_visible(const AttnShape& s, const float* kpad, const i64* seg_lo,
                                            const i64* seg_hi, i64 b, i64 i, i64 j) {
    if (i >= s.Tq || j >= s.Tk) return false;
    if (s.causal && j > i + (s.Tk - s.Tq)) return false;
    if (kpad != nullptr && kpad[b * s.Tk + j] == 0.f) return false;
    if (seg_lo != nullptr && (j < seg_lo[i] || j >= seg_hi[i])) return false;
    return true;
}

// Dot product of two shared-memory rows (same order everywhere, so the backward recomputes
// exactly the forward's scores).
__device__ __forceinline__ float att_dot(const float* a, const float* b, int n) {
    float s = 0.f;
    for (int d = 0; d < n; ++d) s = fmaf(a[d], b[d], s);
    return s;
}

// Keys [k_lo, k_hi) that queries [q0, q_last] can see (a superset; att_visible decides).
__device__ __forceinline__ void att_key_range(const AttnShape& s, const i64* seg_lo, const i64* seg_hi,
                                              i64 q0, i64 q_last, i64* k_lo, i64* k_hi) {
    i64 lo = 0, hi = s.Tk;
    if (s.causal) {
        i64 c = q_last + (s.Tk - s.Tq) + 1;
        hi = c < hi ? c : hi;
    }
    if (seg_lo != nullptr) {
        lo = seg_lo[q0];
        hi = seg_hi[q_last] < hi ? seg_hi[q_last] : hi;
    }
    *k_lo = lo;
    *k_hi = hi;
}

// rows x n tile of a [*, n] tensor (row stride rs, unit column stride) starting at row r0 into
// shared memory with row stride lds; rows past `limit` are zero.
template <typename T>
__device__ __forceinline__ void att_load_tile(float* dst, int lds, const T* src, i64 rs, i64 r0, int rows,
                                              int n, i64 limit) {
    for (int idx = threadIdx.x; idx < rows * n; idx += blockDim.x) {
        int r = idx / n, c = idx % n;
        i64 gr = r0 + r;
        dst[r * lds + c] = gr < limit ? ld(src, gr * rs + c) : 0.f;
    }
}

// ---------------------------------------------------------------- forward
// grid (ceil(Tq / ATT_BQ), Hq, B); dynamic shared memory
// (ATT_BQ * ldk + ATT_BK * ldk + ATT_BK * ldv) floats, ldk = D | 1, ldv = Dv | 1.
template <typename T>
__device__ __forceinline__ void attn_fwd(const T* __restrict__ q, const T* __restrict__ k,
                                         const T* __restrict__ v, T* __restrict__ o, float* __restrict__ lse,
                                         const float* kpad, const i64* seg_lo, const i64* seg_hi,
                                         const AttnShape& s, float scale) {
    extern __shared__ float smem[];
    const int D = (int)s.D, Dv = (int)s.Dv;
    const int ldk = D | 1, ldv = Dv | 1;
    float* Qs = smem;              // [ATT_BQ][ldk]
    float* Ks = Qs + ATT_BQ * ldk; // [ATT_BK][ldk]
    float* Vs = Ks + ATT_BK * ldk; // [ATT_BK][ldv]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const i64 q0 = (i64)blockIdx.x * ATT_BQ;
    const i64 h = blockIdx.y, b = blockIdx.z;
    const i64 kvh = h / (s.Hq / s.Hkv);
    const T* qp = q + b * s.q_sb + h * s.q_sh;
    const T* kp = k + b * s.k_sb + kvh * s.k_sh;
    const T* vp = v + b * s.v_sb + kvh * s.v_sh;

    att_load_tile(Qs, ldk, qp, s.q_st, q0, ATT_BQ, D, s.Tq);
    const i64 q_last = (q0 + ATT_BQ < s.Tq ? q0 + ATT_BQ : s.Tq) - 1;
    i64 k_lo, k_hi;
    att_key_range(s, seg_lo, seg_hi, q0, q_last, &k_lo, &k_hi);

    float m_r[ATT_ROWS], l_r[ATT_ROWS], acc[ATT_ROWS][ATT_MAXC];
#pragma unroll
    for (int r = 0; r < ATT_ROWS; ++r) {
        m_r[r] = NEG_INF;
        l_r[r] = 0.f;
#pragma unroll
        for (int c = 0; c < ATT_MAXC; ++c) acc[r][c] = 0.f;
    }

    for (i64 k0 = k_lo; k0 < k_hi; k0 += ATT_BK) {
        __syncthreads();  // the previous tile is consumed (and, the first time, Qs is written)
        att_load_tile(Ks, ldk, kp, s.k_st, k0, ATT_BK, D, s.Tk);
        att_load_tile(Vs, ldv, vp, s.v_st, k0, ATT_BK, Dv, s.Tk);
        __syncthreads();
        const i64 kj = k0 + lane;
#pragma unroll
        for (int r = 0; r < ATT_ROWS; ++r) {
            const int i = warp * ATT_ROWS + r;
            const i64 qi = q0 + i;
            float sc = NEG_INF;
            if (att_visible(s, kpad, seg_lo, seg_hi, b, qi, kj)) sc = att_dot(Qs + i * ldk, Ks + lane * ldk, D) * scale;
            const float m_new = fmaxf(m_r[r], warp_max(sc));
            if (m_new == NEG_INF) continue;  // warp-uniform: nothing visible in this row yet
            const float p = sc == NEG_INF ? 0.f : expf(sc - m_new);
            const float alpha = expf(m_r[r] - m_new);  // 0 when m_r was -inf
            l_r[r] = l_r[r] * alpha + warp_sum(p);
            m_r[r] = m_new;
#pragma unroll
            for (int c = 0; c < ATT_MAXC; ++c) acc[r][c] *= alpha;
            for (int j = 0; j < ATT_BK; ++j) {
                const float pj = __shfl_sync(FULL_MASK, p, j);
                const float* vrow = Vs + j * ldv;
#pragma unroll
                for (int c = 0; c < ATT_MAXC; ++c) {
                    const int e = lane + 32 * c;
                    if (e < Dv) acc[r][c] = fmaf(pj, vrow[e], acc[r][c]);
                }
            }
        }
    }

#pragma unroll
    for (int r = 0; r < ATT_ROWS; ++r) {
        const i64 qi = q0 + warp * ATT_ROWS + r;
        if (qi >= s.Tq) continue;
        const i64 row = (b * s.Hq + h) * s.Tq + qi;
        const float inv = l_r[r] > 0.f ? 1.f / l_r[r] : 0.f;
#pragma unroll
        for (int c = 0; c < ATT_MAXC; ++c) {
            const int e = lane + 32 * c;
            if (e < Dv) st(o, row * Dv + e, acc[r][c] * inv);
        }
        if (lane == 0) lse[row] = l_r[r] > 0.f ? m_r[r] + logf(l_r[r]) : NEG_INF;
    }
}

// ---------------------------------------------------------------- backward
// delta[row] = sum_e dout[row, e] * out[row, e] (both contiguous [rows, Dv]); one warp per
// row, ATT_WARPS rows per block of ATT_THREADS.
template <typename T>
__device__ __forceinline__ void attn_bwd_delta(const T* __restrict__ dout, const T* __restrict__ out,
                                               float* __restrict__ delta, i64 rows, i64 Dv) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const i64 row = (i64)blockIdx.x * ATT_WARPS + warp;
    if (row >= rows) return;  // warp-uniform
    float s = 0.f;
    for (i64 e = lane; e < Dv; e += 32) s += ld(dout, row * Dv + e) * ld(out, row * Dv + e);
    s = warp_sum(s);
    if (lane == 0) delta[row] = s;
}

// dK, dV of one (b, kv head, tile of ATT_BK keys), summed over the GQA group's query heads and
// the query tiles that can see the keys (deterministic: one block owns its outputs).
// grid (ceil(Tk / ATT_BK), Hkv, B); dynamic shared memory
// ((ATT_BK + ATT_BQ) * (ldk + ldv) + 2 * ATT_BQ * (ATT_BK + 1) + 2 * ATT_BQ) floats.
// dout is contiguous [B, Hq, Tq, Dv]; dk [B, Hkv, Tk, D], dv [B, Hkv, Tk, Dv] contiguous.
template <typename T>
__device__ __forceinline__ void attn_bwd_dkdv(const T* __restrict__ q, const T* __restrict__ k,
                                              const T* __restrict__ v, const T* __restrict__ dout,
                                              const float* __restrict__ lse, const float* __restrict__ delta,
                                              T* __restrict__ dk, T* __restrict__ dv, const float* kpad,
                                              const i64* seg_lo, const i64* seg_hi, const AttnShape& s,
                                              float scale) {
    extern __shared__ float smem[];
    const int D = (int)s.D, Dv = (int)s.Dv;
    const int ldk = D | 1, ldv = Dv | 1, ldp = ATT_BK + 1;
    float* Ks = smem;                  // [ATT_BK][ldk]
    float* Vs = Ks + ATT_BK * ldk;     // [ATT_BK][ldv]
    float* Qs = Vs + ATT_BK * ldv;     // [ATT_BQ][ldk]
    float* dOs = Qs + ATT_BQ * ldk;    // [ATT_BQ][ldv]
    float* Ps = dOs + ATT_BQ * ldv;    // [ATT_BQ][ldp]
    float* dSs = Ps + ATT_BQ * ldp;    // [ATT_BQ][ldp]
    float* lse_s = dSs + ATT_BQ * ldp; // [ATT_BQ]
    float* dl_s = lse_s + ATT_BQ;      // [ATT_BQ]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const i64 k0 = (i64)blockIdx.x * ATT_BK;
    const i64 kvh = blockIdx.y, b = blockIdx.z;
    const i64 group = s.Hq / s.Hkv;
    const T* kp = k + b * s.k_sb + kvh * s.k_sh;
    const T* vp = v + b * s.v_sb + kvh * s.v_sh;

    att_load_tile(Ks, ldk, kp, s.k_st, k0, ATT_BK, D, s.Tk);
    att_load_tile(Vs, ldv, vp, s.v_st, k0, ATT_BK, Dv, s.Tk);

    // Queries [q_lo, q_hi) that can see some key of the tile (a superset).
    const i64 k_last = (k0 + ATT_BK < s.Tk ? k0 + ATT_BK : s.Tk) - 1;
    i64 q_lo = 0, q_hi = s.Tq;
    if (s.causal) {
        const i64 c = k0 - (s.Tk - s.Tq);
        q_lo = c > q_lo ? c : q_lo;
    }
    if (seg_lo != nullptr) {  // Tq == Tk: key j's segment is [seg_lo[j], seg_hi[j])
        q_lo = seg_lo[k0] > q_lo ? seg_lo[k0] : q_lo;
        q_hi = seg_hi[k_last] < q_hi ? seg_hi[k_last] : q_hi;
    }

    float dk_acc[ATT_KROWS][ATT_MAXC], dv_acc[ATT_KROWS][ATT_MAXC];
#pragma unroll
    for (int r = 0; r < ATT_KROWS; ++r)
#pragma unroll
        for (int c = 0; c < ATT_MAXC; ++c) {
            dk_acc[r][c] = 0.f;
            dv_acc[r][c] = 0.f;
        }

    for (i64 hg = 0; hg < group; ++hg) {
        const i64 h = kvh * group + hg;
        const T* qp = q + b * s.q_sb + h * s.q_sh;
        const i64 bh = b * s.Hq + h;
        const T* dop = dout + bh * s.Tq * Dv;
        for (i64 q0 = q_lo; q0 < q_hi; q0 += ATT_BQ) {
            __syncthreads();  // the previous query tile is consumed (first time: K, V written)
            att_load_tile(Qs, ldk, qp, s.q_st, q0, ATT_BQ, D, s.Tq);
            att_load_tile(dOs, ldv, dop, (i64)Dv, q0, ATT_BQ, Dv, s.Tq);
            if (threadIdx.x < ATT_BQ) {
                const i64 qi = q0 + threadIdx.x;
                lse_s[threadIdx.x] = qi < s.Tq ? lse[bh * s.Tq + qi] : 0.f;
                dl_s[threadIdx.x] = qi < s.Tq ? delta[bh * s.Tq + qi] : 0.f;
            }
            __syncthreads();
            // P and dS of the 16 x 32 tile: thread (warp, lane) -> rows warp + 4 rr, key lane.
            const i64 kj = k0 + lane;
#pragma unroll
            for (int rr = 0; rr < ATT_ROWS; ++rr) {
                const int i = warp + ATT_WARPS * rr;
                float p = 0.f, ds = 0.f;
                if (att_visible(s, kpad, seg_lo, seg_hi, b, q0 + i, kj)) {
                    const float sc = att_dot(Qs + i * ldk, Ks + lane * ldk, D) * scale;
                    p = expf(sc - lse_s[i]);
                    const float dp = att_dot(dOs + i * ldv, Vs + lane * ldv, Dv);
                    ds = p * (dp - dl_s[i]) * scale;
                }
                Ps[i * ldp + lane] = p;
                dSs[i * ldp + lane] = ds;
            }
            __syncthreads();
            // dV[j] += sum_i P[i, j] dO[i];  dK[j] += sum_i dS[i, j] Q[i]; warp owns keys
            // warp * 8 + r, lane owns columns lane + 32 c.
#pragma unroll
            for (int r = 0; r < ATT_KROWS; ++r) {
                const int j = warp * ATT_KROWS + r;
                for (int i = 0; i < ATT_BQ; ++i) {
                    const float pij = Ps[i * ldp + j], dsij = dSs[i * ldp + j];
                    const float* dorow = dOs + i * ldv;
                    const float* qrow = Qs + i * ldk;
#pragma unroll
                    for (int c = 0; c < ATT_MAXC; ++c) {
                        const int e = lane + 32 * c;
                        if (e < Dv) dv_acc[r][c] = fmaf(pij, dorow[e], dv_acc[r][c]);
                        if (e < D) dk_acc[r][c] = fmaf(dsij, qrow[e], dk_acc[r][c]);
                    }
                }
            }
        }
    }

#pragma unroll
    for (int r = 0; r < ATT_KROWS; ++r) {
        const i64 kj = k0 + warp * ATT_KROWS + r;
        if (kj >= s.Tk) continue;
        const i64 row = (b * s.Hkv + kvh) * s.Tk + kj;
#pragma unroll
        for (int c = 0; c < ATT_MAXC; ++c) {
            const int e = lane + 32 * c;
            if (e < D) st(dk, row * D + e, dk_acc[r][c]);
            if (e < Dv) st(dv, row * Dv + e, dv_acc[r][c]);
        }
    }
}

// dQ of one (b, query head, tile of ATT_BQ queries), looping over the visible key tiles.
// grid (ceil(Tq / ATT_BQ), Hq, B); dynamic shared memory
// ((ATT_BQ + ATT_BK) * (ldk + ldv) + 2 * ATT_BQ) floats. dq [B, Hq, Tq, D] contiguous.
template <typename T>
__device__ __forceinline__ void attn_bwd_dq(const T* __restrict__ q, const T* __restrict__ k,
                                            const T* __restrict__ v, const T* __restrict__ dout,
                                            const float* __restrict__ lse, const float* __restrict__ delta,
                                            T* __restrict__ dq, const float* kpad, const i64* seg_lo,
                                            const i64* seg_hi, const AttnShape& s, float scale) {
    extern __shared__ float smem[];
    const int D = (int)s.D, Dv = (int)s.Dv;
    const int ldk = D | 1, ldv = Dv | 1;
    float* Qs = smem;                  // [ATT_BQ][ldk]
    float* dOs = Qs + ATT_BQ * ldk;    // [ATT_BQ][ldv]
    float* Ks = dOs + ATT_BQ * ldv;    // [ATT_BK][ldk]
    float* Vs = Ks + ATT_BK * ldk;     // [ATT_BK][ldv]
    float* lse_s = Vs + ATT_BK * ldv;  // [ATT_BQ]
    float* dl_s = lse_s + ATT_BQ;      // [ATT_BQ]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const i64 q0 = (i64)blockIdx.x * ATT_BQ;
    const i64 h = blockIdx.y, b = blockIdx.z;
    const i64 kvh = h / (s.Hq / s.Hkv);
    const i64 bh = b * s.Hq + h;
    const T* qp = q + b * s.q_sb + h * s.q_sh;
    const T* kp = k + b * s.k_sb + kvh * s.k_sh;
    const T* vp = v + b * s.v_sb + kvh * s.v_sh;
    const T* dop = dout + bh * s.Tq * Dv;

    att_load_tile(Qs, ldk, qp, s.q_st, q0, ATT_BQ, D, s.Tq);
    att_load_tile(dOs, ldv, dop, (i64)Dv, q0, ATT_BQ, Dv, s.Tq);
    if (threadIdx.x < ATT_BQ) {
        const i64 qi = q0 + threadIdx.x;
        lse_s[threadIdx.x] = qi < s.Tq ? lse[bh * s.Tq + qi] : 0.f;
        dl_s[threadIdx.x] = qi < s.Tq ? delta[bh * s.Tq + qi] : 0.f;
    }
    const i64 q_last = (q0 + ATT_BQ < s.Tq ? q0 + ATT_BQ : s.Tq) - 1;
    i64 k_lo, k_hi;
    att_key_range(s, seg_lo, seg_hi, q0, q_last, &k_lo, &k_hi);

    float acc[ATT_ROWS][ATT_MAXC];
#pragma unroll
    for (int r = 0; r < ATT_ROWS; ++r)
#pragma unroll
        for (int c = 0; c < ATT_MAXC; ++c) acc[r][c] = 0.f;

    for (i64 k0 = k_lo; k0 < k_hi; k0 += ATT_BK) {
        __syncthreads();  // the previous key tile is consumed (first time: Q, dO, lse written)
        att_load_tile(Ks, ldk, kp, s.k_st, k0, ATT_BK, D, s.Tk);
        att_load_tile(Vs, ldv, vp, s.v_st, k0, ATT_BK, Dv, s.Tk);
        __syncthreads();
        const i64 kj = k0 + lane;
#pragma unroll
        for (int r = 0; r < ATT_ROWS; ++r) {
            const int i = warp * ATT_ROWS + r;
            float ds = 0.f;
            if (att_visible(s, kpad, seg_lo, seg_hi, b, q0 + i, kj)) {
                const float sc = att_dot(Qs + i * ldk, Ks + lane * ldk, D) * scale;
                const float p = expf(sc - lse_s[i]);
                const float dp = att_dot(dOs + i * ldv, Vs + lane * ldv, Dv);
                ds = p * (dp - dl_s[i]) * scale;
            }
            // dQ[i] += sum_j dS[i, j] K[j]
            for (int j = 0; j < ATT_BK; ++j) {
                const float dsj = __shfl_sync(FULL_MASK, ds, j);
                const float* krow = Ks + j * ldk;
#pragma unroll
                for (int c = 0; c < ATT_MAXC; ++c) {
                    const int e = lane + 32 * c;
                    if (e < D) acc[r][c] = fmaf(dsj, krow[e], acc[r][c]);
                }
            }
        }
    }

#pragma unroll
    for (int r = 0; r < ATT_ROWS; ++r) {
        const i64 qi = q0 + warp * ATT_ROWS + r;
        if (qi >= s.Tq) continue;
        const i64 row = bh * s.Tq + qi;
#pragma unroll
        for (int c = 0; c < ATT_MAXC; ++c) {
            const int e = lane + 32 * c;
            if (e < D) st(dq, row * D + e, acc[r][c]);
        }
    }
}

#define ATTN_KERNELS(SFX, T)                                                                          \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                         \
        attn_fwd_##SFX(const T* q, const T* k, const T* v, T* o, float* lse, const float* kpad,       \
                       const i64* seg_lo, const i64* seg_hi, AttnShape s, float scale) {              \
        attn_fwd<T>(q, k, v, o, lse, kpad, seg_lo, seg_hi, s, scale);                                 \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                         \
        attn_bwd_delta_##SFX(const T* dout, const T* out, float* delta, i64 rows, i64 Dv) {           \
        attn_bwd_delta<T>(dout, out, delta, rows, Dv);                                                \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                         \
        attn_bwd_dkdv_##SFX(const T* q, const T* k, const T* v, const T* dout, const float* lse,      \
                            const float* delta, T* dk, T* dv, const float* kpad, const i64* seg_lo,   \
                            const i64* seg_hi, AttnShape s, float scale) {                            \
        attn_bwd_dkdv<T>(q, k, v, dout, lse, delta, dk, dv, kpad, seg_lo, seg_hi, s, scale);          \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                         \
        attn_bwd_dq_##SFX(const T* q, const T* k, const T* v, const T* dout, const float* lse,        \
                          const float* delta, T* dq, const float* kpad, const i64* seg_lo,            \
                          const i64* seg_hi, AttnShape s, float scale) {                              \
        attn_bwd_dq<T>(q, k, v, dout, lse, delta, dq, kpad, seg_lo, seg_hi, s, scale);                \
    }
ATTN_KERNELS(f32, float)
ATTN_KERNELS(bf16, bf16_t)
