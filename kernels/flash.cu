// Tensor-core flash attention forward (FlashAttention-2 scheme), bf16 in, f32 softmax and
// accumulation, sm_80+ mma.sync m16n8k16.
//
// q [B, Hq, Tq, D], k and v [B, Hkv, Tk, D], o [B, Hq, Tq, D], all contiguous bf16;
// lse [B, Hq, Tq] f32 (natural log). Query head h reads kv head h / (Hq / Hkv) (GQA without
// repeating K/V). causal: query i sees keys j <= i + (Tk - Tq) (bottom-right aligned, as the
// CPU op). A row that sees no key gets o = 0 and lse = -inf.
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

template <int D>
__device__ void flash_fwd(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k, const bf16_t* __restrict__ v,
                          bf16_t* __restrict__ o, float* __restrict__ lse, i64 hq, i64 hkv, i64 tq, i64 tk,
                          float scale, i64 causal) {
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
    i64 kend = tk;
    if (causal) {
        i64 last = q0 + FA_BM - 1 + off + 1;  // keys the block's last query sees
        kend = last < tk ? last : tk;
        if (kend < 0) kend = 0;
    }
    i64 row_g[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};

    for (i64 k0 = 0; k0 < kend; k0 += FA_BN) {
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
                bool ok = key < tk && (!causal || key <= row + off);
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

#define FLASH_FWD(D)                                                                                   \
    extern "C" __global__ void __launch_bounds__(128)                                                  \
        flash_fwd_d##D(const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* o, float* lse, i64 hq, \
                       i64 hkv, i64 tq, i64 tk, float scale, i64 causal) {                               \
        flash_fwd<D>(q, k, v, o, lse, hq, hkv, tq, tk, scale, causal);                                  \
    }
FLASH_FWD(64)
FLASH_FWD(80)
FLASH_FWD(128)
