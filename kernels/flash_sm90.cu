// Hopper flash attention forward (sm_90a): FlashAttention-3's data path (TMA loads, wgmma from
// shared memory for S = Q Kᵀ, wgmma with P from registers for O += P V, a producer warpgroup
// and two consumer warpgroups). Two schedules of a consumer's work:
//   flash_fwd_wg_d{D}:  S, softmax, P V in turn (the two consumers and the producer overlap one
//                       another), 2 K/V stages;
//   flash_fwd_wgo_d{D}: FlashAttention-3's intra-warpgroup overlap: S_{i+1} and P_i V_i are
//                       issued together and the softmax of S_{i+1} runs while P_i V_i is on the
//                       tensor cores, 3 K/V stages.
//
// Same contract as flash_fwd_d{D} of kernels/flash.cu, without segments: q [B, Hq, Tq, D], k and
// v [B, Hkv, Tk, D] contiguous bf16, o [B, Hq, Tq, D] bf16, lse [B, Hq, Tq] f32 (natural log);
// query head h reads kv head h / (Hq / Hkv); causal: query i sees keys j <= i + (Tk - Tq); a
// row that sees no key gets o = 0 and lse = -inf. D is 64 or 128.
//
// Operands come through 3-d tensor maps over [B·H, T, D] (src/backend/cuda/flash.rs): boxes of
// 64 (D, 128 bytes) x 128 (Q) or BN (K, V: the key tile) rows x 1, 128-byte swizzle, zeros past
// T. Shared memory (1024-byte aligned after 256 bytes of mbarriers): Q [D/64 chunks][128
// rows][128 B], then the stages of K and V tiles laid out the same way ([D/64][BN][128 B]).
//   S = Q Kᵀ: A = Q (K-major: rows of D), B = K (K-major: key rows of D), m64nBNk16, D / 16
//   steps, each 32 bytes further along the swizzled rows (the next 64-wide chunk after 4).
//   O += P V: A = P (registers), B = V read MN-major (V [key][d] has N = d contiguous:
//   wgmma's transpose mode): 16-key steps 2048 bytes apart, the D chunks one tile chunk apart
//   (leading byte offset), 8-key groups 1024 bytes apart.
// Barriers: Q full (once), per stage K full and V full (the producer's TMA bytes) and empty (one
// arrival per consumer warp once its wgmmas that read the stage retired).
// TESSERA_ARCH_SUFFIX_A  (compile for sm_90a: wgmma needs the arch-specific feature set)

#define FH_BM 128  // queries per block: two consumer warpgroups of 64 rows
#define FH_CONSUMER_WARPS 8

template <int D>
__device__ __forceinline__ void wgmma_pv(float* acc, const unsigned int* a, unsigned long long db) {
    if (D == 128) wgmma_rs_n128<1>(acc, a, db);
    else wgmma_rs_n64<1>(acc, a, db);
}

// Issues S = Q Kᵀ (64 rows x BN keys of this warpgroup, accumulators zeroed first) after a
// wgmma fence; the caller commits. sqa: this warpgroup's rows of Q; sk: the K tile.
template <int D, int BN>
__device__ __forceinline__ void fh_issue_scores(float* s, unsigned int sqa, unsigned int sk) {
#pragma unroll
    for (int j = 0; j < BN / 2; ++j) {
        s[j] = 0.f;
        fence_operand(s[j]);
    }
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const unsigned int ch = (unsigned int)(kk >> 2), in = (unsigned int)(kk & 3) * 32u;
        wgmma_bn<BN, 0, 0>(s, wg_desc(sqa + ch * (FH_BM * 128) + in), wg_desc(sk + ch * (BN * 128) + in));
    }
}

// Issues O += P V (P from the registers pa, V the tile at sv read MN-major) after a wgmma
// fence; the caller commits.
template <int D, int BN>
__device__ __forceinline__ void fh_issue_pv(float* acc, const unsigned int (*pa)[4], unsigned int sv) {
#pragma unroll
    for (int j = 0; j < D / 2; ++j) fence_operand(acc[j]);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
        wgmma_pv<D>(acc, pa[kk], wg_desc_lbo(sv + (unsigned int)kk * 2048u, BN * 128));
}

// The online softmax of one tile's scores s (keys k0 ..), in place (s becomes P): masks what
// the tile crosses (the end of the keys, this warp's causal diagonal), updates the running max m
// and quad-partial sum l of this thread's two rows, and returns each row's rescale factor of the
// earlier output in corr.
template <int BN>
__device__ __forceinline__ void fh_softmax(float* s, float* m, float* l, float* corr, int k0, int tk, int causal,
                                           int warp_row, int row0, int off, int t, float sl2) {
    if (k0 + BN > tk || (causal && k0 + BN - 1 > warp_row + off)) {
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = k0 + 8 * j + 2 * t + (e & 1);
                const bool ok = key < tk && (!causal || key <= row0 + 8 * (e >> 1) + off);
                if (!ok) s[4 * j + e] = NEG_INF;
            }
    }
    float mneg[2], rs[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = m[r];
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // A row with no key yet keeps m = -inf: 0 as the offset, so exp2(-inf) = 0.
        mneg[r] = mx == NEG_INF ? 0.f : -mx * sl2;
        corr[r] = fast_exp2(fmaf(m[r], sl2, mneg[r]));  // m = -inf -> 0 (the output and l are 0 anyway)
        m[r] = mx;
    }
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float p = fast_exp2(fmaf(s[4 * j + e], sl2, mneg[e >> 1]));
            s[4 * j + e] = p;
            rs[e >> 1] += p;
        }
    l[0] = l[0] * corr[0] + rs[0];
    l[1] = l[1] * corr[1] + rs[1];
}

// P's 16-key slices as the A fragments of the P V product, all before its fence (registers
// written between wgmmas would make the compiler serialise them).
template <int BN>
__device__ __forceinline__ void fh_pack(const float* p, unsigned int (*pa)[4]) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) fa_acc_to_a(pa[kk], &p[8 * kk], &p[8 * kk + 4]);
}

template <int D>
__device__ __forceinline__ void fh_rescale(float* acc, const float* corr) {
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
        acc[4 * j] *= corr[0];
        acc[4 * j + 1] *= corr[0];
        acc[4 * j + 2] *= corr[1];
        acc[4 * j + 3] *= corr[1];
    }
}

template <int D, int BN, bool OVERLAP>
__device__ __forceinline__ void flash_fwd_wg(unsigned long long map_q, unsigned long long map_k,
                                             unsigned long long map_v, bf16_t* __restrict__ o,
                                             float* __restrict__ lse, i64 hq, i64 hkv, i64 tq, i64 tk, float scale,
                                             i64 causal) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    static_assert(D == 64 || D == 128, "head dim 64 or 128");
    constexpr int STAGES = OVERLAP ? 3 : 2;
    constexpr int DC = D / 64;                      // 64-wide chunks of the head dim
    constexpr unsigned int Q_CHUNK = FH_BM * 128;   // bytes of one chunk of Q
    constexpr unsigned int KV_CHUNK = BN * 128;     // ... of a K or V tile
    constexpr unsigned int Q_BYTES = DC * Q_CHUNK;
    constexpr unsigned int KV_BYTES = DC * KV_CHUNK;  // one K (or V) tile
    extern __shared__ __align__(1024) unsigned char fh_smem[];
    const unsigned int bars = smem_addr(fh_smem);
    const unsigned int sq = (bars + 256u + 1023u) & ~1023u;
    const unsigned int skv = sq + Q_BYTES;  // stage s: K at skv + 2 s KV_BYTES, V right after
#define FH_QFULL (bars)
#define FH_KFULL(s) (bars + 8u + 8u * (unsigned int)(s))
#define FH_VFULL(s) (bars + 8u + 8u * (unsigned int)(STAGES + (s)))
#define FH_EMPTY(s) (bars + 8u + 8u * (unsigned int)(2 * STAGES + (s)))
#define FH_K(s) (skv + (unsigned int)(s) * 2u * KV_BYTES)
#define FH_V(s) (FH_K(s) + KV_BYTES)

    const int tid = threadIdx.x;
    if (tid == 0) {
        mbar_init(FH_QFULL, 1);
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
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
    const int ntiles = kend > 0 ? (int)((kend + BN - 1) / BN) : 0;

    // The warpgroup index through a shuffle: provably uniform per warp, which lets ptxas give
    // the branches their own register budgets (setmaxnreg).
    const int wg = __shfl_sync(0xffffffffu, tid >> 7, 0);
    if (wg == 0) {
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
                const int k0 = i * BN;
                mbar_wait(FH_EMPTY(stage), phase ^ 1u);  // the consumers freed it (first lap: at once)
                mbar_arrive_expect_tx(FH_KFULL(stage), KV_BYTES);
#pragma unroll
                for (int c = 0; c < DC; ++c)
                    tma_load_3d(FH_K(stage) + c * KV_CHUNK, map_k, FH_KFULL(stage), 64 * c, k0, bh_kv);
                mbar_arrive_expect_tx(FH_VFULL(stage), KV_BYTES);
#pragma unroll
                for (int c = 0; c < DC; ++c)
                    tma_load_3d(FH_V(stage) + c * KV_CHUNK, map_v, FH_VFULL(stage), 64 * c, k0, bh_kv);
                if (++stage == STAGES) {
                    stage = 0;
                    phase ^= 1u;
                }
            }
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
    const int ci = wg - 1;  // consumer: query rows 64 ci .. 64 ci + 63 of the block
    const int warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
    // This thread's rows row0 and row0 + 8 (accumulator element e: row + 8 (e >> 1), column
    // 8 j + 2 t + (e & 1) of n-block j). Positions fit in 32 bits (the launcher checks).
    const int warp_row = (int)q0 + ci * 64 + warp * 16;
    const int row0 = warp_row + g;
    const int off32 = (int)off, tk32 = (int)tk, causal32 = (int)causal;
    const float sl2 = scale * LOG2E_F;  // exp(x scale) = exp2(x sl2)
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};  // running max (raw scores), quad-partial sum
    float acc[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc[i] = 0.f;
    const unsigned int sqa = sq + (unsigned int)ci * (64 * 128);  // this warpgroup's rows in each chunk
    float s[BN / 2], corr[2];
    unsigned int pa[BN / 16][4];
    mbar_wait(FH_QFULL, 0u);
    if (!OVERLAP) {
        int stage = 0;
        unsigned int phase = 0;
        for (int i = 0; i < ntiles; ++i) {
            mbar_wait(FH_KFULL(stage), phase);
            fh_issue_scores<D, BN>(s, sqa, FH_K(stage));
            wg_commit();
            wg_wait0();
#pragma unroll
            for (int j = 0; j < BN / 2; ++j) fence_operand(s[j]);
            fh_softmax<BN>(s, m, l, corr, i * BN, tk32, causal32, warp_row, row0, off32, t, sl2);
            fh_pack<BN>(s, pa);
            fh_rescale<D>(acc, corr);
            mbar_wait(FH_VFULL(stage), phase);
            fh_issue_pv<D, BN>(acc, pa, FH_V(stage));
            wg_commit();
            wg_wait0();
#pragma unroll
            for (int j = 0; j < D / 2; ++j) fence_operand(acc[j]);
            if (lane == 0) mbar_arrive(FH_EMPTY(stage));  // this warp is done with the stage
            if (++stage == STAGES) {
                stage = 0;
                phase ^= 1u;
            }
        }
    } else if (ntiles > 0) {
        // Tile 0's scores and softmax, then per tile i >= 1: issue S_i and P_{i-1} V_{i-1},
        // wait for S_i only, its softmax while P_{i-1} V_{i-1} runs, then wait for that, release
        // stage i - 1, rescale the output; P_{last} V_{last} at the end.
        mbar_wait(FH_KFULL(0), 0u);
        fh_issue_scores<D, BN>(s, sqa, FH_K(0));
        wg_commit();
        wg_wait0();
#pragma unroll
        for (int j = 0; j < BN / 2; ++j) fence_operand(s[j]);
        fh_softmax<BN>(s, m, l, corr, 0, tk32, causal32, warp_row, row0, off32, t, sl2);
        fh_pack<BN>(s, pa);
        int prev = 0, stage = 0;
        unsigned int prev_phase = 0, phase = 0;
        for (int i = 1; i < ntiles; ++i) {
            if (++stage == STAGES) {
                stage = 0;
                phase ^= 1u;
            }
            mbar_wait(FH_KFULL(stage), phase);
            fh_issue_scores<D, BN>(s, sqa, FH_K(stage));
            wg_commit();
            mbar_wait(FH_VFULL(prev), prev_phase);
            fh_issue_pv<D, BN>(acc, pa, FH_V(prev));
            wg_commit();
            wg_wait1();  // S_i is ready; P_{i-1} V_{i-1} may still run
#pragma unroll
            for (int j = 0; j < BN / 2; ++j) fence_operand(s[j]);
            fh_softmax<BN>(s, m, l, corr, i * BN, tk32, causal32, warp_row, row0, off32, t, sl2);
            wg_wait0();  // P_{i-1} V_{i-1} done: pa, the output and stage i - 1 are free
#pragma unroll
            for (int j = 0; j < D / 2; ++j) fence_operand(acc[j]);
            if (lane == 0) mbar_arrive(FH_EMPTY(prev));
            fh_rescale<D>(acc, corr);
            fh_pack<BN>(s, pa);
            prev = stage;
            prev_phase = phase;
        }
        mbar_wait(FH_VFULL(prev), prev_phase);
        fh_issue_pv<D, BN>(acc, pa, FH_V(prev));
        wg_commit();
        wg_wait0();
#pragma unroll
        for (int j = 0; j < D / 2; ++j) fence_operand(acc[j]);
        if (lane == 0) mbar_arrive(FH_EMPTY(prev));
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
#undef FH_K
#undef FH_V
#endif
}

// Launch: grid (ceil(Tq / 128), Hq, B), 384 threads, dynamic shared memory
// 256 + 1024 + 2 D (128 + 2 stages BN) bytes, K/V boxes of BN rows (stages: 2 for _wg_, 3 for
// _wgo_; BN: 128, except 64 for _wgo_d128; src/backend/cuda/flash.rs).
#define FLASH_FWD_WG(NAME, D, BN, OVERLAP)                                                                       \
    extern "C" __global__ void __launch_bounds__(384, 1)                                                     \
        NAME(const __grid_constant__ TmaMap map_q, const __grid_constant__ TmaMap map_k,                     \
             const __grid_constant__ TmaMap map_v, bf16_t* o, float* lse, i64 hq, i64 hkv, i64 tq, i64 tk,   \
             float scale, i64 causal) {                                                                      \
        flash_fwd_wg<D, BN, OVERLAP>((unsigned long long)&map_q, (unsigned long long)&map_k,                     \
                                 (unsigned long long)&map_v, o, lse, hq, hkv, tq, tk, scale, causal);        \
    }
FLASH_FWD_WG(flash_fwd_wg_d64, 64, 128, false)
FLASH_FWD_WG(flash_fwd_wg_d128, 128, 128, false)
FLASH_FWD_WG(flash_fwd_wgo_d64, 64, 128, true)
FLASH_FWD_WG(flash_fwd_wgo_d128, 128, 64, true)  // 64-key tiles: two score tiles fit in registers
