// Fused losses from logits, never materialising the softmax (src/backend/cuda/ops/loss.rs, CPU
// reference src/ops/loss.rs). x: contiguous logits [rows, v]; t: the target id of each row,
// i64 or u32 (kernel names ..._i64_<T> / ..._u32_<T>), read on the device: a row whose id
// equals `ignore` (when has_ignore != 0) is ignored, an id outside 0..v is invalid and gives a
// NaN loss and a NaN gradient row (the host cannot report it without a synchronisation);
// lse, picked: f32 [rows].
//
//   lse_pick:        per row: lse = log Σ_j e^{x_j}, picked = x_t − lse (0 for ignored rows,
//                    NaN for invalid ones). Four variants with the same arguments:
//                    lse_pick_warp (one warp per row, blockDim (32, 8), batches of 16-byte
//                    loads, online max/sum: rows up to 8192), lse_pick_v{VPT} (row in
//                    registers, 16-byte loads; launch as RowVec in
//                    src/backend/cuda/ops/reduce.rs: one warp per row for short rows (blockDim
//                    (32, R)), else one block per row), lse_pick_loop (one block per row,
//                    16-byte loads, online max/sum per vector: long rows) and lse_pick (one
//                    block per row, scalar online max/sum: any v and alignment).
//   ce_mean:         one block (any multiple of 32 threads up to 1024): out[0] = −Σ_rows picked
//                    · inv (f32 whatever T: the loss of bf16 logits keeps f32 precision),
//                    inv = 1 / max(#counted rows, 1) (counted = not ignored), inv_count[0] =
//                    inv for the backward.
//   lse_pick_bwd:    dx_j = (e^{x_j − lse} − [j = t]) · g_r · scale · inv, 0 on ignored rows,
//                    NaN on invalid rows; g (f32) is g[row] when g_per_row, else g[0]; inv =
//                    inv_count[0], or 1 when inv_count is null.
//                    cross_entropy: scale = 1, g scalar, inv_count from ce_mean.
//                    log_prob_of: scale = −1, g per row, no inv_count.
//                    lse_pick_bwd_vec: grid (rows, ceil(v / N / (blockDim.x · 4))), 4 16-byte
//                    vectors per thread; lse_pick_bwd: one block per row, scalar.
// The 16-byte variants compute e^{x − m} as fast_exp2 (kernels/common.cuh; ~2 ulp) and round
// bf16 with one cvt per pair: at bf16 bandwidth expf's ~8 instructions per element made them
// issue-bound.
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

// Long rows, 16-byte loads: one block per row, the running max / sum updated once per vector
// (e^x as fast_exp2, as in lse_pick_warp).
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
            s = m > NEG_INF ? s * fast_exp2((m - vm) * LOG2E_F) : 0.f;
            m = vm;
        }
        if (m > NEG_INF) {
            const float mlog2e = m * LOG2E_F;
#pragma unroll
            for (int e = 0; e < N; ++e) s += fast_exp2(fmaf(f[e], LOG2E_F, -mlog2e));
        }
    }
    const float bm = block_max(m, scratch);
    const float sc = m > NEG_INF ? s * fast_exp2((m - bm) * LOG2E_F) : 0.f;
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

// One warp per row (blockDim (32, R), row blockIdx.x · R + threadIdx.y), 16-byte loads: lane l
// reads the vectors l + 32 i in batches of CE_WARP_U per lane, all loads of a batch issued
// before the first use; per lane a running max m of x and s = Σ 2^{(x − m)·log2e} (one fma and
// one MUFU.EX2 per element), combined over the warp at the end. No block barrier, so one row's
// reduction never holds up another's loads.
#define CE_WARP_U 8
// `TESSERA_CE_STAGES=7`: 2 of each batch's 8 vectors (a quarter of the exponentials) by
// poly_exp2, which balances the MUFU (16 ex2 a clock per SM: 16 µs of the 33 µs floor at 16384
// x 4096 by MUFU alone) against the issue slots the polynomial's 12 instructions take (~12 µs
// each at this split, by count).
#define CE_POLY_VECS 2

template <typename T, int U = CE_WARP_U>
__device__ __forceinline__ void ce_warp_load(const uint4* xv, int j0, int nv, uint4* u) {
#pragma unroll
    for (int k = 0; k < U; ++k) {
        const int j = j0 + (int)threadIdx.x + 32 * k;
        u[k] = j < nv ? xv[j] : neg_inf16<T>();  // −inf padding: changes neither max nor sum
    }
}

// Max of the U vectors u. bf16 pairs are compared packed (max.bf16x2: exact, and like
// fmaxf it ignores a NaN), so the batch is unpacked only once, for the exps.
template <int U>
__device__ __forceinline__ float ce_batch_max(const uint4* u, float) {
    float m = NEG_INF;
#pragma unroll
    for (int k = 0; k < U; ++k) {
        m = fmaxf(m, fmaxf(fmaxf(__uint_as_float(u[k].x), __uint_as_float(u[k].y)),
                           fmaxf(__uint_as_float(u[k].z), __uint_as_float(u[k].w))));
    }
    return m;
}
__device__ __forceinline__ unsigned int bf16x2_max(unsigned int a, unsigned int b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned int d;
    asm("max.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
#else
    const float lo = fmaxf(__uint_as_float(a << 16), __uint_as_float(b << 16));
    const float hi = fmaxf(__uint_as_float(a & 0xffff0000u), __uint_as_float(b & 0xffff0000u));
    return (__float_as_uint(lo) >> 16) | (__float_as_uint(hi) & 0xffff0000u);  // exact: bf16 values
#endif
}
template <int U>
__device__ __forceinline__ float ce_batch_max(const uint4* u, bf16_t) {
    unsigned int a = u[0].x, b = u[0].y, c = u[0].z, d = u[0].w;
#pragma unroll
    for (int k = 1; k < U; ++k) {
        a = bf16x2_max(a, u[k].x);
        b = bf16x2_max(b, u[k].y);
        c = bf16x2_max(c, u[k].z);
        d = bf16x2_max(d, u[k].w);
    }
    a = bf16x2_max(bf16x2_max(a, b), bf16x2_max(c, d));
    return fmaxf(__uint_as_float(a << 16), __uint_as_float(a & 0xffff0000u));
}

// s += 2^{x·log2e − mlog2e} over one 16-byte vector's logits, in order: by poly_exp2 on the FMA
// pipe when `poly`, else by MUFU.EX2 (fast_exp2). The callers' `poly` is a constant per unrolled
// vector (`k < POLY`).
template <typename T>
__device__ __forceinline__ void ce_vec_exp_add(const uint4& v, float mlog2e, bool poly, float& s) {
    float f[Vec<T>::N];
    unpack16<T>(v, f);
#pragma unroll
    for (int e = 0; e < Vec<T>::N; ++e) {
        const float x = fmaf(f[e], LOG2E_F, -mlog2e);
        s += poly ? poly_exp2(x) : fast_exp2(x);
    }
}

// One lane's running max m and sum s = Σ 2^{(x − m)·log2e} updated with a batch of U vectors;
// the first POLY vectors' exponentials by poly_exp2 on the FMA pipe, the others by MUFU.EX2
// (`TESSERA_CE_STAGES=7`: POLY = CE_POLY_VECS).
template <typename T, int U = CE_WARP_U, int POLY = 0>
__device__ __forceinline__ void ce_batch_add(const uint4* u, float& m, float& s) {
    const float bm = ce_batch_max<U>(u, T());
    if (bm > m) {
        s = m > NEG_INF ? s * fast_exp2((m - bm) * LOG2E_F) : 0.f;
        m = bm;
    }
    if (m > NEG_INF) {  // else every value so far is −inf: nothing to add
        const float mlog2e = m * LOG2E_F;
#pragma unroll
        for (int k = 0; k < U; ++k) ce_vec_exp_add<T>(u[k], mlog2e, k < POLY, s);
    }
}

// The row's lse and picked value from each lane's (m, s) (warp-wide combine), lane 0 writes.
template <typename T>
__device__ __forceinline__ void ce_warp_finish(const T* xr, i64 c, float m, float s, float* lse, float* picked,
                                               i64 row) {
    // The target's logit (just read by the row: an L2 hit), loaded before the shuffles so its
    // latency overlaps them; loaded earlier, it would wait for t[row] ahead of the row's loads.
    const float xt = ld(xr, c >= 0 ? c : 0);  // same address in every lane: one transaction
    const float wm = warp_max(m);
    const float sc = m > NEG_INF ? s * fast_exp2((m - wm) * LOG2E_F) : 0.f;
    const float ws = warp_sum(sc);
    const float l = wm > NEG_INF ? wm + logf(ws) : NEG_INF;  // all −inf: −inf, as the CPU logsumexp
    if (threadIdx.x == 0) {
        lse[row] = l;
        picked[row] = c >= 0 ? xt - l : (c == CE_IGNORED ? 0.f : CE_NAN);
    }
}

// L2 prefetch of the warp's batch from vector j0 (32 · CE_WARP_U vectors, 4 KB contiguous): lane l
// names its 128-byte line, vectors j0 + 8 l (one instruction, no register written, so nothing
// ever waits for it).
__device__ __forceinline__ void ce_warp_prefetch(const uint4* xv, int j0, int nv) {
    const int j = j0 + 8 * (int)threadIdx.x;
    if (j < nv) asm volatile("prefetch.global.L2 [%0];" ::"l"(xv + j));
}

// PF (`TESSERA_CE_STAGES=1`, an experiment): the next batch prefetched into L2 as this one's
// loads are issued, so its DRAM reads overlap this batch's exponentials (the batch's loads all
// wait on one scoreboard: without it each row exposes a DRAM latency per batch). Same results.
// U (`TESSERA_CE_STAGES=4`, an experiment: 16): vectors per lane and batch, so that a row of
// 4096 bf16 logits is one batch (one DRAM latency a row), with half the warps per SM.
// POLY (`TESSERA_CE_STAGES=7`): vectors of each batch whose exponentials poly_exp2 computes.
template <typename T, typename I, bool PF = false, int U = CE_WARP_U, int POLY = 0>
__device__ __forceinline__ void lse_pick_warp(const T* x, const I* t, float* lse, float* picked, i64 rows, i64 v,
                                              i64 ignore, i64 has_ignore) {
    constexpr int N = Vec<T>::N;
    const i64 row = (i64)blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= rows) return;  // whole warps
    const T* xr = x + row * v;
    const uint4* xv = reinterpret_cast<const uint4*>(xr);
    const int nv = (int)(v / N);
    uint4 u[U];
    ce_warp_load<T, U>(xv, 0, nv, u);
    if (PF) ce_warp_prefetch(xv, 32 * U, nv);
    const i64 c = ce_class(t, row, v, ignore, has_ignore);
    float m = NEG_INF, s = 0.f;
    for (int j0 = 0;;) {
        ce_batch_add<T, U, POLY>(u, m, s);
        j0 += 32 * U;
        if (j0 >= nv) break;
        ce_warp_load<T, U>(xv, j0, nv, u);
        if (PF) ce_warp_prefetch(xv, j0 + 32 * U, nv);
    }
    ce_warp_finish<T>(xr, c, m, s, lse, picked, row);
}

// lse_pick_warp with the row staged through shared memory by cp.async (an experiment for the
// forward's bandwidth; `TESSERA_CE_STAGES` = S picks it): each lane copies its CE_WARP_U
// vectors of a batch into its own slots, S batches in flight, so the loads of the next
// batches are issued before this batch's exps without holding them in registers
// (lse_pick_warp holds one batch, so its next loads wait for the exps). A lane reads back only
// what it copied itself: cp.async.wait_group alone orders them. Dynamic shared memory:
// blockDim.y · S · CE_WARP_U · 32 · 16 bytes.
template <typename T, int S>
__device__ __forceinline__ void ce_stage_issue(uint4* slots, const uint4* xv, int b, int nb, int nv) {
    if (b < nb) {
        uint4* dst = slots + (b % S) * (CE_WARP_U * 32);
#pragma unroll
        for (int k = 0; k < CE_WARP_U; ++k) {
            const int j = b * (32 * CE_WARP_U) + (int)threadIdx.x + 32 * k;
            if (j < nv) cp_async16(dst + 32 * k, xv + j, true);
            else dst[32 * k] = neg_inf16<T>();  // −inf padding: changes neither max nor sum
        }
    }
    cp_async_commit();  // empty groups too: the wait below counts groups
}

template <typename T, typename I, int S>
__device__ __forceinline__ void lse_pick_staged(const T* x, const I* t, float* lse, float* picked, i64 rows, i64 v,
                                                i64 ignore, i64 has_ignore) {
    extern __shared__ uint4 ce_smem[];
    constexpr int N = Vec<T>::N;
    const i64 row = (i64)blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= rows) return;  // whole warps
    uint4* slots = ce_smem + (i64)threadIdx.y * (S * CE_WARP_U * 32) + threadIdx.x;
    const T* xr = x + row * v;
    const uint4* xv = reinterpret_cast<const uint4*>(xr);
    const int nv = (int)(v / N);
    const int nb = (nv + 32 * CE_WARP_U - 1) / (32 * CE_WARP_U);
#pragma unroll
    for (int b = 0; b < S - 1; ++b) ce_stage_issue<T, S>(slots, xv, b, nb, nv);
    const i64 c = ce_class(t, row, v, ignore, has_ignore);
    float m = NEG_INF, s = 0.f;
    for (int b = 0; b < nb; ++b) {
        // Into the slot batch b − 1 used (read above, in this lane's program order).
        ce_stage_issue<T, S>(slots, xv, b + S - 1, nb, nv);
        cp_async_wait<S - 1>();  // batch b has landed
        uint4 u[CE_WARP_U];
        const uint4* src = slots + (b % S) * (CE_WARP_U * 32);
#pragma unroll
        for (int k = 0; k < CE_WARP_U; ++k) u[k] = src[32 * k];
        ce_batch_add<T>(u, m, s);
    }
    ce_warp_finish<T>(xr, c, m, s, lse, picked, row);
}

// The cross-entropy mean's last step, called by every thread of the block (at most 8 warps)
// with the block's sums in thread 0: p of the picked values, c of the counted rows. Thread 0
// writes them to partial[2b], partial[2b + 1]; the last block to finish (the device counter
// `done`, zero between launches: the last block resets it) sums the partials in a fixed order
// and writes out = -sum / max(count, 1) and inv_count.
__device__ __forceinline__ void ce_finish_mean(float p, float c, float* partial, unsigned int* done, float* out,
                                               float* inv_count) {
    __shared__ float scratch[2][8];
    __shared__ unsigned int is_last;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x, nthreads = blockDim.x * blockDim.y;
    if (tid == 0) {
        partial[2 * blockIdx.x] = p;
        partial[2 * blockIdx.x + 1] = c;
        __threadfence();  // the partials are visible device-wide before the count says so
        is_last = atomicAdd(done, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    // Each thread's partials in 8 loads issued together (L2: written by other blocks), then
    // added in the order b = tid, tid + nthreads, ...: this tail runs after every other block,
    // so it costs one L2 latency instead of one per step (2048 blocks at 16384 rows).
    float acc = 0.f, cnt = 0.f;
    const i64 nb = gridDim.x;
    for (i64 b0 = tid; b0 < nb; b0 += 8 * (i64)nthreads) {
        float2 pc[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const i64 b = b0 + (i64)k * nthreads;
            pc[k] = b < nb ? __ldcg(reinterpret_cast<const float2*>(partial) + b) : make_float2(0.f, 0.f);
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            acc += pc[k].x;
            cnt += pc[k].y;
        }
    }
    acc = warp_sum(acc);
    cnt = warp_sum(cnt);
    const int lane = tid & 31, warp = tid >> 5, nw = nthreads >> 5;
    if (lane == 0) {
        scratch[0][warp] = acc;
        scratch[1][warp] = cnt;
    }
    __syncthreads();
    if (tid == 0) {
        float a = 0.f, n = 0.f;
        for (int w = 0; w < nw; ++w) {
            a += scratch[0][w];
            n += scratch[1][w];
        }
        const float inv = 1.f / (n > 0.f ? n : 1.f);
        out[0] = 0.f - a * inv;
        inv_count[0] = inv;
        *done = 0u;  // ready for the next launch (kernels of one stream run in order)
    }
}

// lse_pick_warp with cross_entropy's mean fused in (one launch instead of two: at 16384 x 4096
// bf16 the separate one-block ce_mean cost ~5 us of a 35 us floor). Each block sums its rows'
// picked values and counted rows (warp 0, fixed order), then ce_finish_mean. Deterministic.
// Counts are kept as floats (exact below 2^24 rows; the launcher checks).
// S = 1: lse_pick_warp with the L2 prefetch; S = 2, 3: the rows through lse_pick_staged<S>
// (dynamic shared memory as there); S = 4: lse_pick_warp with batches of 2 · CE_WARP_U vectors.
template <typename T, typename I, int S>
__device__ __forceinline__ void ce_warp_mean(const T* x, const I* t, float* lse, float* picked, i64 rows, i64 v,
                                             i64 ignore, i64 has_ignore, float* partial, unsigned int* done, float* out,
                                             float* inv_count) {
    // Both return, not exit: the block's barriers below need every warp.
    if (S <= 1) lse_pick_warp<T, I, S == 1>(x, t, lse, picked, rows, v, ignore, has_ignore);
    else if (S == 4) lse_pick_warp<T, I, false, 2 * CE_WARP_U>(x, t, lse, picked, rows, v, ignore, has_ignore);
    else if (S == 7)
        lse_pick_warp<T, I, false, CE_WARP_U, CE_POLY_VECS>(x, t, lse, picked, rows, v, ignore, has_ignore);
    else lse_pick_staged<T, I, (S == 2 || S == 3 ? S : 2)>(x, t, lse, picked, rows, v, ignore, has_ignore);
    __syncthreads();  // this block's picked[] are written (and visible to the block)
    float p = 0.f, c = 0.f;
    if (threadIdx.y == 0) {
        const i64 row = (i64)blockIdx.x * blockDim.y + threadIdx.x;
        if (threadIdx.x < blockDim.y && row < rows) {
            p = picked[row];
            c = has_ignore && (i64)t[row] == ignore ? 0.f : 1.f;
        }
        p = warp_sum(p);
        c = warp_sum(c);
    }
    ce_finish_mean(p, c, partial, done, out, inv_count);
}

// The cross-entropy forward with the mean fused in, rows streamed into shared memory by the
// bulk-copy engine (sm_90; `TESSERA_CE_STAGES=5`, an experiment for issue 4's bandwidth target).
// In lse_pick_warp a warp's next loads wait for its exponentials, so the bytes in flight per SM
// fall while it computes, and at one warp per row the 16 MUFU ex2 a clock per SM are busy for
// half of the memory floor (67 M exponentials at 16384 x 4096). Here lane 0 of each warp keeps
// STAGES - 1 rows in flight (cp.async.bulk into per-warp stage buffers, an mbarrier
// each) while the warp computes the current row from shared memory: the max (bf16x2 max),
// then one exp2 per logit, lse = max + log(sum). Persistent warps: warp w of the grid takes
// rows w, w + W, ... (W = gridDim.x · CE_BULK_WARPS). Rows of up to CE_BULK_ROW bytes, 16-byte
// aligned (the launcher checks). Each warp sums its rows' picked values and counts in row
// order (lane 0), the block its warps in order, then ce_finish_mean: deterministic for a given
// grid. Launch: block (32, CE_BULK_WARPS), dynamic shared memory 128 + CE_BULK_WARPS · STAGES
// · CE_BULK_ROW bytes: STAGES = 3 (`ce_bulk_mean`, 2 rows ahead a warp, 2 blocks an SM) or 2
// (`ce_bulk2_mean`, `TESSERA_CE_STAGES=6`: 1 row ahead, 3 blocks an SM). POLY: of each lane's
// CE_WARP_U vectors a pass, the first POLY's exponentials by poly_exp2 on the FMA pipe
// (`ce_bulk_poly_mean`, `TESSERA_CE_STAGES=8`: 5's data path with 7's exponentials).
// TESSERA_ARCH_SUFFIX_A: this file gets kernels/hopper.cuh (mbarriers, bulk copies) and the
// sm_90a target on Hopper; the kernel is empty below sm_90, where the launcher never picks it.
#define CE_BULK_WARPS 4
#define CE_BULK_ROW 8192
template <typename T, typename I, int STAGES, int POLY = 0>
__device__ __forceinline__ void ce_bulk_mean(const T* x, const I* t, float* lse, float* picked, i64 rows, i64 v,
                                             i64 ignore, i64 has_ignore, float* partial, unsigned int* done, float* out,
                                             float* inv_count) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
    static_assert(STAGES >= 2 && CE_BULK_WARPS * STAGES * 8 <= 128, "the barriers fit before the row buffers");
    constexpr int N = Vec<T>::N;
    extern __shared__ __align__(128) unsigned char ce_bulk_smem[];
    __shared__ float warp_sums[2][CE_BULK_WARPS];
    const int lane = threadIdx.x, warp = threadIdx.y;
    const unsigned int bars = smem_addr(ce_bulk_smem) + (unsigned int)warp * (STAGES * 8);
    unsigned char* bufs = ce_bulk_smem + 128 + warp * (STAGES * CE_BULK_ROW);
    const i64 gw = (i64)blockIdx.x * CE_BULK_WARPS + warp, nw = (i64)gridDim.x * CE_BULK_WARPS;
    const int n = gw < rows ? (int)((rows - 1 - gw) / nw + 1) : 0;  // this warp's rows gw + i·nw
    const unsigned int bytes = (unsigned int)(v * (i64)sizeof(T));
    if (lane == 0) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s) mbar_init(bars + 8u * s, 1);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        fence_proxy_async();
        for (int i = 0; i < STAGES - 1 && i < n; ++i) {
            mbar_arrive_expect_tx(bars + 8u * i, bytes);
            bulk_load(smem_addr(bufs + i * CE_BULK_ROW), x + (gw + (i64)i * nw) * v, bytes, bars + 8u * i);
        }
    }
    __syncwarp();
    const int nv = (int)(v / N);
    float p_sum = 0.f, c_sum = 0.f;  // lane 0's, over this warp's rows in order
    for (int i = 0; i < n; ++i) {
        const int stage = i % STAGES;
        const i64 row = gw + (i64)i * nw;
        if (lane == 0) {
            // Into the stage every lane finished reading before the __syncwarp that ended row
            // i - 1; the proxy fence orders those generic-proxy reads before the bulk copy's
            // async-proxy writes, as the PTX memory model asks.
            const int j = i + STAGES - 1;
            if (j < n) {
                const int sj = j % STAGES;
                fence_proxy_async();
                mbar_arrive_expect_tx(bars + 8u * sj, bytes);
                bulk_load(smem_addr(bufs + sj * CE_BULK_ROW), x + (gw + (i64)j * nw) * v, bytes, bars + 8u * sj);
            }
        }
        const i64 c = ce_class(t, row, v, ignore, has_ignore);  // its latency overlaps the wait
        mbar_wait(bars + 8u * stage, (unsigned int)((i / STAGES) & 1));
        const uint4* rv = reinterpret_cast<const uint4*>(bufs + stage * CE_BULK_ROW);
        float m = NEG_INF;
        for (int j0 = 0; j0 < nv; j0 += 32 * CE_WARP_U) {
            uint4 u[CE_WARP_U];
            ce_warp_load<T>(rv, j0, nv, u);  // lane = threadIdx.x
            m = fmaxf(m, ce_batch_max<CE_WARP_U>(u, T()));
        }
        m = warp_max(m);
        float sum = 0.f;
        if (m > NEG_INF) {  // else every logit is −inf: lse = −inf, as the CPU logsumexp
            const float mlog2e = m * LOG2E_F;
            for (int j0 = 0; j0 < nv; j0 += 32 * CE_WARP_U) {
#pragma unroll
                for (int k = 0; k < CE_WARP_U; ++k) {
                    const int j = j0 + lane + 32 * k;
                    if (j < nv) ce_vec_exp_add<T>(rv[j], mlog2e, k < POLY, sum);
                }
            }
        }
        sum = warp_sum(sum);
        const float l = m > NEG_INF ? m + logf(sum) : NEG_INF;
        if (lane == 0) {
            const float pk =
                c >= 0 ? ld(reinterpret_cast<const T*>(rv), c) - l : (c == CE_IGNORED ? 0.f : CE_NAN);
            lse[row] = l;
            picked[row] = pk;
            p_sum += pk;
            c_sum += c == CE_IGNORED ? 0.f : 1.f;  // ce_class: has_ignore and t[row] == ignore
        }
        __syncwarp();
    }
    if (lane == 0) {
        warp_sums[0][warp] = p_sum;
        warp_sums[1][warp] = c_sum;
    }
    __syncthreads();
    float p = 0.f, cs = 0.f;
    if (lane == 0 && warp == 0) {
#pragma unroll
        for (int w = 0; w < CE_BULK_WARPS; ++w) {
            p += warp_sums[0][w];
            cs += warp_sums[1][w];
        }
    }
    ce_finish_mean(p, cs, partial, done, out, inv_count);
#endif
}

template <typename T, typename I>
__device__ __forceinline__ void ce_mean(const float* picked, const I* t, float* out, float* inv_count, i64 rows,
                                        i64 ignore, i64 has_ignore) {
    __shared__ float scratch[32];
    __shared__ unsigned int count;
    if (threadIdx.x == 0) count = 0u;
    // CE_MEAN_U rows per thread per step, loaded before they are added (a fixed order: the
    // sum is deterministic).
    constexpr int CE_MEAN_U = 8;
    float acc = 0.f;
    unsigned int cnt = 0u;
    for (i64 r0 = threadIdx.x; r0 < rows; r0 += (i64)blockDim.x * CE_MEAN_U) {
        float p[CE_MEAN_U];
        bool counted[CE_MEAN_U];
#pragma unroll
        for (int k = 0; k < CE_MEAN_U; ++k) {
            const i64 r = r0 + (i64)k * blockDim.x;
            p[k] = r < rows ? picked[r] : 0.f;
            counted[k] = r < rows && !(has_ignore && (i64)t[r] == ignore);
        }
#pragma unroll
        for (int k = 0; k < CE_MEAN_U; ++k) {
            acc += p[k];
            cnt += counted[k] ? 1u : 0u;
        }
    }
    acc = block_sum(acc, scratch);  // its barriers also order `count = 0` before the adds
    atomicAdd(&count, cnt);
    __syncthreads();
    if (threadIdx.x == 0) {
        const float inv = 1.f / (float)(count > 0u ? count : 1u);
        out[0] = 0.f - acc * inv;
        inv_count[0] = inv;
    }
}

__device__ __forceinline__ float ce_grad_scale(const float* g, const float* inv_count, i64 row, float scale,
                                               i64 g_per_row) {
    return ld(g, g_per_row ? row : 0) * scale * (inv_count ? inv_count[0] : 1.f);
}

// Scalar fallback: one block per row.
template <typename T, typename I>
__device__ __forceinline__ void lse_pick_bwd(const T* x, const I* t, const float* lse, const float* g,
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
// base + t + k · blockDim.x. The logits are loaded first, together with the row's scalars
// (target, lse, g, inv_count): one memory latency per block, not three in a row.
template <typename T, typename I>
__device__ __forceinline__ void lse_pick_bwd_vec(const T* x, const I* t, const float* lse, const float* g,
                                                 const float* inv_count, T* dx, i64 v, i64 ignore, i64 has_ignore,
                                                 float scale, i64 g_per_row) {
    constexpr int N = Vec<T>::N;
    constexpr int K = 4;
    const i64 row = blockIdx.x;
    const i64 nv = v / N;
    const i64 j0 = (i64)blockIdx.y * blockDim.x * K + threadIdx.x;
    const uint4* xv = reinterpret_cast<const uint4*>(x + row * v);
    T* dr = dx + row * v;
    const float l = lse[row];
    uint4 u[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const i64 j = j0 + (i64)k * blockDim.x;
        u[k] = j < nv ? xv[j] : make_uint4(0u, 0u, 0u, 0u);
    }
    const i64 c = ce_class(t, row, v, ignore, has_ignore);
    const float gs = ce_grad_scale(g, inv_count, row, scale, g_per_row);
    // Ignored / invalid rows select their fill per element instead of branching on c: with a
    // branch, ptxas moved the lse load behind it, to wait for the target's load.
    const bool valid = c >= 0;
    const float fill = c == CE_IGNORED ? 0.f : CE_NAN;
    // e^{x − l} = 2^{(x − l)·log2e} (MUFU.EX2). Not the fma form of lse_pick_warp: there the
    // rounding of m·log2e scales every term alike and cancels, here it would be a relative
    // error of |l|·2^-24 in every gradient element.
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const i64 j = j0 + (i64)k * blockDim.x;
        if (j < nv) {
            float f[N];
            unpack16<T>(u[k], f);
            const i64 off = c - j * N;  // element e of this vector is the target when e == off
#pragma unroll
            for (int e = 0; e < N; ++e) {
                const float p = fast_exp2((f[e] - l) * LOG2E_F) * gs;
                f[e] = valid ? (e == off ? p - gs : p) : fill;
            }
            st16_rn(dr + j * N, f);
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
    extern "C" __global__ void __launch_bounds__(256, 4) lse_pick_warp_##ISFX##_##SFX(                          \
        const T* x, const I* t, float* lse, float* picked, i64 rows, i64 v, i64 ignore, i64 has_ignore) {        \
        lse_pick_warp<T, I>(x, t, lse, picked, rows, v, ignore, has_ignore);                                     \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256, 4) ce_warp_mean_##ISFX##_##SFX(                            \
        const T* x, const I* t, float* lse, float* picked, i64 rows, i64 v, i64 ignore, i64 has_ignore,         \
        float* partial, unsigned int* done, float* out, float* inv_count) {                                          \
        ce_warp_mean<T, I, 0>(x, t, lse, picked, rows, v, ignore, has_ignore, partial, done, out, inv_count);    \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256, 4) ce_stage1_mean_##ISFX##_##SFX(                          \
        const T* x, const I* t, float* lse, float* picked, i64 rows, i64 v, i64 ignore, i64 has_ignore,         \
        float* partial, unsigned int* done, float* out, float* inv_count) {                                          \
        ce_warp_mean<T, I, 1>(x, t, lse, picked, rows, v, ignore, has_ignore, partial, done, out, inv_count);    \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256) ce_stage2_mean_##ISFX##_##SFX(                             \
        const T* x, const I* t, float* lse, float* picked, i64 rows, i64 v, i64 ignore, i64 has_ignore,         \
        float* partial, unsigned int* done, float* out, float* inv_count) {                                          \
        ce_warp_mean<T, I, 2>(x, t, lse, picked, rows, v, ignore, has_ignore, partial, done, out, inv_count);    \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256) ce_stage3_mean_##ISFX##_##SFX(                             \
        const T* x, const I* t, float* lse, float* picked, i64 rows, i64 v, i64 ignore, i64 has_ignore,         \
        float* partial, unsigned int* done, float* out, float* inv_count) {                                          \
        ce_warp_mean<T, I, 3>(x, t, lse, picked, rows, v, ignore, has_ignore, partial, done, out, inv_count);    \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256, 2) ce_stage4_mean_##ISFX##_##SFX(                          \
        const T* x, const I* t, float* lse, float* picked, i64 rows, i64 v, i64 ignore, i64 has_ignore,         \
        float* partial, unsigned int* done, float* out, float* inv_count) {                                          \
        ce_warp_mean<T, I, 4>(x, t, lse, picked, rows, v, ignore, has_ignore, partial, done, out, inv_count);    \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256, 4) ce_stage7_mean_##ISFX##_##SFX(                          \
        const T* x, const I* t, float* lse, float* picked, i64 rows, i64 v, i64 ignore, i64 has_ignore,         \
        float* partial, unsigned int* done, float* out, float* inv_count) {                                          \
        ce_warp_mean<T, I, 7>(x, t, lse, picked, rows, v, ignore, has_ignore, partial, done, out, inv_count);    \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(32 * CE_BULK_WARPS) ce_bulk_mean_##ISFX##_##SFX(                 \
        const T* x, const I* t, float* lse, float* picked, i64 rows, i64 v, i64 ignore, i64 has_ignore,         \
        float* partial, unsigned int* done, float* out, float* inv_count) {                                          \
        ce_bulk_mean<T, I, 3>(x, t, lse, picked, rows, v, ignore, has_ignore, partial, done, out, inv_count);    \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(32 * CE_BULK_WARPS) ce_bulk2_mean_##ISFX##_##SFX(                \
        const T* x, const I* t, float* lse, float* picked, i64 rows, i64 v, i64 ignore, i64 has_ignore,         \
        float* partial, unsigned int* done, float* out, float* inv_count) {                                          \
        ce_bulk_mean<T, I, 2>(x, t, lse, picked, rows, v, ignore, has_ignore, partial, done, out, inv_count);    \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(32 * CE_BULK_WARPS) ce_bulk_poly_mean_##ISFX##_##SFX(            \
        const T* x, const I* t, float* lse, float* picked, i64 rows, i64 v, i64 ignore, i64 has_ignore,           \
        float* partial, unsigned int* done, float* out, float* inv_count) {                                       \
        ce_bulk_mean<T, I, 3, CE_POLY_VECS>(x, t, lse, picked, rows, v, ignore, has_ignore, partial, done, out,  \
                                            inv_count);                                                          \
    }                                                                                                            \
    extern "C" __global__ void ce_mean_##ISFX##_##SFX(const float* picked, const I* t, float* out, float* inv_count, \
                                                      i64 rows, i64 ignore, i64 has_ignore) {                    \
        ce_mean<T, I>(picked, t, out, inv_count, rows, ignore, has_ignore);                                      \
    }                                                                                                            \
    extern "C" __global__ void lse_pick_bwd_##ISFX##_##SFX(const T* x, const I* t, const float* lse, const float* g, \
                                                           const float* inv_count, T* dx, i64 v, i64 ignore,     \
                                                           i64 has_ignore, float scale, i64 g_per_row) {         \
        lse_pick_bwd<T, I>(x, t, lse, g, inv_count, dx, v, ignore, has_ignore, scale, g_per_row);                \
    }                                                                                                            \
    extern "C" __global__ void lse_pick_bwd_vec_##ISFX##_##SFX(                                                  \
        const T* x, const I* t, const float* lse, const float* g, const float* inv_count, T* dx, i64 v, i64 ignore,  \
        i64 has_ignore, float scale, i64 g_per_row) {                                                            \
        lse_pick_bwd_vec<T, I>(x, t, lse, g, inv_count, dx, v, ignore, has_ignore, scale, g_per_row);            \
    }

LOSS_KERNELS(f32, float, i64, i64)
LOSS_KERNELS(bf16, bf16_t, i64, i64)
LOSS_KERNELS(f32, float, u32, unsigned int)
LOSS_KERNELS(bf16, bf16_t, u32, unsigned int)
