// Tensor-core flash attention forward (FlashAttention-2 scheme), bf16 in, f32 softmax and
// accumulation, sm_80+ mma.sync m16n8k16.
//
// q [B, Hq, Tq, D], k and v [B, Hkv, Tk, D], o [B, Hq, Tq, D], all contiguous bf16;
// lse [B, Hq, Tq] f32 (natural log). Query head h reads kv head h / (Hq / Hkv) (GQA without
// repeating K/V). causal: query i sees keys j <= i + (Tk - Tq) (bottom-right aligned, as the
// CPU op). A row that sees no key gets o = 0 and lse = -inf.
//
// Segments (variable-length sequences packed into one, e.g. cu_seqlens windows; the *_seg_*
// kernels, the others ignore these arrays): query i sees only keys [seg_klo[i], seg_khi[i])
// (u32 [Tq]), intersected with the causal mask. The backward's dK/dV kernel takes the same relation by key instead,
// seg_qlo/seg_qhi (u32 [Tk]): key j is seen by exactly the queries [seg_qlo[j], seg_qhi[j])
// (for block-diagonal segments, the same arrays as seg_klo/seg_khi). Whole tiles outside these
// ranges are skipped: a query tile visits only the key tiles of the hull of its rows' ranges, a
// key tile only the query tiles of the hull of its keys'.
//
// S = Q K^T and O += P V run on tensor cores; P is re-packed from the S accumulators straight
// into A fragments (no shared-memory round trip). Block shapes: at the forward and backward
// kernels below.

template <int D>
__device__ __forceinline__ void fa_load_rows(bf16_t* s, const bf16_t* g, i64 row0, i64 rows, int nrows) {
    // nrows x D tile, 16-byte chunks; rows >= `rows` zero-filled. Shared row stride D + 8.
    constexpr int CH = D / 8;
    for (int c = threadIdx.x; c < nrows * CH; c += blockDim.x) {
        int r = c / CH, k = (c % CH) * 8;
        bool ok = row0 + r < rows;
        cp_async16(s + r * (D + 8) + k, ok ? g + (row0 + r) * D + k : g, ok);
    }
}

// Hull [*lo, *hi) of the ranges [lo_of[i], hi_of[i]) over rows i in [r0, min(r0 + 64, n)),
// empty ranges ignored (*lo >= *hi when all are empty). Every warp computes it on its own from
// global memory: no shared memory, no barrier.
__device__ __forceinline__ void fa_range_hull(const unsigned int* lo_of, const unsigned int* hi_of, i64 r0, i64 n,
                                              i64* lo, i64* hi) {
    int lane = threadIdx.x & 31;
    unsigned int mn = 0xffffffffu, mx = 0u;
#pragma unroll
    for (int c = 0; c < 2; ++c) {
        i64 r = r0 + lane + 32 * c;
        if (r < n) {
            unsigned int a = lo_of[r], b = hi_of[r];
            if (a < b) {
                mn = min(mn, a);
                mx = max(mx, b);
            }
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        mn = min(mn, __shfl_xor_sync(0xffffffffu, mn, o));
        mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    }
    *lo = (i64)mn;
    *hi = (i64)mx;
}

// Keys [*kbeg, *kend) that the query tile [q0, q0 + rows) (rows a multiple of 64) may see:
// causal and segment bounds (a superset; the per-element mask decides). Shared by the forward
// (128 rows) and dQ (64 rows) kernels.
template <bool SEG>
__device__ __forceinline__ void fa_key_span(const unsigned int* seg_klo, const unsigned int* seg_khi, i64 q0,
                                            int rows, i64 tq, i64 tk, i64 causal, i64* kbeg, i64* kend) {
    i64 b = 0, e = tk;
    if (causal) {
        i64 last = q0 + rows - 1 + (tk - tq) + 1;  // keys the tile's last query sees
        e = last < e ? last : e;
    }
    if (SEG) {
        i64 lo = 0, hi = 0;  // hull of the non-empty 64-row hulls (empty: lo >= hi)
        for (int c = 0; c < rows; c += 64) {
            i64 l, h;
            fa_range_hull(seg_klo, seg_khi, q0 + c, tq, &l, &h);
            if (l < h) {
                bool first = lo >= hi;
                lo = first || l < lo ? l : lo;
                hi = first || h > hi ? h : hi;
            }
        }
        b = lo > b ? lo : b;
        e = hi < e ? hi : e;
    }
    *kbeg = b;
    *kend = e;
}


// Forward block: 128 queries x one (batch, head), 4 warps of 32 query rows (MT = 2 m16 tiles
// each, so every K/V fragment read from shared memory feeds two products). K and V tiles of
// 64 keys (FA_FWD_BN) are double-buffered: tile i + 1 streams in (cp.async) while tile i is multiplied.
// Fragments come from shared memory by ldmatrix (V transposed on the way). Only tiles that
// cross the causal diagonal, the end of the keys or a segment boundary are masked per element.
// Causal blocks run in reverse tile order: the longest (last) query tiles start first.
// Key tile: 64, except with segments at D 128, where 32 keeps the kernel within 255 registers
// without spills. (Without segments, the 64-key D 128 kernel spills 48 bytes and is still about
// 6% faster than the 32-key one on an H200.)
#define FA_FWD_BN(D, SEG) ((SEG) && (D) > 80 ? 32 : 64)

// MT m16 tiles per warp: the block has BM = 64 MT queries (MT = 2 above; MT = 1, 64 queries,
// fewer registers and more blocks per SM, is a benchmark variant).
template <int D, int BN, int MT, bool SEG>
__device__ void flash_fwd(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k, const bf16_t* __restrict__ v,
                          bf16_t* __restrict__ o, float* __restrict__ lse, const unsigned int* __restrict__ seg_klo,
                          const unsigned int* __restrict__ seg_khi, i64 hq, i64 hkv, i64 tq, i64 tk, float scale,
                          i64 causal) {
    constexpr int LD = D + 8;  // shared row stride: 16-byte rows, ldmatrix conflict-free
    constexpr int NB = BN / 8;  // n-blocks of S per m-tile
    constexpr int DB = D / 8;      // n-blocks of O per m-tile
    constexpr int BM = 64 * MT;   // queries per block
    constexpr int R = 2 * MT;     // rows per thread
    extern __shared__ __align__(16) unsigned char fa_smem[];
    bf16_t* sQ = reinterpret_cast<bf16_t*>(fa_smem);
    bf16_t* sK = sQ + BM * LD;  // 2 buffers of BN rows
    bf16_t* sV = sK + 2 * BN * LD;  // 2 buffers

    i64 qt = causal ? (i64)(gridDim.x - 1 - blockIdx.x) : (i64)blockIdx.x;
    i64 b = blockIdx.z, h = blockIdx.y, q0 = qt * BM;
    i64 hk = h / (hq / hkv);
    const bf16_t* qb = q + (b * hq + h) * tq * D;
    const bf16_t* kb = k + (b * hkv + hk) * tk * D;
    const bf16_t* vb = v + (b * hkv + hk) * tk * D;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;

    i64 off = tk - tq;  // causal offset: row i sees keys <= i + off
    i64 kbeg, kend;
    fa_key_span<SEG>(seg_klo, seg_khi, q0, BM, tq, tk, causal, &kbeg, &kend);

    // Prologue: Q and the first K tile (one group), the first V tile (a second group).
    fa_load_rows<D>(sQ, qb, q0, tq, BM);
    if (kbeg < kend) fa_load_rows<D>(sK, kb, kbeg, tk, BN);
    cp_async_commit();
    if (kbeg < kend) fa_load_rows<D>(sV, vb, kbeg, tk, BN);
    cp_async_commit();

    const float sl2 = scale * LOG2E_F;  // exp(x scale) = exp2(x sl2)
    // This thread's rows: r = 0..R-1 -> warp * 16 MT + (r >> 1) * 16 + (r & 1) * 8 + g.
    // Positions fit in 32 bits (the launcher checks), which keeps the mask cheap.
    int row_g[R];
    int rlo[R], rhi[R];  // each row's key range [rlo, rhi) (empty for rows past tq with segments)
#pragma unroll
    for (int r = 0; r < R; ++r) {
        row_g[r] = (int)q0 + warp * 16 * MT + (r >> 1) * 16 + (r & 1) * 8 + g;
        bool in = row_g[r] < tq;
        rlo[r] = SEG && in ? (int)seg_klo[row_g[r]] : 0;
        rhi[r] = SEG ? (in ? (int)seg_khi[row_g[r]] : 0) : (int)tk;
    }
    const int off32 = (int)off;
    float m[R], l[R];  // running max (raw scores) and sum per row
    float acc[MT][DB][4];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        m[r] = NEG_INF;
        l[r] = 0.f;
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < DB; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][j][e] = 0.f;

    // ldmatrix lane offsets (see common.cuh): A / [k][n]-stored B, and [n][k]-stored B.
    const int a_off = (lane & 15) * LD + (lane >> 4) * 8;
    const int b_off = ((lane & 7) + (lane >> 4) * 8) * LD + ((lane >> 3) & 1) * 8;
    // 32-bit shared addresses (bytes): generic pointers would cost 64-bit registers.
    const unsigned int sQa = smem_addr(sQ) + 2 * (warp * 16 * MT * LD + a_off);
    const unsigned int sKa = smem_addr(sK) + 2 * b_off, sVa = smem_addr(sV) + 2 * a_off;

    int buf = 0;
    // k0 need not be a multiple of BN (segments start anywhere); rows are 16-byte aligned.
    for (i64 k0 = kbeg; k0 < kend; k0 += BN, buf ^= 1) {
        cp_async_wait<1>();  // this tile's K (and Q) landed; its V may still be in flight
        __syncthreads();     // ... for every thread; and the other buffers are free
        i64 kn = k0 + BN;
        if (kn < kend) fa_load_rows<D>(sK + (buf ^ 1) * BN * LD, kb, kn, tk, BN);
        cp_async_commit();
        if (kn < kend) fa_load_rows<D>(sV + (buf ^ 1) * BN * LD, vb, kn, tk, BN);
        cp_async_commit();
        const unsigned int cK = sKa + 2 * buf * BN * LD, cV = sVa + 2 * buf * BN * LD;

        // S = Q K^T: 16 MT rows x BN keys per warp.
        float s[MT][NB][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int j = 0; j < NB; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[mt][j][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D; kk += 16) {
            unsigned int a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) ldsm_x4(a[mt], sQa + 2 * (mt * 16 * LD + kk));
#pragma unroll
            for (int j = 0; j < NB; j += 2) {
                unsigned int bb[4];
                ldsm_x4(bb, cK + 2 * (j * 8 * LD + kk));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_bf16_16816(s[mt][j], a[mt], bb);
                    mma_bf16_16816(s[mt][j + 1], a[mt], bb + 2);
                }
            }
        }

        // Mask (only tiles that need it), then the online softmax. Element (mt, j, e) is row
        // r = 2 mt + (e >> 1), key k0 + 8 j + 2 t + (e & 1).
        bool need_mask = SEG || k0 + BN > tk || (causal && k0 + BN - 1 > q0 + warp * 16 * MT + off);
        if (need_mask) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int j = 0; j < NB; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        int r = 2 * mt + (e >> 1);
                        int key = (int)k0 + j * 8 + 2 * t + (e & 1);
                        bool ok = key < tk && key >= rlo[r] && key < rhi[r] && (!causal || key <= row_g[r] + off32);
                        if (!ok) s[mt][j][e] = NEG_INF;
                    }
        }
        float corr[R], mneg[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            int mt = r >> 1, e0 = (r & 1) * 2;
            float mx = m[r];
#pragma unroll
            for (int j = 0; j < NB; ++j) mx = fmaxf(mx, fmaxf(s[mt][j][e0], s[mt][j][e0 + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            // A row with no key yet keeps m = -inf: use 0 as the offset so exp2(-inf) = 0.
            mneg[r] = mx == NEG_INF ? 0.f : -mx * sl2;
            corr[r] = fast_exp2(fmaf(m[r], sl2, mneg[r]));  // m = -inf -> 0 (acc and l are 0 anyway)
            m[r] = mx;
        }
        float rs[R];
#pragma unroll
        for (int r = 0; r < R; ++r) rs[r] = 0.f;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int j = 0; j < NB; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    int r = 2 * mt + (e >> 1);
                    float p = fast_exp2(fmaf(s[mt][j][e], sl2, mneg[r]));
                    s[mt][j][e] = p;
                    rs[r] += p;
                }
#pragma unroll
        for (int r = 0; r < R; ++r) l[r] = l[r] * corr[r] + rs[r];  // quad-partial sums; reduced at the end
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int j = 0; j < DB; ++j) {
                acc[mt][j][0] *= corr[2 * mt];
                acc[mt][j][1] *= corr[2 * mt];
                acc[mt][j][2] *= corr[2 * mt + 1];
                acc[mt][j][3] *= corr[2 * mt + 1];
            }

        cp_async_wait<2>();  // this tile's V landed (the next tile's K and V may be in flight)
        __syncthreads();

        // O += P V: P from the S accumulators (A fragments), V [key][d] through ldmatrix.trans.
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            unsigned int a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) fa_acc_to_a(a[mt], s[mt][2 * kk], s[mt][2 * kk + 1]);
#pragma unroll
            for (int j = 0; j < DB; j += 2) {
                unsigned int bb[4];
                ldsm_x4_t(bb, cV + 2 * (kk * 16 * LD + j * 8));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_bf16_16816(acc[mt][j], a[mt], bb);
                    mma_bf16_16816(acc[mt][j + 1], a[mt], bb + 2);
                }
            }
        }
    }
    cp_async_wait<0>();

    // Epilogue: the row sums across the quad, normalise, write o (bf16 pairs) and lse.
#pragma unroll
    for (int r = 0; r < R; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        i64 row = row_g[r];
        if (row >= tq) continue;
        int mt = r >> 1, e0 = (r & 1) * 2;
        float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        bf16_t* orow = o + ((b * hq + h) * tq + row) * D + 2 * t;
#pragma unroll
        for (int j = 0; j < DB; ++j)
            *reinterpret_cast<unsigned int*>(orow + j * 8) = pack_bf16(acc[mt][j][e0] * inv, acc[mt][j][e0 + 1] * inv);
        if (t == 0) {
            lse[(b * hq + h) * tq + row] = l[r] > 0.f ? m[r] * scale + log2f(l[r]) * 0.6931471805599453f : NEG_INF;
        }
    }
}

// Entry points: flash_fwd_d{D} ignores the segment arrays (may be null), flash_fwd_seg_d{D}
// applies them; the same for the backward kernels.
#define FLASH_FWD(NAME, D, BN, MT, SEG, MINB)                                                            \
    extern "C" __global__ void __launch_bounds__(128, MINB)                                              \
        NAME(const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* o, float* lse,                   \
             const unsigned int* seg_klo, const unsigned int* seg_khi, i64 hq, i64 hkv, i64 tq, i64 tk,  \
             float scale, i64 causal) {                                                                  \
        flash_fwd<D, BN, MT, SEG>(q, k, v, o, lse, seg_klo, seg_khi, hq, hkv, tq, tk, scale, causal);   \
    }
FLASH_FWD(flash_fwd_d64, 64, FA_FWD_BN(64, false), 2, false, 2)
FLASH_FWD(flash_fwd_d80, 80, FA_FWD_BN(80, false), 2, false, 2)
FLASH_FWD(flash_fwd_d128, 128, FA_FWD_BN(128, false), 2, false, 2)
FLASH_FWD(flash_fwd_seg_d64, 64, FA_FWD_BN(64, true), 2, true, 2)
FLASH_FWD(flash_fwd_seg_d80, 80, FA_FWD_BN(80, true), 2, true, 2)
FLASH_FWD(flash_fwd_seg_d128, 128, FA_FWD_BN(128, true), 2, true, 2)
// Benchmark variants (flash_fwd_tiles in src/backend/cuda/flash.rs): the 32-key D 128 tile
// without segments, and 64-query blocks (MT = 1; keys 32 at D 128), 3 or 4 blocks per SM.
FLASH_FWD(flash_fwd_d128_bn32, 128, 32, 2, false, 2)
FLASH_FWD(flash_fwd_m64_d128, 128, 32, 1, false, 3)
FLASH_FWD(flash_fwd_m64_d64, 64, 64, 1, false, 4)
// 64-query blocks with segments, for segments of at most 64 tokens (the vision tower's windows:
// a 128-query block spans two windows, and its key hull is both: half its products masked).
FLASH_FWD(flash_fwd_seg_m64_d64, 64, 64, 1, true, 4)
FLASH_FWD(flash_fwd_seg_m64_d80, 80, 64, 1, true, 4)

// ---------------------------------------------------------------------------------------------
// Backward (FlashAttention-2 scheme, deterministic: no atomics). With P = exp(S·scale − lse),
// delta_i = Σ_d dO_id O_id, dS = P ∘ (dP − delta), dP = dO Vᵀ:
//   dV = Pᵀ dO,  dK = scale · dSᵀ Q   (kernel flash_bwd_dkdv: one block per 64-key tile and kv
//                                      head, looping over the GQA group's heads and the query
//                                      tiles; warps own 16 keys and compute Sᵀ = K Qᵀ directly)
//   dQ = scale · dS K                 (kernel flash_bwd_dq: one block per 64-query tile and head,
//                                      looping over key tiles, recomputing S and dP)
// delta comes from attn_bwd_delta (kernels/attention.cu). All operands contiguous [B, H, T, D] bf16; lse, delta f32.
//
// Both kernels stream 64-row tiles through two shared-memory buffers (cp.async): the copy of
// tile i + 1 is issued right after the barrier that opens tile i, so it overlaps tile i's math;
// one barrier per tile both publishes tile i and tells that every warp is done with tile i - 1,
// whose buffer the copy refills (so cp.async.wait_group 0 before that barrier waits for tile i
// alone: it is the only group in flight). All fragments come from ldmatrix (common.cuh: A rows
// and B stored [n][k] plain, B stored [k][n] with .trans). Only edge tiles (crossing the causal

// diagonal, Tq or Tk, and every tile with segments) apply the per-element mask, as one
// tile-relative interval [lo, hi) per accumulator row; interior tiles see every pair.
// Shared memory (flash_bwd in src/backend/cuda/flash.rs): dK/dV 6 tiles of 64 x (D + 8) bf16
// + 256 floats, dQ 6 tiles.

// 4-byte async copy global -> shared (lse / delta values: a tile's rows start anywhere, so no
// 16-byte alignment); `valid` false zero-fills the destination.
__device__ __forceinline__ void fb_cp_async4(float* smem, const float* gmem, bool valid) {
    unsigned int s = smem_addr(smem);
    int n = valid ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}

// [lo, hi) relative to a tile start, clamped to [0, 64] as ints: for c in [0, 64),
// lo <= c < hi holds exactly when it holds for the unclamped bounds.
__device__ __forceinline__ void fb_clamp64(i64 lo, i64 hi, int* clo, int* chi) {
    *clo = (int)(lo < 0 ? 0 : (lo > 64 ? 64 : lo));
    *chi = (int)(hi < 0 ? 0 : (hi > 64 ? 64 : hi));
}

template <int D, bool SEG>
__device__ void flash_bwd_dkdv(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                               const bf16_t* __restrict__ v, const bf16_t* __restrict__ dout,
                               const float* __restrict__ lse, const float* __restrict__ delta,
                               bf16_t* __restrict__ dk, bf16_t* __restrict__ dv,
                               const unsigned int* __restrict__ seg_qlo, const unsigned int* __restrict__ seg_qhi,
                               i64 hq, i64 hkv, i64 tq, i64 tk, float scale, i64 causal) {
    constexpr int LD = D + 8;
    constexpr int TILE = 64 * LD;  // elements of one 64-row tile
    // Queries per chunk of the tile's math: D = 128 takes the 64 in two chunks of 32, which keeps
    // half the Sᵀ / dPᵀ accumulators live beside the 2·D/2 of dK, dV (no spills).
    constexpr int NH = D > 80 ? 2 : 1, QW = 64 / NH;
    // Shared: K and V of the block's key tile (resident), two buffers of the streamed query tile
    // (buffer s: Q at sQG + 2s·TILE, dO at + TILE), then two buffers of 128 floats (buffer s at
    // sLD + 128s: lse·log2 e [64], then delta [64]).
    extern __shared__ __align__(16) unsigned char fb_smem[];
    bf16_t* sK = reinterpret_cast<bf16_t*>(fb_smem);
    bf16_t* sV = sK + TILE;
    bf16_t* sQG = sV + TILE;
    float* sLD = reinterpret_cast<float*>(sQG + 4 * TILE);

    i64 b = blockIdx.z, hk = blockIdx.y, k0 = (i64)blockIdx.x * 64;
    i64 group = hq / hkv;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const bf16_t* kb = k + (b * hkv + hk) * tk * D;
    const bf16_t* vb = v + (b * hkv + hk) * tk * D;
    fa_load_rows<D>(sK, kb, k0, tk, 64);
    fa_load_rows<D>(sV, vb, k0, tk, 64);

    const float sl2 = scale * 1.4426950408889634f;
    i64 off = tk - tq;
    i64 qstart = 0, qend = tq;
    if (causal) {
        i64 first = k0 - off;  // the first query that sees key k0
        qstart = first > 0 ? (first / 64) * 64 : 0;
    }
    if (SEG) {  // queries that see some key of this tile
        i64 lo, hi;
        fa_range_hull(seg_qlo, seg_qhi, k0, tk, &lo, &hi);
        qstart = lo > qstart ? lo : qstart;
        qend = hi < qend ? hi : qend;
    }
    // The (GQA head gi, query tile q0) pairs, gi-major and q0 = qstart, qstart + 64, ... < qend,
    // as one flat sequence of n tiles, so that the prefetch crosses head boundaries too.
    i64 nq = qend > qstart ? (qend - qstart + 63) / 64 : 0;
    i64 n = group * nq;

    // Issue the copies of tile (gi, q0) into buffer s: Q and dO rows (zero past tq), lse (threads
    // 0..63) and delta (threads 64..127) of its 64 rows (zero past tq; lse fixed up on arrival).
    // q0 need not be a multiple of 64 (segments start anywhere); rows are 16-byte aligned.
    auto load_tile = [&](int s, i64 gi, i64 q0) {
        i64 bh = b * hq + hk * group + gi;
        fa_load_rows<D>(sQG + (2 * s) * TILE, q + bh * tq * D, q0, tq, 64);
        fa_load_rows<D>(sQG + (2 * s + 1) * TILE, dout + bh * tq * D, q0, tq, 64);
        i64 qi = q0 + (threadIdx.x & 63);
        const float* src = threadIdx.x < 64 ? lse : delta;
        bool ok = qi < tq;
        fb_cp_async4(sLD + 128 * s + threadIdx.x, ok ? src + bh * tq + qi : src, ok);
    };
    if (n > 0) load_tile(0, 0, qstart);
    cp_async_commit();  // one group: K, V and the first query tile

    float adk[D / 8][4], adv[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) adk[j][r] = adv[j][r] = 0.f;
    // The thread's keys (rows g and g + 8 of the warp's 16) are seen by the queries
    // [qlo_k, qhi_k): causal (key <= qi + off), segments, qi < tq; none for keys past tk.
    i64 key_r[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};
    i64 qlo_k[2], qhi_k[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        i64 key = key_r[i], lo = 0, hi = tq;
        if (causal) lo = key - off;
        if (SEG) {
            bool in = key < tk;
            i64 a = in ? (i64)seg_qlo[key] : 0, e = in ? (i64)seg_qhi[key] : 0;
            lo = a > lo ? a : lo;
            hi = e < hi ? e : hi;
        }
        if (key >= tk) hi = lo;
        qlo_k[i] = lo;
        qhi_k[i] = hi;
    }

    // Per-lane ldmatrix byte addresses (common.cuh's mapping, l = lane): A 16x16 of the warp's
    // K / V rows, (warp·16 + l % 16, (l / 16)·8); B of two n-blocks stored [n][k], plain:
    // (l % 8 + (l / 16)·8, ((l / 8) % 2)·8); B of two n-blocks stored [k][n], .trans:
    // (l % 16, (l / 16)·8). Element (row, col) of a tile is at byte 2 (row·LD + col).
    const unsigned int kA = smem_addr(sK) + 2 * ((warp * 16 + (lane & 15)) * LD + (lane >> 4) * 8);
    const unsigned int vA = kA + 2 * TILE;
    const unsigned int qNK = smem_addr(sQG) + 2 * (((lane & 7) + (lane >> 4) * 8) * LD + ((lane >> 3) & 1) * 8);
    const unsigned int qKN = smem_addr(sQG) + 2 * ((lane & 15) * LD + (lane >> 4) * 8);

    i64 gi = 0, q0 = qstart;  // the tile of this iteration
    for (i64 it = 0; it < n; ++it) {
        const int s = (int)(it & 1);
        float* sL = sLD + 128 * s;
        cp_async_wait<0>();  // this thread's copies of tile `it` (and at it = 0, K and V) landed
        if (threadIdx.x < 64) {  // its own lse copy -> lse·log2 e; +inf (P = 0) past tq and for -inf
            float l = sL[threadIdx.x];
            sL[threadIdx.x] = (q0 + threadIdx.x < tq && l != NEG_INF) ? l * 1.4426950408889634f : POS_INF;
        }
        __syncthreads();  // tile `it` visible to all; every warp is done with buffer s ^ 1
        i64 ngi = gi, nq0 = q0 + 64;  // the next tile
        if (nq0 >= qend) {
            nq0 = qstart;
            ++ngi;
        }
        if (it + 1 < n) load_tile(s ^ 1, ngi, nq0);
        cp_async_commit();

        // Q of buffer s starts 2s·TILE elements (4s·TILE bytes) into sQG, dO one TILE later.
        const unsigned int qnk = qNK + s * (4 * TILE), gnk = qnk + 2 * TILE;
        const unsigned int qkn = qKN + s * (4 * TILE), gkn = qkn + 2 * TILE;
        const float* sD = sL + 64;
        // Edge tile: the thread's key rows see the tile-relative query columns [lo, hi).
        const bool edge = SEG || k0 + 64 > tk || q0 + 64 > tq || (causal && k0 + 63 > q0 + off);
        int lo[2] = {0, 0}, hi[2] = {64, 64};
        if (edge) {
#pragma unroll
            for (int i = 0; i < 2; ++i) fb_clamp64(qlo_k[i] - q0, qhi_k[i] - q0, &lo[i], &hi[i]);
        }

        // The tile's 64 queries in NH chunks of QW columns, starting at column c0 (not unrolled:
        // an unrolled second chunk gets scheduled into the first and both stay live).
#pragma unroll 1
        for (int hh = 0; hh < NH; ++hh) {
            const int c0 = hh * QW;
            // Sᵀ (16 keys x QW queries) = K Qᵀ and dPᵀ = V dOᵀ: A = the warp's K / V rows, B = Q / dO
            // stored [query][d] = [n][k]; one ldmatrix covers query blocks 2jp and 2jp + 1.
            float st[QW / 8][4], dpt[QW / 8][4];
#pragma unroll
            for (int j = 0; j < QW / 8; ++j)
#pragma unroll
                for (int r = 0; r < 4; ++r) st[j][r] = dpt[j][r] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D; kk += 16) {
                unsigned int ak[4], av[4];
                ldsm_x4(ak, kA + 2 * kk);
                ldsm_x4(av, vA + 2 * kk);
#pragma unroll
                for (int jp = 0; jp < QW / 16; ++jp) {
                    unsigned int bq[4], bg[4];
                    ldsm_x4(bq, qnk + 2 * ((c0 + jp * 16) * LD + kk));
                    ldsm_x4(bg, gnk + 2 * ((c0 + jp * 16) * LD + kk));
                    mma_bf16_16816(st[2 * jp], ak, bq);
                    mma_bf16_16816(st[2 * jp + 1], ak, bq + 2);
                    mma_bf16_16816(dpt[2 * jp], av, bg);
                    mma_bf16_16816(dpt[2 * jp + 1], av, bg + 2);
                }
            }
            // Pᵀ and dSᵀ in place: st <- P, dpt <- dS. Accumulator r of block j: key row
            // g + 8 (r >> 1), query column c0 + j·8 + 2t + (r & 1).
#pragma unroll
            for (int j = 0; j < QW / 8; ++j) {
                const float2 l = *reinterpret_cast<const float2*>(sL + c0 + j * 8 + 2 * t);
                st[j][0] = exp2f(st[j][0] * sl2 - l.x);
                st[j][1] = exp2f(st[j][1] * sl2 - l.y);
                st[j][2] = exp2f(st[j][2] * sl2 - l.x);
                st[j][3] = exp2f(st[j][3] * sl2 - l.y);
            }
            if (edge) {
#pragma unroll
                for (int j = 0; j < QW / 8; ++j)
#pragma unroll
                    for (int r = 0; r < 4; ++r) {
                        int qc = c0 + j * 8 + 2 * t + (r & 1);
                        if (qc < lo[r >> 1] || qc >= hi[r >> 1]) st[j][r] = 0.f;
                    }
            }
#pragma unroll
            for (int j = 0; j < QW / 8; ++j) {
                const float2 dd = *reinterpret_cast<const float2*>(sD + c0 + j * 8 + 2 * t);
                dpt[j][0] = st[j][0] * (dpt[j][0] - dd.x);
                dpt[j][1] = st[j][1] * (dpt[j][1] - dd.y);
                dpt[j][2] = st[j][2] * (dpt[j][2] - dd.x);
                dpt[j][3] = st[j][3] * (dpt[j][3] - dd.y);
            }
            // dV += Pᵀ dO, dK += dSᵀ Q (reduction over the chunk's queries, steps of 16): A from
            // the accumulators, B = dO / Q stored [query][d] = [k][n] (.trans); one ldmatrix
            // covers d blocks 2dp and 2dp + 1.
#pragma unroll
            for (int kq = 0; kq < QW / 16; ++kq) {
                unsigned int ap[4], ads[4];
                fa_acc_to_a(ap, st[2 * kq], st[2 * kq + 1]);
                fa_acc_to_a(ads, dpt[2 * kq], dpt[2 * kq + 1]);
#pragma unroll
                for (int dp = 0; dp < D / 16; ++dp) {
                    unsigned int bgv[4], bqv[4];
                    ldsm_x4_t(bgv, gkn + 2 * ((c0 + kq * 16) * LD + dp * 16));
                    ldsm_x4_t(bqv, qkn + 2 * ((c0 + kq * 16) * LD + dp * 16));
                    mma_bf16_16816(adv[2 * dp], ap, bgv);
                    mma_bf16_16816(adv[2 * dp + 1], ap, bgv + 2);
                    mma_bf16_16816(adk[2 * dp], ads, bqv);
                    mma_bf16_16816(adk[2 * dp + 1], ads, bqv + 2);
                }
            }
        }
        gi = ngi;
        q0 = nq0;
    }
    cp_async_wait<0>();
    // Row g + 8i of the warp's keys, columns dj·8 + 2t, + 1: one 32-bit store per pair.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        i64 key = key_r[i];
        if (key >= tk) continue;
        bf16_t* dkr = dk + ((b * hkv + hk) * tk + key) * D;
        bf16_t* dvr = dv + ((b * hkv + hk) * tk + key) * D;
#pragma unroll
        for (int dj = 0; dj < D / 8; ++dj) {
            int col = dj * 8 + 2 * t;
            *reinterpret_cast<unsigned int*>(dkr + col) =
                pack_bf16_rn(adk[dj][2 * i] * scale, adk[dj][2 * i + 1] * scale);
            *reinterpret_cast<unsigned int*>(dvr + col) = pack_bf16_rn(adv[dj][2 * i], adv[dj][2 * i + 1]);
        }
    }
}

template <int D, bool SEG>
__device__ void flash_bwd_dq(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k, const bf16_t* __restrict__ v,
                             const bf16_t* __restrict__ dout, const float* __restrict__ lse,
                             const float* __restrict__ delta, bf16_t* __restrict__ dq,
                             const unsigned int* __restrict__ seg_klo, const unsigned int* __restrict__ seg_khi, i64 hq,
                             i64 hkv, i64 tq, i64 tk, float scale, i64 causal) {
    constexpr int LD = D + 8;
    constexpr int TILE = 64 * LD;  // elements of one 64-row tile
    // Shared: Q and dO of the block's query tile (resident), then two buffers of the streamed key
    // tile (buffer s: K at sKV + 2s·TILE, V at + TILE).
    extern __shared__ __align__(16) unsigned char fq_smem[];
    bf16_t* sQ = reinterpret_cast<bf16_t*>(fq_smem);
    bf16_t* sG = sQ + TILE;
    bf16_t* sKV = sG + TILE;

    i64 b = blockIdx.z, h = blockIdx.y, q0 = (i64)blockIdx.x * 64;
    i64 hk = h / (hq / hkv);
    const bf16_t* qb = q + (b * hq + h) * tq * D;
    const bf16_t* gb = dout + (b * hq + h) * tq * D;
    const bf16_t* kb = k + (b * hkv + hk) * tk * D;
    const bf16_t* vb = v + (b * hkv + hk) * tk * D;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    fa_load_rows<D>(sQ, qb, q0, tq, 64);
    fa_load_rows<D>(sG, gb, q0, tq, 64);

    const float sl2 = scale * 1.4426950408889634f;
    i64 off = tk - tq;
    i64 row_r[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
    float l2[2], dl[2];
    // The thread's rows see the keys [klo_r, khi_r): segments, causal (key <= row + off),
    // key < tk; none for rows past tq.
    i64 klo_r[2], khi_r[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        i64 r = row_r[i];
        bool in = r < tq;
        float l = in ? lse[(b * hq + h) * tq + r] : NEG_INF;
        l2[i] = l == NEG_INF ? POS_INF : l * 1.4426950408889634f;
        dl[i] = in ? delta[(b * hq + h) * tq + r] : 0.f;
        i64 lo = 0, hi = tk;
        if (SEG) {
            lo = in ? (i64)seg_klo[r] : 0;
            i64 e = in ? (i64)seg_khi[r] : 0;
            hi = e < hi ? e : hi;
        }
        if (causal) {
            i64 c = r + off + 1;
            hi = c < hi ? c : hi;
        }
        if (!in) hi = lo;
        klo_r[i] = lo;
        khi_r[i] = hi;
    }
    i64 kbeg, kend;
    fa_key_span<SEG>(seg_klo, seg_khi, q0, 64, tq, tk, causal, &kbeg, &kend);
    // k0 need not be a multiple of 64 (segments start anywhere); rows are 16-byte aligned.
    if (kbeg < kend) {
        fa_load_rows<D>(sKV, kb, kbeg, tk, 64);
        fa_load_rows<D>(sKV + TILE, vb, kbeg, tk, 64);
    }
    cp_async_commit();  // one group: Q, dO and the first key tile

    float adq[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) adq[j][r] = 0.f;

    // Per-lane ldmatrix byte addresses (common.cuh's mapping, l = lane): A 16x16 of the warp's
    // Q / dO rows, (warp·16 + l % 16, (l / 16)·8); B of two n-blocks stored [n][k], plain:
    // (l % 8 + (l / 16)·8, ((l / 8) % 2)·8); B of two n-blocks stored [k][n], .trans:
    // (l % 16, (l / 16)·8). Element (row, col) of a tile is at byte 2 (row·LD + col).
    const unsigned int qA = smem_addr(sQ) + 2 * ((warp * 16 + (lane & 15)) * LD + (lane >> 4) * 8);
    const unsigned int gA = qA + 2 * TILE;
    const unsigned int kNK = smem_addr(sKV) + 2 * (((lane & 7) + (lane >> 4) * 8) * LD + ((lane >> 3) & 1) * 8);
    const unsigned int kKN = smem_addr(sKV) + 2 * ((lane & 15) * LD + (lane >> 4) * 8);

    int buf = 0;  // the buffer of this iteration's key tile
    for (i64 k0 = kbeg; k0 < kend; k0 += 64, buf ^= 1) {
        cp_async_wait<0>();  // this thread's copies of this tile (and at the first, Q and dO) landed
        __syncthreads();     // the tile visible to all; every warp is done with buffer buf ^ 1
        if (k0 + 64 < kend) {
            fa_load_rows<D>(sKV + (2 * (buf ^ 1)) * TILE, kb, k0 + 64, tk, 64);
            fa_load_rows<D>(sKV + (2 * (buf ^ 1) + 1) * TILE, vb, k0 + 64, tk, 64);
        }
        cp_async_commit();

        // K of buffer buf starts 2buf·TILE elements (4buf·TILE bytes) into sKV, V one TILE later.
        const unsigned int knk = kNK + buf * (4 * TILE), vnk = knk + 2 * TILE;
        const unsigned int kkn = kKN + buf * (4 * TILE);

        // S = Q Kᵀ and dP = dO Vᵀ (16 rows x 64 keys): A = the warp's Q / dO rows, B = K / V
        // stored [key][d] = [n][k]; one ldmatrix covers key blocks 2jp and 2jp + 1.
        float s[8][4], dp[8][4];
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) s[j][r] = dp[j][r] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D; kk += 16) {
            unsigned int aq[4], ag[4];
            ldsm_x4(aq, qA + 2 * kk);
            ldsm_x4(ag, gA + 2 * kk);
#pragma unroll
            for (int jp = 0; jp < 4; ++jp) {
                unsigned int bk[4], bv[4];
                ldsm_x4(bk, knk + 2 * (jp * 16 * LD + kk));
                ldsm_x4(bv, vnk + 2 * (jp * 16 * LD + kk));
                mma_bf16_16816(s[2 * jp], aq, bk);
                mma_bf16_16816(s[2 * jp + 1], aq, bk + 2);
                mma_bf16_16816(dp[2 * jp], ag, bv);
                mma_bf16_16816(dp[2 * jp + 1], ag, bv + 2);
            }
        }
        // P, then dS = P (dP - delta) in s. Accumulator r of block j: row g + 8 (r >> 1), key
        // column j·8 + 2t + (r & 1).
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) s[j][r] = exp2f(s[j][r] * sl2 - l2[r >> 1]);
        if (SEG || k0 + 64 > tk || q0 + 64 > tq || (causal && k0 + 63 > q0 + off)) {  // edge tile
            int lo[2], hi[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) fb_clamp64(klo_r[i] - k0, khi_r[i] - k0, &lo[i], &hi[i]);
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    int kc = j * 8 + 2 * t + (r & 1);
                    if (kc < lo[r >> 1] || kc >= hi[r >> 1]) s[j][r] = 0.f;
                }
        }
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) s[j][r] = s[j][r] * (dp[j][r] - dl[r >> 1]);
        // dQ += dS K (reduction over the 64 keys, 4 steps of 16): A from the accumulators, B = K
        // stored [key][d] = [k][n] (.trans); one ldmatrix covers d blocks 2dj and 2dj + 1.
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            unsigned int a[4];
            fa_acc_to_a(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
            for (int dj = 0; dj < D / 16; ++dj) {
                unsigned int bb[4];
                ldsm_x4_t(bb, kkn + 2 * (kk * 16 * LD + dj * 16));
                mma_bf16_16816(adq[2 * dj], a, bb);
                mma_bf16_16816(adq[2 * dj + 1], a, bb + 2);
            }
        }
    }
    cp_async_wait<0>();
    // Row g + 8i of the warp's rows, columns dj·8 + 2t, + 1: one 32-bit store per pair.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        i64 row = row_r[i];
        if (row >= tq) continue;
        bf16_t* r = dq + ((b * hq + h) * tq + row) * D;
#pragma unroll
        for (int dj = 0; dj < D / 8; ++dj) {
            int col = dj * 8 + 2 * t;
            *reinterpret_cast<unsigned int*>(r + col) =
                pack_bf16_rn(adq[dj][2 * i] * scale, adq[dj][2 * i + 1] * scale);
        }
    }
}

#define FLASH_BWD(DKDV, DQ, D, SEG)                                                                        \
    extern "C" __global__ void __launch_bounds__(128) DKDV(                                                \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* dout, const float* lse,           \
        const float* delta, bf16_t* dk, bf16_t* dv, const unsigned int* seg_qlo,                          \
        const unsigned int* seg_qhi, i64 hq, i64 hkv, i64 tq, i64 tk, float scale, i64 causal) {           \
        flash_bwd_dkdv<D, SEG>(q, k, v, dout, lse, delta, dk, dv, seg_qlo, seg_qhi, hq, hkv, tq, tk, scale, \
                               causal);                                                                    \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(128) DQ(                                                  \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* dout, const float* lse,           \
        const float* delta, bf16_t* dq, const unsigned int* seg_klo, const unsigned int* seg_khi, i64 hq,  \
        i64 hkv, i64 tq, i64 tk, float scale, i64 causal) {                                                \
        flash_bwd_dq<D, SEG>(q, k, v, dout, lse, delta, dq, seg_klo, seg_khi, hq, hkv, tq, tk, scale,     \
                             causal);                                                                      \
    }
FLASH_BWD(flash_bwd_dkdv_d64, flash_bwd_dq_d64, 64, false)
FLASH_BWD(flash_bwd_dkdv_d80, flash_bwd_dq_d80, 80, false)
FLASH_BWD(flash_bwd_dkdv_d128, flash_bwd_dq_d128, 128, false)
FLASH_BWD(flash_bwd_dkdv_seg_d64, flash_bwd_dq_seg_d64, 64, true)
FLASH_BWD(flash_bwd_dkdv_seg_d80, flash_bwd_dq_seg_d80, 80, true)
FLASH_BWD(flash_bwd_dkdv_seg_d128, flash_bwd_dq_seg_d128, 128, true)
