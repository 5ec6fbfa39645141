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
// Block: 64 queries x one (batch, head), 4 warps of 16 query rows each; key tiles of 64 go
// through shared memory (cp.async). S = Q K^T and O += P V run on tensor cores; P is
// re-packed from the S accumulators straight into A fragments (no shared-memory round trip).

#define FA_BM 64
#define FA_BN 64

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

// Keys [*kbeg, *kend) that the query tile [q0, q0 + 64) may see: causal and segment bounds
// (a superset; the per-element mask decides). Shared by the forward and dQ kernels.
template <bool SEG>
__device__ __forceinline__ void fa_key_span(const unsigned int* seg_klo, const unsigned int* seg_khi, i64 q0, i64 tq,
                                            i64 tk, i64 causal, i64* kbeg, i64* kend) {
    i64 b = 0, e = tk;
    if (causal) {
        i64 last = q0 + 63 + (tk - tq) + 1;  // keys the tile's last query sees
        e = last < e ? last : e;
    }
    if (SEG) {
        i64 lo, hi;
        fa_range_hull(seg_klo, seg_khi, q0, tq, &lo, &hi);
        b = lo > b ? lo : b;
        e = hi < e ? hi : e;
    }
    *kbeg = b;
    *kend = e;
}

template <int D, bool SEG>
__device__ void flash_fwd(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k, const bf16_t* __restrict__ v,
                          bf16_t* __restrict__ o, float* __restrict__ lse, const unsigned int* __restrict__ seg_klo,
                          const unsigned int* __restrict__ seg_khi, i64 hq, i64 hkv, i64 tq, i64 tk, float scale,
                          i64 causal) {
    constexpr int LD = D + 8;
    extern __shared__ __align__(16) unsigned char fa_smem[];
    bf16_t* sQ = reinterpret_cast<bf16_t*>(fa_smem);
    bf16_t* sK = sQ + FA_BM * LD;
    bf16_t* sV = sK + FA_BN * LD;

    i64 b = blockIdx.z, h = blockIdx.y, q0 = (i64)blockIdx.x * FA_BM;
    i64 hk = h / (hq / hkv);
    const bf16_t* qb = q + (b * hq + h) * tq * D;
    const bf16_t* kb = k + (b * hkv + hk) * tk * D;
    const bf16_t* vb = v + (b * hkv + hk) * tk * D;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;

    fa_load_rows<D>(sQ, qb, q0, tq, FA_BM);
    cp_async_commit();

    const float sl2 = scale * 1.4426950408889634f;  // exp(x) = exp2(x log2 e)
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
    float acc[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[j][r] = 0.f;

    i64 off = tk - tq;  // causal offset
    i64 kbeg, kend;
    fa_key_span<SEG>(seg_klo, seg_khi, q0, tq, tk, causal, &kbeg, &kend);
    i64 row_g[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
    i64 rlo[2], rhi[2];  // each row's key range [rlo, rhi) (empty for rows past tq with segments)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        bool in = row_g[i] < tq;
        rlo[i] = SEG && in ? (i64)seg_klo[row_g[i]] : 0;
        rhi[i] = SEG ? (in ? (i64)seg_khi[row_g[i]] : 0) : tk;
    }

    // k0 need not be a multiple of FA_BN (segments start anywhere); rows are 16-byte aligned.
    for (i64 k0 = kbeg; k0 < kend; k0 += FA_BN) {
        __syncthreads();  // previous tile fully consumed
        fa_load_rows<D>(sK, kb, k0, tk, FA_BN);
        fa_load_rows<D>(sV, vb, k0, tk, FA_BN);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();

        // S = Q K^T for this warp's 16 rows x 64 keys.
        float s[FA_BN / 8][4];
#pragma unroll
        for (int j = 0; j < FA_BN / 8; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) s[j][r] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D; kk += 16) {
            unsigned int a[4];
            const bf16_t* p = sQ + (warp * 16 + g) * LD + kk + 2 * t;
            a[0] = ld_pair(p);
            a[1] = ld_pair(p + 8 * LD);
            a[2] = ld_pair(p + 8);
            a[3] = ld_pair(p + 8 * LD + 8);
#pragma unroll
            for (int j = 0; j < FA_BN / 8; ++j) {
                unsigned int bb[2];
                const bf16_t* pk = sK + (j * 8 + g) * LD + kk + 2 * t;
                bb[0] = ld_pair(pk);
                bb[1] = ld_pair(pk + 8);
                mma_bf16_16816(s[j], a, bb);
            }
        }

        // Mask, scale (log2 units), online softmax. Thread holds rows g (r=0,1) and g+8 (r=2,3).
        float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int j = 0; j < FA_BN / 8; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                i64 key = k0 + j * 8 + 2 * t + (r & 1);
                i64 row = row_g[r >> 1];
                bool ok = key < tk && key >= rlo[r >> 1] && key < rhi[r >> 1] && (!causal || key <= row + off);
                float x = ok ? s[j][r] * sl2 : NEG_INF;
                s[j][r] = x;
                mx[r >> 1] = fmaxf(mx[r >> 1], x);
            }
        float corr[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
            float mn = fmaxf(m[i], mx[i]);
            corr[i] = (mn == NEG_INF) ? 1.f : exp2f(m[i] - mn);
            m[i] = mn;
        }
        float rs[2] = {0.f, 0.f};
#pragma unroll
        for (int j = 0; j < FA_BN / 8; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                float mi = m[r >> 1];
                float p = (mi == NEG_INF) ? 0.f : exp2f(s[j][r] - mi);
                s[j][r] = p;
                rs[r >> 1] += p;
            }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            rs[i] += __shfl_xor_sync(0xffffffffu, rs[i], 1);
            rs[i] += __shfl_xor_sync(0xffffffffu, rs[i], 2);
            l[i] = l[i] * corr[i] + rs[i];
        }
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            acc[j][0] *= corr[0];
            acc[j][1] *= corr[0];
            acc[j][2] *= corr[1];
            acc[j][3] *= corr[1];
        }

        // O += P V: P (16 x 64 keys) from the S accumulators, V tile [key][d] in shared memory.
#pragma unroll
        for (int kk = 0; kk < FA_BN / 16; ++kk) {
            unsigned int a[4];
            a[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
            a[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
            a[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            const bf16_t* pv = sV + (kk * 16 + 2 * t) * LD + g;
#pragma unroll
            for (int j = 0; j < D / 8; ++j) {
                unsigned int bb[2];
                const bf16_t* p = pv + j * 8;
                bb[0] = (unsigned int)p[0] | ((unsigned int)p[LD] << 16);
                bb[1] = (unsigned int)p[8 * LD] | ((unsigned int)p[9 * LD] << 16);
                mma_bf16_16816(acc[j], a, bb);
            }
        }
    }
    cp_async_wait<0>();

    // Epilogue: normalise, write o (bf16) and lse.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        i64 row = row_g[i];
        if (row >= tq) continue;
        float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
        bf16_t* orow = o + ((b * hq + h) * tq + row) * D;
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            int col = j * 8 + 2 * t;
            orow[col] = f2bf(acc[j][2 * i] * inv);
            orow[col + 1] = f2bf(acc[j][2 * i + 1] * inv);
        }
        if (t == 0) {
            lse[(b * hq + h) * tq + row] = l[i] > 0.f ? (m[i] + log2f(l[i])) * 0.6931471805599453f : NEG_INF;
        }
    }
}

// Entry points: flash_fwd_d{D} ignores the segment arrays (may be null), flash_fwd_seg_d{D}
// applies them; the same for the backward kernels.
#define FLASH_FWD(NAME, D, SEG)                                                                          \
    extern "C" __global__ void __launch_bounds__(128)                                                    \
        NAME(const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* o, float* lse,                   \
             const unsigned int* seg_klo, const unsigned int* seg_khi, i64 hq, i64 hkv, i64 tq, i64 tk,  \
             float scale, i64 causal) {                                                                  \
        flash_fwd<D, SEG>(q, k, v, o, lse, seg_klo, seg_khi, hq, hkv, tq, tk, scale, causal);           \
    }
FLASH_FWD(flash_fwd_d64, 64, false)
FLASH_FWD(flash_fwd_d80, 80, false)
FLASH_FWD(flash_fwd_d128, 128, false)
FLASH_FWD(flash_fwd_seg_d64, 64, true)
FLASH_FWD(flash_fwd_seg_d80, 80, true)
FLASH_FWD(flash_fwd_seg_d128, 128, true)

// ---------------------------------------------------------------------------------------------
// Backward (FlashAttention-2 scheme, deterministic: no atomics). With P = exp(S·scale − lse),
// delta_i = Σ_d dO_id O_id, dS = P ∘ (dP − delta), dP = dO Vᵀ:
//   dV = Pᵀ dO,  dK = scale · dSᵀ Q   (kernel flash_bwd_dkdv: one block per 64-key tile and kv
//                                      head, looping over the GQA group's heads and the query
//                                      tiles; warps own 16 keys and compute Sᵀ = K Qᵀ directly)
//   dQ = scale · dS K                 (kernel flash_bwd_dq: one block per 64-query tile and head,
//                                      looping over key tiles, recomputing S and dP)
// delta comes from attn_bwd_delta (kernels/attention.cu). All operands contiguous [B, H, T, D] bf16; lse, delta f32.

// B fragment of an m16n8k16 product whose B operand is stored [k][n] in shared memory (n
// contiguous): two 16-bit loads per register.
__device__ __forceinline__ void frag_b_kn(unsigned int* bb, const bf16_t* p, int ld) {
    bb[0] = (unsigned int)p[0] | ((unsigned int)p[ld] << 16);
    bb[1] = (unsigned int)p[8 * ld] | ((unsigned int)p[9 * ld] << 16);
}

template <int D, bool SEG>
__device__ void flash_bwd_dkdv(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                               const bf16_t* __restrict__ v, const bf16_t* __restrict__ dout,
                               const float* __restrict__ lse, const float* __restrict__ delta,
                               bf16_t* __restrict__ dk, bf16_t* __restrict__ dv,
                               const unsigned int* __restrict__ seg_qlo, const unsigned int* __restrict__ seg_qhi,
                               i64 hq, i64 hkv, i64 tq, i64 tk, float scale, i64 causal) {
    constexpr int LD = D + 8;
    extern __shared__ __align__(16) unsigned char fb_smem[];
    bf16_t* sK = reinterpret_cast<bf16_t*>(fb_smem);
    bf16_t* sV = sK + 64 * LD;
    bf16_t* sQ = sV + 64 * LD;
    bf16_t* sG = sQ + 64 * LD;
    float* sL = reinterpret_cast<float*>(sG + 64 * LD);  // lse · log2 e, per query of the tile
    float* sD = sL + 64;                                  // delta

    i64 b = blockIdx.z, hk = blockIdx.y, k0 = (i64)blockIdx.x * 64;
    i64 group = hq / hkv;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const bf16_t* kb = k + (b * hkv + hk) * tk * D;
    const bf16_t* vb = v + (b * hkv + hk) * tk * D;
    fa_load_rows<D>(sK, kb, k0, tk, 64);
    fa_load_rows<D>(sV, vb, k0, tk, 64);
    cp_async_commit();

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
    float adk[D / 8][4], adv[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) adk[j][r] = adv[j][r] = 0.f;
    i64 key_r[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};
    unsigned int qlo[2] = {0u, 0u}, qhi[2] = {0u, 0u};  // the queries that see each of the thread's keys
    if (SEG) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            bool in = key_r[i] < tk;
            qlo[i] = in ? seg_qlo[key_r[i]] : 0u;
            qhi[i] = in ? seg_qhi[key_r[i]] : 0u;
        }
    }

    for (i64 gi = 0; gi < group; ++gi) {
        i64 h = hk * group + gi;
        const bf16_t* qb = q + (b * hq + h) * tq * D;
        const bf16_t* gb = dout + (b * hq + h) * tq * D;
        // q0 need not be a multiple of 64 (segments start anywhere); rows are 16-byte aligned.
        for (i64 q0 = qstart; q0 < qend; q0 += 64) {
            __syncthreads();  // previous tile consumed
            fa_load_rows<D>(sQ, qb, q0, tq, 64);
            fa_load_rows<D>(sG, gb, q0, tq, 64);
            cp_async_commit();
            if (threadIdx.x < 64) {
                i64 qi = q0 + threadIdx.x;
                float l = qi < tq ? lse[(b * hq + h) * tq + qi] : NEG_INF;
                sL[threadIdx.x] = l == NEG_INF ? POS_INF : l * 1.4426950408889634f;
                sD[threadIdx.x] = qi < tq ? delta[(b * hq + h) * tq + qi] : 0.f;
            }
            cp_async_wait<0>();
            __syncthreads();

            // Sᵀ (16 keys x 64 queries) = K Qᵀ, and dPᵀ = V dOᵀ.
            float st[8][4], dpt[8][4];
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int r = 0; r < 4; ++r) st[j][r] = dpt[j][r] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D; kk += 16) {
                unsigned int ak[4], avv[4];
                const bf16_t* pk = sK + (warp * 16 + g) * LD + kk + 2 * t;
                ak[0] = ld_pair(pk);
                ak[1] = ld_pair(pk + 8 * LD);
                ak[2] = ld_pair(pk + 8);
                ak[3] = ld_pair(pk + 8 * LD + 8);
                const bf16_t* pv = sV + (warp * 16 + g) * LD + kk + 2 * t;
                avv[0] = ld_pair(pv);
                avv[1] = ld_pair(pv + 8 * LD);
                avv[2] = ld_pair(pv + 8);
                avv[3] = ld_pair(pv + 8 * LD + 8);
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    unsigned int bq[2], bg[2];
                    const bf16_t* p = sQ + (j * 8 + g) * LD + kk + 2 * t;
                    bq[0] = ld_pair(p);
                    bq[1] = ld_pair(p + 8);
                    const bf16_t* p2 = sG + (j * 8 + g) * LD + kk + 2 * t;
                    bg[0] = ld_pair(p2);
                    bg[1] = ld_pair(p2 + 8);
                    mma_bf16_16816(st[j], ak, bq);
                    mma_bf16_16816(dpt[j], avv, bg);
                }
            }
            // Pᵀ and dSᵀ in place: st <- P, dpt <- dS.
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    int qc = j * 8 + 2 * t + (r & 1);
                    i64 qi = q0 + qc, key = key_r[r >> 1];
                    bool ok = key < tk && qi < tq && (!causal || key <= qi + off);
                    if (SEG) ok = ok && (unsigned int)qi >= qlo[r >> 1] && (unsigned int)qi < qhi[r >> 1];
                    float p = ok ? exp2f(st[j][r] * sl2 - sL[qc]) : 0.f;
                    st[j][r] = p;
                    dpt[j][r] = p * (dpt[j][r] - sD[qc]);
                }
            // dV += Pᵀ dO, dK += dSᵀ Q (reduction over the 64 queries, 4 steps of 16).
#pragma unroll
            for (int kq = 0; kq < 4; ++kq) {
                unsigned int ap[4], ads[4];
                ap[0] = pack_bf16(st[2 * kq][0], st[2 * kq][1]);
                ap[1] = pack_bf16(st[2 * kq][2], st[2 * kq][3]);
                ap[2] = pack_bf16(st[2 * kq + 1][0], st[2 * kq + 1][1]);
                ap[3] = pack_bf16(st[2 * kq + 1][2], st[2 * kq + 1][3]);
                ads[0] = pack_bf16(dpt[2 * kq][0], dpt[2 * kq][1]);
                ads[1] = pack_bf16(dpt[2 * kq][2], dpt[2 * kq][3]);
                ads[2] = pack_bf16(dpt[2 * kq + 1][0], dpt[2 * kq + 1][1]);
                ads[3] = pack_bf16(dpt[2 * kq + 1][2], dpt[2 * kq + 1][3]);
#pragma unroll
                for (int dj = 0; dj < D / 8; ++dj) {
                    unsigned int bgv[2], bqv[2];
                    frag_b_kn(bgv, sG + (kq * 16 + 2 * t) * LD + dj * 8 + g, LD);
                    frag_b_kn(bqv, sQ + (kq * 16 + 2 * t) * LD + dj * 8 + g, LD);
                    mma_bf16_16816(adv[dj], ap, bgv);
                    mma_bf16_16816(adk[dj], ads, bqv);
                }
            }
        }
    }
    cp_async_wait<0>();
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        i64 key = key_r[i];
        if (key >= tk) continue;
        bf16_t* dkr = dk + ((b * hkv + hk) * tk + key) * D;
        bf16_t* dvr = dv + ((b * hkv + hk) * tk + key) * D;
#pragma unroll
        for (int dj = 0; dj < D / 8; ++dj) {
            int col = dj * 8 + 2 * t;
            dkr[col] = f2bf(adk[dj][2 * i] * scale);
            dkr[col + 1] = f2bf(adk[dj][2 * i + 1] * scale);
            dvr[col] = f2bf(adv[dj][2 * i]);
            dvr[col + 1] = f2bf(adv[dj][2 * i + 1]);
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
    extern __shared__ __align__(16) unsigned char fq_smem[];
    bf16_t* sQ = reinterpret_cast<bf16_t*>(fq_smem);
    bf16_t* sG = sQ + 64 * LD;
    bf16_t* sK = sG + 64 * LD;
    bf16_t* sV = sK + 64 * LD;

    i64 b = blockIdx.z, h = blockIdx.y, q0 = (i64)blockIdx.x * 64;
    i64 hk = h / (hq / hkv);
    const bf16_t* qb = q + (b * hq + h) * tq * D;
    const bf16_t* gb = dout + (b * hq + h) * tq * D;
    const bf16_t* kb = k + (b * hkv + hk) * tk * D;
    const bf16_t* vb = v + (b * hkv + hk) * tk * D;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    fa_load_rows<D>(sQ, qb, q0, tq, 64);
    fa_load_rows<D>(sG, gb, q0, tq, 64);
    cp_async_commit();

    const float sl2 = scale * 1.4426950408889634f;
    i64 off = tk - tq;
    i64 row_r[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
    float l2[2], dl[2];
    i64 rlo[2], rhi[2];  // each row's key range [rlo, rhi) (empty for rows past tq with segments)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        i64 r = row_r[i];
        float l = r < tq ? lse[(b * hq + h) * tq + r] : NEG_INF;
        l2[i] = l == NEG_INF ? POS_INF : l * 1.4426950408889634f;
        dl[i] = r < tq ? delta[(b * hq + h) * tq + r] : 0.f;
        rlo[i] = SEG && r < tq ? (i64)seg_klo[r] : 0;
        rhi[i] = SEG ? (r < tq ? (i64)seg_khi[r] : 0) : tk;
    }
    i64 kbeg, kend;
    fa_key_span<SEG>(seg_klo, seg_khi, q0, tq, tk, causal, &kbeg, &kend);
    float adq[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) adq[j][r] = 0.f;

    for (i64 k0 = kbeg; k0 < kend; k0 += 64) {
        __syncthreads();
        fa_load_rows<D>(sK, kb, k0, tk, 64);
        fa_load_rows<D>(sV, vb, k0, tk, 64);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        float s[8][4], dp[8][4];
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) s[j][r] = dp[j][r] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D; kk += 16) {
            unsigned int aq[4], ag[4];
            const bf16_t* p = sQ + (warp * 16 + g) * LD + kk + 2 * t;
            aq[0] = ld_pair(p);
            aq[1] = ld_pair(p + 8 * LD);
            aq[2] = ld_pair(p + 8);
            aq[3] = ld_pair(p + 8 * LD + 8);
            const bf16_t* p2 = sG + (warp * 16 + g) * LD + kk + 2 * t;
            ag[0] = ld_pair(p2);
            ag[1] = ld_pair(p2 + 8 * LD);
            ag[2] = ld_pair(p2 + 8);
            ag[3] = ld_pair(p2 + 8 * LD + 8);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                unsigned int bk[2], bv[2];
                const bf16_t* pk = sK + (j * 8 + g) * LD + kk + 2 * t;
                bk[0] = ld_pair(pk);
                bk[1] = ld_pair(pk + 8);
                const bf16_t* pv = sV + (j * 8 + g) * LD + kk + 2 * t;
                bv[0] = ld_pair(pv);
                bv[1] = ld_pair(pv + 8);
                mma_bf16_16816(s[j], aq, bk);
                mma_bf16_16816(dp[j], ag, bv);
            }
        }
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                i64 key = k0 + j * 8 + 2 * t + (r & 1), row = row_r[r >> 1];
                bool ok = key < tk && row < tq && key >= rlo[r >> 1] && key < rhi[r >> 1] &&
                          (!causal || key <= row + off);
                float p = ok ? exp2f(s[j][r] * sl2 - l2[r >> 1]) : 0.f;
                s[j][r] = p * (dp[j][r] - dl[r >> 1]);  // dS
            }
        // dQ += dS K (reduction over the 64 keys).
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            unsigned int a[4];
            a[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
            a[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
            a[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int dj = 0; dj < D / 8; ++dj) {
                unsigned int bb[2];
                frag_b_kn(bb, sK + (kk * 16 + 2 * t) * LD + dj * 8 + g, LD);
                mma_bf16_16816(adq[dj], a, bb);
            }
        }
    }
    cp_async_wait<0>();
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        i64 row = row_r[i];
        if (row >= tq) continue;
        bf16_t* r = dq + ((b * hq + h) * tq + row) * D;
#pragma unroll
        for (int dj = 0; dj < D / 8; ++dj) {
            int col = dj * 8 + 2 * t;
            r[col] = f2bf(adq[dj][2 * i] * scale);
            r[col + 1] = f2bf(adq[dj][2 * i + 1] * scale);
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
