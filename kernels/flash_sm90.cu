// Hopper flash attention forward (sm_90a): FlashAttention-3's data path (TMA loads, wgmma from
// shared memory for S = Q Kᵀ, wgmma with P from registers for O += P V, a producer warpgroup
// and two consumer warpgroups) without its intra-warpgroup pipelining: each consumer runs
// S, softmax, P V in turn, and the two consumers and the producer overlap one another.
//
// Same contract as flash_fwd_d{D} of kernels/flash.cu, without segments: q [B, Hq, Tq, D], k and
// v [B, Hkv, Tk, D] contiguous bf16, o [B, Hq, Tq, D] bf16, lse [B, Hq, Tq] f32 (natural log);
// query head h reads kv head h / (Hq / Hkv); causal: query i sees keys j <= i + (Tk - Tq); a
// row that sees no key gets o = 0 and lse = -inf. D is 64 or 128.
//
// Operands come through 3-d tensor maps over [B·H, T, D] (src/backend/cuda/flash.rs): boxes of
// 64 (D, 128 bytes) x 128 rows x 1, 128-byte swizzle, zeros past T. Shared memory (1024-byte
// aligned after 256 bytes of mbarriers): Q [D/64 chunks][128 rows][128 B], then FH_STAGES
// stages of K and V tiles laid out the same way ([D/64][128 keys][128 B] each).
//   S = Q Kᵀ: A = Q (K-major: rows of D), B = K (K-major: key rows of D), m64n128k16, D / 16
//   steps, each 32 bytes further along the swizzled rows (the next 64-wide chunk after 4).
//   O += P V: A = P (registers), B = V read MN-major (V [key][d] has N = d contiguous:
//   wgmma's transpose mode): 16-key steps 2048 bytes apart, the D chunks one tile chunk apart
//   (leading byte offset), 8-key groups 1024 bytes apart.
// Barriers: Q full (once), per stage K full and V full (the producer's TMA bytes) and empty (one
// arrival per consumer warp once its wgmmas that read the stage retired).
// TESSERA_ARCH_SUFFIX_A  (compile for sm_90a: wgmma needs the arch-specific feature set)

#define FH_BM 128  // queries per block: two consumer warpgroups of 64 rows
#define FH_BN 128  // keys per tile
#define FH_STAGES 2
#define FH_CONSUMER_WARPS 8

template <int D>
__device__ __forceinline__ void wgmma_pv(float* acc, const unsigned int* a, unsigned long long db) {
    if (D == 128) wgmma_rs_n128<1>(acc, a, db);
    else wgmma_rs_n64<1>(acc, a, db);
}

template <int D>
__device__ __forceinline__ void flash_fwd_wg(unsigned long long map_q, unsigned long long map_k,
                                             unsigned long long map_v, bf16_t* __restrict__ o,
                                             float* __restrict__ lse, i64 hq, i64 hkv, i64 tq, i64 tk, float scale,
                                             i64 causal) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    static_assert(D == 64 || D == 128, "head dim 64 or 128");
    constexpr int DC = D / 64;                           // 64-wide chunks of the head dim
    constexpr unsigned int Q_CHUNK = FH_BM * 128;        // bytes of one chunk of Q
    constexpr unsigned int KV_CHUNK = FH_BN * 128;       // ... of a K or V tile
    constexpr unsigned int Q_BYTES = DC * Q_CHUNK;
    constexpr unsigned int KV_BYTES = DC * KV_CHUNK;     // one K (or V) tile
    extern __shared__ __align__(1024) unsigned char fh_smem[];
    const unsigned int bars = smem_addr(fh_smem);
    const unsigned int sq = (bars + 256u + 1023u) & ~1023u;
    const unsigned int skv = sq + Q_BYTES;  // stage s: K at skv + 2 s KV_BYTES, V right after
#define FH_QFULL (bars)
#define FH_KFULL(s) (bars + 8u + 8u * (unsigned int)(s))
#define FH_VFULL(s) (bars + 8u + 8u * (unsigned int)(FH_STAGES + (s)))
#define FH_EMPTY(s) (bars + 8u + 8u * (unsigned int)(2 * FH_STAGES + (s)))

    const int tid = threadIdx.x;
    if (tid == 0) {
        mbar_init(FH_QFULL, 1);
#pragma unroll
        for (int s = 0; s < FH_STAGES; ++s) {
            mbar_init(FH_KFULL(s), 1);
            mbar_init(FH_VFULL(s), 1);
            mbar_init(FH_EMPTY(s), FH_CONSUMER_WARPS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        fence_proxy_async();
    }
    __syncthreads();

    // Causal blocks in reverse order: the longest (last) query tiles start first.
    const i64 qt = causal ? (i64)(gridDim.x - 1 - blockIdx.x) : (i64)blockIdx.x;
    const i64 b = blockIdx.z, h = blockIdx.y, q0 = qt * FH_BM;
    const int bh_q = (int)(b * hq + h), bh_kv = (int)(b * hkv + h / (hq / hkv));
    const i64 off = tk - tq;  // causal offset: row i sees keys <= i + off
    i64 kend = tk;
    if (causal) {
        const i64 last = q0 + FH_BM + off;  // one past the keys the tile's last query sees
        kend = last < kend ? last : kend;
    }
    const int ntiles = kend > 0 ? (int)((kend + FH_BN - 1) / FH_BN) : 0;

    if (tid < 128) {
        // Producer warpgroup: registers to the consumers, one thread issues every copy.
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        if (tid == 0) {
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(map_q) : "memory");
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(map_k) : "memory");
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(map_v) : "memory");
            mbar_arrive_expect_tx(FH_QFULL, Q_BYTES);
#pragma unroll
            for (int c = 0; c < DC; ++c) tma_load_3d(sq + c * Q_CHUNK, map_q, FH_QFULL, 64 * c, (int)q0, bh_q);
            int stage = 0;
            unsigned int phase = 0;
            for (int i = 0; i < ntiles; ++i) {
                const int k0 = i * FH_BN;
                mbar_wait(FH_EMPTY(stage), phase ^ 1u);  // the consumers freed it (first lap: at once)
                const unsigned int sk = skv + (unsigned int)stage * 2u * KV_BYTES, sv = sk + KV_BYTES;
                mbar_arrive_expect_tx(FH_KFULL(stage), KV_BYTES);
#pragma unroll
                for (int c = 0; c < DC; ++c) tma_load_3d(sk + c * KV_CHUNK, map_k, FH_KFULL(stage), 64 * c, k0, bh_kv);
                mbar_arrive_expect_tx(FH_VFULL(stage), KV_BYTES);
#pragma unroll
                for (int c = 0; c < DC; ++c) tma_load_3d(sv + c * KV_CHUNK, map_v, FH_VFULL(stage), 64 * c, k0, bh_kv);
                if (++stage == FH_STAGES) {
                    stage = 0;
                    phase ^= 1u;
                }
            }
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
    const int ci = (tid >> 7) - 1;  // consumer: query rows 64 ci .. 64 ci + 63 of the block
    const int warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
    // This thread's rows row0 and row0 + 8 (accumulator element e: row + 8 (e >> 1), column
    // 8 j + 2 t + (e & 1) of n-block j). Positions fit in 32 bits (the launcher checks).
    const int warp_row = (int)q0 + ci * 64 + warp * 16;
    const int row0 = warp_row + g;
    const int off32 = (int)off, tk32 = (int)tk;
    const float sl2 = scale * LOG2E_F;  // exp(x scale) = exp2(x sl2)
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};  // running max (raw scores), quad-partial sum
    float acc[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) {
        acc[i] = 0.f;
        fence_operand(acc[i]);
    }
    const unsigned int sqa = sq + (unsigned int)ci * (64 * 128);  // this warpgroup's rows in each chunk
    mbar_wait(FH_QFULL, 0u);
    int stage = 0;
    unsigned int phase = 0;
    for (int i = 0; i < ntiles; ++i) {
        const int k0 = i * FH_BN;
        const unsigned int sk = skv + (unsigned int)stage * 2u * KV_BYTES, sv = sk + KV_BYTES;

        // S = Q Kᵀ: 64 rows x 128 keys per warpgroup.
        float s[FH_BN / 2];
#pragma unroll
        for (int j = 0; j < FH_BN / 2; ++j) {
            s[j] = 0.f;
            fence_operand(s[j]);
        }
        mbar_wait(FH_KFULL(stage), phase);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const unsigned int ch = (unsigned int)(kk >> 2), in = (unsigned int)(kk & 3) * 32u;
            wgmma_n128<0, 0>(s, wg_desc(sqa + ch * Q_CHUNK + in), wg_desc(sk + ch * KV_CHUNK + in));
        }
        wg_commit();
        wg_wait0();
#pragma unroll
        for (int j = 0; j < FH_BN / 2; ++j) fence_operand(s[j]);

        // Mask only the tiles that cross the end of the keys or (for this warp's rows) the diagonal.
        if (k0 + FH_BN > tk32 || (causal && k0 + FH_BN - 1 > warp_row + off32)) {
#pragma unroll
            for (int j = 0; j < FH_BN / 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = k0 + 8 * j + 2 * t + (e & 1);
                    const bool ok = key < tk32 && (!causal || key <= row0 + 8 * (e >> 1) + off32);
                    if (!ok) s[4 * j + e] = NEG_INF;
                }
        }
        // Online softmax per row (the quad of 4 threads holds a row's 128 keys).
        float corr[2], mneg[2], rs[2] = {0.f, 0.f};
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = m[r];
#pragma unroll
            for (int j = 0; j < FH_BN / 8; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            // A row with no key yet keeps m = -inf: 0 as the offset, so exp2(-inf) = 0.
            mneg[r] = mx == NEG_INF ? 0.f : -mx * sl2;
            corr[r] = fast_exp2(fmaf(m[r], sl2, mneg[r]));  // m = -inf -> 0 (acc and l are 0 anyway)
            m[r] = mx;
        }
#pragma unroll
        for (int j = 0; j < FH_BN / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = fast_exp2(fmaf(s[4 * j + e], sl2, mneg[e >> 1]));
                s[4 * j + e] = p;
                rs[e >> 1] += p;
            }
        l[0] = l[0] * corr[0] + rs[0];
        l[1] = l[1] * corr[1] + rs[1];
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            acc[4 * j] *= corr[0];
            acc[4 * j + 1] *= corr[0];
            acc[4 * j + 2] *= corr[1];
            acc[4 * j + 3] *= corr[1];
        }

        // O += P V: P's 16-key slices packed from the S accumulators, all before the fence
        // (registers written between wgmmas would make the compiler serialise them).
        unsigned int pa[FH_BN / 16][4];
#pragma unroll
        for (int kk = 0; kk < FH_BN / 16; ++kk) fa_acc_to_a(pa[kk], &s[8 * kk], &s[8 * kk + 4]);
        mbar_wait(FH_VFULL(stage), phase);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < FH_BN / 16; ++kk)
            wgmma_pv<D>(acc, pa[kk], wg_desc_lbo(sv + (unsigned int)kk * 2048u, KV_CHUNK));
        wg_commit();
        wg_wait0();
#pragma unroll
        for (int j = 0; j < D / 2; ++j) fence_operand(acc[j]);
        if (lane == 0) mbar_arrive(FH_EMPTY(stage));  // this warp is done with the stage
        if (++stage == FH_STAGES) {
            stage = 0;
            phase ^= 1u;
        }
    }

    // Epilogue: the row sums across the quad, normalise, write o (bf16 pairs) and lse.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const i64 row = row0 + 8 * r;
        if (row >= tq) continue;
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        bf16_t* orow = o + ((i64)bh_q * tq + row) * D + 2 * t;
#pragma unroll
        for (int j = 0; j < D / 8; ++j)
            *reinterpret_cast<unsigned int*>(orow + 8 * j) =
                pack_bf16_rn(acc[4 * j + 2 * r] * inv, acc[4 * j + 2 * r + 1] * inv);
        if (t == 0) lse[(i64)bh_q * tq + row] = l[r] > 0.f ? m[r] * scale + logf(l[r]) : NEG_INF;
    }
#undef FH_QFULL
#undef FH_KFULL
#undef FH_VFULL
#undef FH_EMPTY
#endif
}

// Launch: grid (ceil(Tq / 128), Hq, B), 384 threads, dynamic shared memory
// 256 + 1024 + 128 D 2 (1 + 2 FH_STAGES) bytes (the launcher's FH_SHARED).
#define FLASH_FWD_WG(NAME, D)                                                                                \
    extern "C" __global__ void __launch_bounds__(384, 1)                                                     \
        NAME(const __grid_constant__ TmaMap map_q, const __grid_constant__ TmaMap map_k,                     \
             const __grid_constant__ TmaMap map_v, bf16_t* o, float* lse, i64 hq, i64 hkv, i64 tq, i64 tk,   \
             float scale, i64 causal) {                                                                      \
        flash_fwd_wg<D>((unsigned long long)&map_q, (unsigned long long)&map_k, (unsigned long long)&map_v, \
                        o, lse, hq, hkv, tq, tk, scale, causal);                                             \
    }
FLASH_FWD_WG(flash_fwd_wg_d64, 64)
FLASH_FWD_WG(flash_fwd_wg_d128, 128)
