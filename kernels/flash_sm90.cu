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
// row that sees no key gets o = 0 and lse = -inf. D is 64 or 128; head dim 80 runs as D = 128
// with DE = 80 (the _d80 kernels: tensor maps 80 wide, so the boxes' columns past 80 read zeros).
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

template <int N>
__device__ __forceinline__ void fh_zero(float* s) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
        s[j] = 0.f;
        fence_operand(s[j]);
    }
}

// Issues S += A Bᵀ for one 64-row slice (A rows of D at sa in chunks of `a_chunk` bytes, B the
// BN-row tile at sb), without a fence: the caller zeroes S and fences first, then commits.
// DE <= D: the head dim's real width (80 in chunks laid out for 128, whose columns past 80 the
// TMA loads filled with zeros): the 16-wide steps past DE would add zeros and are skipped.
template <int D, int BN, int DE = D>
__device__ __forceinline__ void fh_issue_ab(float* s, unsigned int sa, unsigned int a_chunk, unsigned int sb) {
    static_assert(DE <= D && DE % 16 == 0, "the real head dim in 16-wide steps within D");
#pragma unroll
    for (int kk = 0; kk < DE / 16; ++kk) {
        const unsigned int ch = (unsigned int)(kk >> 2), in = (unsigned int)(kk & 3) * 32u;
        wgmma_bn<BN, 0, 0>(s, wg_desc(sa + ch * a_chunk + in), wg_desc(sb + ch * (BN * 128) + in));
    }
}

// Issues S = Q Kᵀ (64 rows x BN keys of this warpgroup, accumulators zeroed first) after a
// wgmma fence; the caller commits. sqa: this warpgroup's rows of Q; sk: the K tile.
template <int D, int BN, int DE = D>
__device__ __forceinline__ void fh_issue_scores(float* s, unsigned int sqa, unsigned int sk) {
    fh_zero<BN / 2>(s);
    wg_fence();
    fh_issue_ab<D, BN, DE>(s, sqa, FH_BM * 128, sk);
}

// Issues O += P V (P from the registers pa, V the tile at sv read MN-major) after a wgmma
// fence; the caller commits.
template <int D, int BN>
__device__ __forceinline__ void fh_issue_pv(float* acc, unsigned int (*pa)[4], unsigned int sv) {
#pragma unroll
    for (int j = 0; j < D / 2; ++j) fence_operand(acc[j]);
    // P's registers too (as CUTLASS fences a register A operand): written before the fence.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) fence_operand(pa[kk][r]);
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

// The forward's and the dQ kernel's barriers (the first 256 bytes of dynamic shared memory,
// `bars`): Q full (once), then per stage K full and V full (the producer's TMA bytes) and empty
// (one arrival per consumer warp); the soft waits' fault word at 252. K and V of stage s at
// FH_K(s), FH_V(s) from `skv` (tiles of KV_BYTES). Used inside functions that define `bars`,
// `skv`, `STAGES` and `KV_BYTES`.
#define FH_QFULL (bars)
#define FH_KFULL(s) (bars + 8u + 8u * (unsigned int)(s))
#define FH_VFULL(s) (bars + 8u + 8u * (unsigned int)(STAGES + (s)))
#define FH_EMPTY(s) (bars + 8u + 8u * (unsigned int)(2 * STAGES + (s)))
#define FH_FAULT (bars + 252u)   // the soft waits' fault word (hopper.cuh)
#define FH_TURN(c) (1 + (c))     // named barriers of the pingpong schedule
#define FH_K(s) (skv + (unsigned int)(s) * 2u * KV_BYTES)
#define FH_V(s) (FH_K(s) + KV_BYTES)

// Block setup shared by the forward and the dQ kernel: thread 0 initialises the barriers, then
// the whole block synchronises.
template <int STAGES>
__device__ __forceinline__ void fh_init_barriers(unsigned int bars) {
    if (threadIdx.x == 0) {
        mbar_init(FH_QFULL, 1);
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(FH_KFULL(s), 1);
            mbar_init(FH_VFULL(s), 1);
            mbar_init(FH_EMPTY(s), FH_CONSUMER_WARPS);
        }
        mbar_init_done(FH_FAULT);
    }
    __syncthreads();
}

// Key tiles of BN keys that a block of FH_BM queries from q0 sees: all of Tk, or (causal) up to
// one past the key its last query sees (query i sees keys <= i + Tk - Tq).
template <int BN>
__device__ __forceinline__ int fh_key_tiles(i64 q0, i64 tq, i64 tk, i64 causal) {
    i64 kend = tk;
    if (causal) {
        const i64 last = q0 + FH_BM + tk - tq;
        kend = last < kend ? last : kend;
    }
    return kend > 0 ? (int)((kend + BN - 1) / BN) : 0;
}

// The producer thread's K/V stream of the forward and the dQ kernel: tiles 0 .. ntiles - 1 of kv
// head bh_kv into the STAGES stages, each once the consumers freed it (the first lap at once).
template <int D, int BN, int STAGES>
__device__ __forceinline__ void fh_produce_kv(unsigned int bars, unsigned int skv, unsigned long long map_k,
                                              unsigned long long map_v, int ntiles, int bh_kv) {
    constexpr int DC = D / 64;
    constexpr unsigned int KV_CHUNK = BN * 128, KV_BYTES = DC * KV_CHUNK;
    int stage = 0;
    unsigned int phase = 0;
    for (int i = 0; i < ntiles; ++i) {
        const int k0 = i * BN;
        mbar_wait(FH_EMPTY(stage), phase ^ 1u);
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

// DE: the real head dim (o's row stride and stored columns; the scores' steps), D the chunks'
// (DE = 80 runs in D = 128's layout: the TMA boxes past column 80 are zero-filled).
template <int D, int BN, bool OVERLAP, bool PINGPONG, int DE = D>
__device__ __forceinline__ void flash_fwd_wg(unsigned long long map_q, unsigned long long map_k,
                                             unsigned long long map_v, bf16_t* __restrict__ o,
                                             float* __restrict__ lse, i64 hq, i64 hkv, i64 tq, i64 tk, float scale,
                                             i64 causal) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    static_assert(D == 64 || D == 128, "head dim 64 or 128");
    static_assert(DE <= D && DE % 16 == 0, "the real head dim in 16-wide steps within D");
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
    fh_init_barriers<STAGES>(bars);
    const int tid = threadIdx.x;

    // Causal blocks in reverse order: the longest (last) query tiles start first.
    const i64 qt = causal ? (i64)(gridDim.x - 1 - blockIdx.x) : (i64)blockIdx.x;
    const i64 b = blockIdx.z, h = blockIdx.y, q0 = qt * FH_BM;
    const int bh_q = (int)(b * hq + h), bh_kv = (int)(b * hkv + h / (hq / hkv));
    const i64 off = tk - tq;  // causal offset: row i sees keys <= i + off
    const int ntiles = fh_key_tiles<BN>(q0, tq, tk, causal);

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
            fh_produce_kv<D, BN, STAGES>(bars, skv, map_k, map_v, ntiles, bh_kv);
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
    mbar_wait_soft(FH_QFULL, 0u, FH_FAULT);
    if (!OVERLAP) {
        int stage = 0;
        unsigned int phase = 0;
        for (int i = 0; i < ntiles; ++i) {
            mbar_wait_soft(FH_KFULL(stage), phase, FH_FAULT);
            fh_issue_scores<D, BN, DE>(s, sqa, FH_K(stage));
            wg_commit();
            wg_wait0();
#pragma unroll
            for (int j = 0; j < BN / 2; ++j) fence_operand(s[j]);
            fh_softmax<BN>(s, m, l, corr, i * BN, tk32, causal32, warp_row, row0, off32, t, sl2);
            fh_pack<BN>(s, pa);
            fh_rescale<D>(acc, corr);
            mbar_wait_soft(FH_VFULL(stage), phase, FH_FAULT);
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
        // PINGPONG (FlashAttention-3's inter-warpgroup schedule): the two consumers take turns
        // to issue their products (named barriers FH_TURN(0) / (1): a consumer waits for its
        // turn, issues, hands the turn over), so one's softmax runs while the other's products
        // are on the tensor cores. Consumer 0 goes first; consumer 1's last hand-over has no
        // taker and is skipped, so every barrier phase completes.
        if (PINGPONG && ci == 1) named_bar_arrive(FH_TURN(0), 256);
        mbar_wait_soft(FH_KFULL(0), 0u, FH_FAULT);
        if (PINGPONG) named_bar_sync(FH_TURN(ci), 256);
        fh_issue_scores<D, BN, DE>(s, sqa, FH_K(0));
        if (PINGPONG) named_bar_arrive(FH_TURN(ci ^ 1), 256);
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
            mbar_wait_soft(FH_KFULL(stage), phase, FH_FAULT);
            mbar_wait_soft(FH_VFULL(prev), prev_phase, FH_FAULT);
            if (PINGPONG) named_bar_sync(FH_TURN(ci), 256);
            fh_issue_scores<D, BN, DE>(s, sqa, FH_K(stage));
            wg_commit();
            fh_issue_pv<D, BN>(acc, pa, FH_V(prev));
            wg_commit();
            if (PINGPONG) named_bar_arrive(FH_TURN(ci ^ 1), 256);
            wg_wait1();  // S_i is ready; P_{i-1} V_{i-1} may still run
#pragma unroll
            for (int j = 0; j < BN / 2; ++j) fence_operand(s[j]);
            fh_softmax<BN>(s, m, l, corr, i * BN, tk32, causal32, warp_row, row0, off32, t, sl2);
            // Without a block boundary here ptxas hoists the wait above the softmax (2 of its 68
            // max and none of its 66 exp2 were left between the waits): no overlap at all.
            block_boundary(tk32);
            wg_wait0();  // P_{i-1} V_{i-1} done: pa, the output and stage i - 1 are free
#pragma unroll
            for (int j = 0; j < D / 2; ++j) fence_operand(acc[j]);
            if (lane == 0) mbar_arrive(FH_EMPTY(prev));
            fh_rescale<D>(acc, corr);
            fh_pack<BN>(s, pa);
            prev = stage;
            prev_phase = phase;
        }
        mbar_wait_soft(FH_VFULL(prev), prev_phase, FH_FAULT);
        if (PINGPONG) named_bar_sync(FH_TURN(ci), 256);
        fh_issue_pv<D, BN>(acc, pa, FH_V(prev));
        if (PINGPONG && ci == 0) named_bar_arrive(FH_TURN(1), 256);
        wg_commit();
        wg_wait0();
#pragma unroll
        for (int j = 0; j < D / 2; ++j) fence_operand(acc[j]);
        if (lane == 0) mbar_arrive(FH_EMPTY(prev));
    }

    // Epilogue: the row sums across the quad, normalise, write o (bf16 pairs) and lse (NaN
    // everywhere if a wait gave up).
    const bool fault = mbar_faulted(FH_FAULT);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        if (fault) l[r] = __int_as_float(0x7fc00000);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const i64 row = row0 + 8 * r;
        if (row >= tq) continue;
        const float inv = l[r] > 0.f ? 1.f / l[r] : (fault ? l[r] : 0.f);
        bf16_t* orow = o + ((i64)bh_q * tq + row) * DE + 2 * t;
#pragma unroll
        for (int j = 0; j < DE / 8; ++j)
            *reinterpret_cast<unsigned int*>(orow + 8 * j) =
                pack_bf16_rn(acc[4 * j + 2 * r] * inv, acc[4 * j + 2 * r + 1] * inv);
        if (t == 0) lse[(i64)bh_q * tq + row] = l[r] > 0.f ? m[r] * scale + logf(l[r]) : (fault ? l[r] : NEG_INF);
    }
#endif
}

// Launch: grid (ceil(Tq / 128), Hq, B), 384 threads, dynamic shared memory
// 256 + 1024 + 2 D (128 + 2 stages BN) bytes, K/V boxes of BN = 128 rows (stages: 2 for _wg_,
// 3 for _wgo_: 225 KB at D 128; src/backend/cuda/flash.rs). The consumers' waits are soft
// (hopper.cuh) so ptxas compiles them to setmaxnreg's 240 registers: _wgo_d128 holds a 64 x 128
// score tile, the previous tile's packed P and the 64 x 128 output in 184.
#define FLASH_FWD_WG_DE(NAME, D, BN, OVERLAP, PINGPONG, DE)                                                  \
    extern "C" __global__ void __launch_bounds__(384, 1)                                                     \
        NAME(const __grid_constant__ TmaMap map_q, const __grid_constant__ TmaMap map_k,                     \
             const __grid_constant__ TmaMap map_v, bf16_t* o, float* lse, i64 hq, i64 hkv, i64 tq, i64 tk,   \
             float scale, i64 causal) {                                                                      \
        flash_fwd_wg<D, BN, OVERLAP, PINGPONG, DE>((unsigned long long)&map_q, (unsigned long long)&map_k,   \
                                 (unsigned long long)&map_v, o, lse, hq, hkv, tq, tk, scale, causal);        \
    }
#define FLASH_FWD_WG(NAME, D, BN, OVERLAP, PINGPONG) FLASH_FWD_WG_DE(NAME, D, BN, OVERLAP, PINGPONG, D)
FLASH_FWD_WG(flash_fwd_wg_d64, 64, 128, false, false)
FLASH_FWD_WG(flash_fwd_wg_d128, 128, 128, false, false)
FLASH_FWD_WG(flash_fwd_wgo_d64, 64, 128, true, false)
FLASH_FWD_WG(flash_fwd_wgo_d128, 128, 128, true, false)
FLASH_FWD_WG(flash_fwd_wgp_d64, 64, 128, true, true)
FLASH_FWD_WG(flash_fwd_wgp_d128, 128, 128, true, true)
// Head dim 80 (the vision tower's) in D 128's layout (TESSERA_FLASH_WG_D80=1; not yet run on a
// GPU): the scores over 5 of the 8 16-wide steps, P V over all 128 columns (V's past 80 are
// zeros), o stored 80 wide.
FLASH_FWD_WG_DE(flash_fwd_wg_d80, 128, 128, false, false, 80)
FLASH_FWD_WG_DE(flash_fwd_wgo_d80, 128, 128, true, false, 80)
FLASH_FWD_WG_DE(flash_fwd_wgp_d80, 128, 128, true, true, 80)

// ---------------------------------------------------------------------------------------------
// Hopper flash attention backward, dK and dV (sm_90a): the FlashAttention-2 scheme of
// flash_bwd_dkdv in kernels/flash.cu (P = exp(S scale - lse), dS = P o (dP - delta), dV = Pᵀ dO,
// dK = scale dSᵀ Q) on FlashAttention-3's data path. A block owns 128 keys of one kv head (K and
// V resident, one TMA load), a producer warpgroup streams 64-query tiles of Q, dO, lse and delta
// through STAGES buffers, and each of two consumer warpgroups owns 64 of the keys:
//   Sᵀ = K Qᵀ and dPᵀ = V dOᵀ: wgmma from shared memory (A = the warpgroup's K / V rows, B = the
//   Q / dO tile, both K-major: rows of D), m64n64k16, D / 16 steps;
//   Pᵀ, dSᵀ in registers (lse / delta of the tile's 64 queries from shared memory);
//   dV += Pᵀ dO and dK += dSᵀ Q: wgmma with A from registers (the accumulators packed as in the
//   forward's P V) and B = the dO / Q tile read MN-major (16-query steps 2048 bytes apart, D
//   chunks 8192 apart).
// dK and dV stay in registers over the whole query loop (2 x D/2 floats per thread, beside the
// 2 x 32 of Sᵀ and dPᵀ: 240 registers through setmaxnreg, which is why every consumer wait is
// soft). dQ comes from flash_bwd_dq_wg below.
// GQA: a block sums the group's query heads over one flat (head, query tile) sequence; with
// SPLIT it takes one query head (grid.y = Hq: more blocks when B Hkv Tk / 128 would not fill the
// GPU) and writes f32 partials dk_part / dv_part [B, Hq, Tk, D] that flash_dkdv_group_sum adds.
// Operands: 3-d tensor maps over [B·H, T, D] bf16 (boxes 64 x 64 rows for Q / dO, 64 x 128 for
// K / V, 128-byte swizzle), 1-d maps over lse and delta [B·Hq, lstride] f32 (boxes of 64, no
// swizzle; a tile's queries past Tq read padding, the next head's values or zeros and are
// masked). lstride is Tq rounded up to 64 (the launcher pads), so every box starts 256-byte
// aligned: a box starting off a 16-byte boundary (lstride = Tq = 37, head 1) stopped the kernel
// with an illegal instruction on an H200 (run 12, docs/gpu-runs.md). TESSERA_FLASH_BWD_PAD=0
// keeps lstride = Tq, for diagnosis.
// TESSERA_ARCH_SUFFIX_A

#define FB_BK 128  // keys per block: two consumer warpgroups of 64
#define FB_BQ 64   // queries per streamed tile

template <int D, int STAGES, bool SPLIT, int DE = D>
__device__ __forceinline__ void flash_bwd_dkdv_wg(unsigned long long map_q, unsigned long long map_k,
                                                  unsigned long long map_v, unsigned long long map_g,
                                                  unsigned long long map_lse, unsigned long long map_delta,
                                                  void* __restrict__ dk_out, void* __restrict__ dv_out, i64 hq,
                                                  i64 hkv, i64 tq, i64 tk, float scale, i64 causal, i64 lstride) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    static_assert(D == 64 || D == 128, "head dim 64 or 128");
    static_assert(DE <= D && DE % 16 == 0, "the real head dim in 16-wide steps within D");
    constexpr int DC = D / 64;
    constexpr unsigned int KV_CHUNK = FB_BK * 128, KV_BYTES = DC * KV_CHUNK;
    constexpr unsigned int Q_CHUNK = FB_BQ * 128, Q_BYTES = DC * Q_CHUNK;
    // A stage: Q, dO, then lse and delta (64 floats each), padded to the 1024-byte swizzle period.
    constexpr unsigned int STAGE_BYTES = (2 * Q_BYTES + 512 + 1023) & ~1023u;
    static_assert(2 * STAGES * 8 + 8 <= 252, "barriers fit before the fault word");
    extern __shared__ __align__(1024) unsigned char fb_wg_smem[];
    const unsigned int bars = smem_addr(fb_wg_smem);
    const unsigned int sk = (bars + 256u + 1023u) & ~1023u, sv = sk + KV_BYTES, sst = sv + KV_BYTES;
#define FB_KVFULL (bars)
#define FB_FULL(s) (bars + 8u + 8u * (unsigned int)(s))
#define FB_EMPTY(s) (bars + 8u + 8u * (unsigned int)(STAGES + (s)))
#define FB_FAULT (bars + 252u)
#define FB_Q(s) (sst + (unsigned int)(s) * STAGE_BYTES)
#define FB_G(s) (FB_Q(s) + Q_BYTES)
#define FB_L(s) (FB_Q(s) + 2 * Q_BYTES)

    const int tid = threadIdx.x;
    if (tid == 0) {
        mbar_init(FB_KVFULL, 1);
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(FB_FULL(s), 1);
            mbar_init(FB_EMPTY(s), FH_CONSUMER_WARPS);
        }
        mbar_init_done(FB_FAULT);
    }
    __syncthreads();

    const i64 b = blockIdx.z, k0 = (i64)blockIdx.x * FB_BK, group = hq / hkv;
    const i64 hk = SPLIT ? (i64)blockIdx.y / group : (i64)blockIdx.y;
    const i64 g0 = SPLIT ? (i64)blockIdx.y % group : 0, g1 = SPLIT ? g0 + 1 : group;  // query heads hk·group + [g0, g1)
    const i64 off = tk - tq;  // causal: query i sees keys <= i + off
    i64 qstart = 0;
    if (causal) {
        const i64 first = k0 - off;  // the first query that sees key k0
        qstart = first > 0 ? (first / FB_BQ) * FB_BQ : 0;
    }
    const int nq = tq > qstart ? (int)((tq - qstart + FB_BQ - 1) / FB_BQ) : 0;
    const int n = (int)(g1 - g0) * nq;  // (head, query tile) pairs, head-major

    const int wg = __shfl_sync(0xffffffffu, tid >> 7, 0);
    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        if (tid == 0) {
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(map_q) : "memory");
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(map_g) : "memory");
            const int bh_kv = (int)(b * hkv + hk);
            mbar_arrive_expect_tx(FB_KVFULL, 2 * KV_BYTES);
#pragma unroll
            for (int c = 0; c < DC; ++c) {
                tma_load_3d(sk + c * KV_CHUNK, map_k, FB_KVFULL, 64 * c, (int)k0, bh_kv);
                tma_load_3d(sv + c * KV_CHUNK, map_v, FB_KVFULL, 64 * c, (int)k0, bh_kv);
            }
            int stage = 0;
            unsigned int phase = 0;
            for (int i = 0; i < n; ++i) {
                const int bh = (int)(b * hq + hk * group + g0 + i / nq);
                const int q0 = (int)qstart + (i % nq) * FB_BQ;
                mbar_wait(FB_EMPTY(stage), phase ^ 1u);
                mbar_arrive_expect_tx(FB_FULL(stage), 2 * Q_BYTES + 512);
#pragma unroll
                for (int c = 0; c < DC; ++c) {
                    tma_load_3d(FB_Q(stage) + c * Q_CHUNK, map_q, FB_FULL(stage), 64 * c, q0, bh);
                    tma_load_3d(FB_G(stage) + c * Q_CHUNK, map_g, FB_FULL(stage), 64 * c, q0, bh);
                }
                const int row = bh * (int)lstride + q0;
                tma_load_1d(FB_L(stage), map_lse, FB_FULL(stage), row);
                tma_load_1d(FB_L(stage) + 256u, map_delta, FB_FULL(stage), row);
                if (++stage == STAGES) {
                    stage = 0;
                    phase ^= 1u;
                }
            }
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
    const int ci = wg - 1;  // consumer: keys k0 + 64 ci .. + 63
    const int warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
    // This thread's keys: key0 and key0 + 8 (accumulator element e: row + 8 (e >> 1), column
    // 8 j + 2 t + (e & 1) of n-block j). Positions fit in 32 bits (the launcher checks).
    const int key0 = (int)k0 + ci * 64 + warp * 16 + g;
    const int tk32 = (int)tk, tq32 = (int)tq, off32 = (int)off, causal32 = (int)causal;
    const float sl2 = scale * LOG2E_F;
    float dv[D / 2], dk[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dv[i] = dk[i] = 0.f;
    const unsigned int ska = sk + (unsigned int)ci * (64 * 128), sva = sv + (unsigned int)ci * (64 * 128);
    mbar_wait_soft(FB_KVFULL, 0u, FB_FAULT);
    int stage = 0;
    unsigned int phase = 0;
    for (int i = 0; i < n; ++i) {
        const int q0 = (int)qstart + (i % nq) * FB_BQ;
        mbar_wait_soft(FB_FULL(stage), phase, FB_FAULT);
        // Sᵀ and dPᵀ, a group each: Pᵀ's exponentials run while dPᵀ is on the tensor cores.
        float st[32], dp[32];
#pragma unroll
        for (int j = 0; j < 32; ++j) {
            st[j] = dp[j] = 0.f;
            fence_operand(st[j]);
            fence_operand(dp[j]);
        }
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < DE / 16; ++kk) {
            const unsigned int ch = (unsigned int)(kk >> 2), in = (unsigned int)(kk & 3) * 32u;
            wgmma_n64<0, 0>(st, wg_desc(ska + ch * KV_CHUNK + in), wg_desc(FB_Q(stage) + ch * Q_CHUNK + in));
        }
        wg_commit();
#pragma unroll
        for (int kk = 0; kk < DE / 16; ++kk) {
            const unsigned int ch = (unsigned int)(kk >> 2), in = (unsigned int)(kk & 3) * 32u;
            wgmma_n64<0, 0>(dp, wg_desc(sva + ch * KV_CHUNK + in), wg_desc(FB_G(stage) + ch * Q_CHUNK + in));
        }
        wg_commit();
        wg_wait1();  // Sᵀ ready; dPᵀ may still run
#pragma unroll
        for (int j = 0; j < 32; ++j) fence_operand(st[j]);
        // Pᵀ = exp2(Sᵀ sl2 - lse log2 e) (0 for a query that saw no key: lse = -inf), masked on
        // edge tiles (one branch around the whole mask).
        const float* sl = reinterpret_cast<const float*>(fb_wg_smem + (FB_L(stage) - bars));
        const bool edge = q0 + FB_BQ > tq32 || (int)k0 + FB_BK > tk32 || (causal32 && (int)k0 + FB_BK - 1 > q0 + off32);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float2 l = *reinterpret_cast<const float2*>(sl + 8 * j + 2 * t);
            const float lx = l.x == NEG_INF ? POS_INF : l.x * LOG2E_F;
            const float ly = l.y == NEG_INF ? POS_INF : l.y * LOG2E_F;
#pragma unroll
            for (int e = 0; e < 4; ++e) st[4 * j + e] = fast_exp2(fmaf(st[4 * j + e], sl2, -((e & 1) ? ly : lx)));
        }
        if (edge) {
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = key0 + 8 * (e >> 1), qi = q0 + 8 * j + 2 * t + (e & 1);
                    if (key >= tk32 || qi >= tq32 || (causal32 && key > qi + off32)) st[4 * j + e] = 0.f;
                }
        }
        unsigned int pa[4][4], pd[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) fa_acc_to_a(pa[kk], &st[8 * kk], &st[8 * kk + 4]);
        // dV += Pᵀ dO, its own group: dSᵀ is computed while it runs.
        fh_issue_pv<D, FB_BQ>(dv, pa, FB_G(stage));
        wg_commit();
        block_boundary(tk32);
        wg_wait1();  // dPᵀ ready; dV += Pᵀ dO may still run
#pragma unroll
        for (int j = 0; j < 32; ++j) fence_operand(dp[j]);
        // dSᵀ = Pᵀ o (dPᵀ - delta) in place of dPᵀ.
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float2 dd = *reinterpret_cast<const float2*>(sl + 64 + 8 * j + 2 * t);
#pragma unroll
            for (int e = 0; e < 4; ++e) dp[4 * j + e] = st[4 * j + e] * (dp[4 * j + e] - ((e & 1) ? dd.y : dd.x));
        }
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) fa_acc_to_a(pd[kk], &dp[8 * kk], &dp[8 * kk + 4]);
        fh_issue_pv<D, FB_BQ>(dk, pd, FB_Q(stage));
        wg_commit();
        wg_wait0();
#pragma unroll
        for (int j = 0; j < D / 2; ++j) {
            fence_operand(dv[j]);
            fence_operand(dk[j]);
        }
        if (lane == 0) mbar_arrive(FB_EMPTY(stage));
        if (++stage == STAGES) {
            stage = 0;
            phase ^= 1u;
        }
    }

    // Epilogue: rows key0, key0 + 8; NaN everywhere if a wait gave up.
    const bool fault = mbar_faulted(FB_FAULT);
    const float nan = __int_as_float(0x7fc00000);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const i64 key = key0 + 8 * r;
        if (key >= tk) continue;
        const i64 row = ((SPLIT ? b * hq + (i64)blockIdx.y : b * hkv + hk) * tk + key) * DE + 2 * t;
#pragma unroll
        for (int j = 0; j < DE / 8; ++j) {
            float k_0 = dk[4 * j + 2 * r] * scale, k_1 = dk[4 * j + 2 * r + 1] * scale;
            float v_0 = dv[4 * j + 2 * r], v_1 = dv[4 * j + 2 * r + 1];
            if (fault) k_0 = k_1 = v_0 = v_1 = nan;
            if (SPLIT) {
                *reinterpret_cast<float2*>(static_cast<float*>(dk_out) + row + 8 * j) = make_float2(k_0, k_1);
                *reinterpret_cast<float2*>(static_cast<float*>(dv_out) + row + 8 * j) = make_float2(v_0, v_1);
            } else {
                *reinterpret_cast<unsigned int*>(static_cast<bf16_t*>(dk_out) + row + 8 * j) = pack_bf16_rn(k_0, k_1);
                *reinterpret_cast<unsigned int*>(static_cast<bf16_t*>(dv_out) + row + 8 * j) = pack_bf16_rn(v_0, v_1);
            }
        }
    }
#undef FB_KVFULL
#undef FB_FULL
#undef FB_EMPTY
#undef FB_FAULT
#undef FB_Q
#undef FB_G
#undef FB_L
#endif
}

// Launch: grid (ceil(Tk / 128), Hkv (Hq with _split), B), 384 threads, dynamic shared memory
// 256 + 1024 + 2 · 128 · D · 2 + STAGES (2, or 3 for _s3_) · roundup1024(2 · 64 · D · 2 + 512) bytes
// (src/backend/cuda/flash.rs). dk / dv: bf16 [B, Hkv, Tk, D]; with _split f32 [B, Hq, Tk, D].
#define FLASH_BWD_WG(NAME, D, STAGES, SPLIT) FLASH_BWD_WG_DE(NAME, D, STAGES, SPLIT, D)
#define FLASH_BWD_WG_DE(NAME, D, STAGES, SPLIT, DE)                                                             \
    extern "C" __global__ void __launch_bounds__(384, 1)                                                         \
        NAME(const __grid_constant__ TmaMap map_q, const __grid_constant__ TmaMap map_k,                         \
             const __grid_constant__ TmaMap map_v, const __grid_constant__ TmaMap map_g,                         \
             const __grid_constant__ TmaMap map_lse, const __grid_constant__ TmaMap map_delta, void* dk, void* dv, \
             i64 hq, i64 hkv, i64 tq, i64 tk, float scale, i64 causal, i64 lstride) {                            \
        flash_bwd_dkdv_wg<D, STAGES, SPLIT, DE>((unsigned long long)&map_q, (unsigned long long)&map_k,                 \
                                       (unsigned long long)&map_v, (unsigned long long)&map_g,                      \
                                       (unsigned long long)&map_lse, (unsigned long long)&map_delta, dk, dv, hq,    \
                                       hkv, tq, tk, scale, causal, lstride);                                     \
    }
FLASH_BWD_WG(flash_bwd_dkdv_wg_d64, 64, 2, false)
FLASH_BWD_WG(flash_bwd_dkdv_wg_d128, 128, 2, false)
FLASH_BWD_WG(flash_bwd_dkdv_wg_split_d64, 64, 2, true)
FLASH_BWD_WG(flash_bwd_dkdv_wg_split_d128, 128, 2, true)
// 3 stages of the Q/dO/lse/delta stream (TESSERA_FLASH_WG_BWD_STAGES=3; 168 KB at D 128).
FLASH_BWD_WG(flash_bwd_dkdv_wg_s3_d64, 64, 3, false)
FLASH_BWD_WG(flash_bwd_dkdv_wg_s3_d128, 128, 3, false)
FLASH_BWD_WG(flash_bwd_dkdv_wg_split_s3_d64, 64, 3, true)
FLASH_BWD_WG(flash_bwd_dkdv_wg_split_s3_d128, 128, 3, true)
// Head dim 80 in D 128's layout (TESSERA_FLASH_WG_D80=1; as the forward's d80 kernels).
FLASH_BWD_WG_DE(flash_bwd_dkdv_wg_d80, 128, 2, false, 80)
FLASH_BWD_WG_DE(flash_bwd_dkdv_wg_split_d80, 128, 2, true, 80)
FLASH_BWD_WG_DE(flash_bwd_dkdv_wg_s3_d80, 128, 3, false, 80)
FLASH_BWD_WG_DE(flash_bwd_dkdv_wg_split_s3_d80, 128, 3, true, 80)

// ---------------------------------------------------------------------------------------------
// Hopper flash attention backward, dQ (sm_90a): flash_bwd_dq of kernels/flash.cu (dQ = scale
// dS K, S and dP recomputed per key tile) on the forward's data path. A block owns 128 queries
// of one head (Q and dO resident, one TMA load; lse and delta of the thread's two rows read
// once), a producer warpgroup streams BN-key tiles of K and V through 2 stages, and each of two
// consumer warpgroups owns 64 of the queries:
//   S = Q Kᵀ and dP = dO Vᵀ: wgmma from shared memory (fh_issue_scores), one group;
//   dS = P o (dP - delta) in registers, P = exp2(S scale log2 e - lse log2 e), masked on edge tiles;
//   dQ += dS K: wgmma with A = dS from registers, B = the K tile read MN-major (fh_issue_pv).
// Deterministic (no atomics), like the mma.sync kernel it replaces.

template <int D, int BN, int DE = D>
__device__ __forceinline__ void flash_bwd_dq_wg(unsigned long long map_q, unsigned long long map_k,
                                                unsigned long long map_v, unsigned long long map_g,
                                                const float* __restrict__ lse, const float* __restrict__ delta,
                                                bf16_t* __restrict__ dq, i64 hq, i64 hkv, i64 tq, i64 tk, float scale,
                                                i64 causal) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    static_assert(D == 64 || D == 128, "head dim 64 or 128");
    static_assert(DE <= D && DE % 16 == 0, "the real head dim in 16-wide steps within D");
    constexpr int STAGES = 2;
    constexpr int DC = D / 64;
    constexpr unsigned int Q_CHUNK = FH_BM * 128, Q_BYTES = DC * Q_CHUNK;
    constexpr unsigned int KV_CHUNK = BN * 128, KV_BYTES = DC * KV_CHUNK;
    extern __shared__ __align__(1024) unsigned char fq_smem[];
    const unsigned int bars = smem_addr(fq_smem);
    const unsigned int sq = (bars + 256u + 1023u) & ~1023u, sg = sq + Q_BYTES, skv = sg + Q_BYTES;
    fh_init_barriers<STAGES>(bars);
    const int tid = threadIdx.x;

    // Causal blocks in reverse order: the longest (last) query tiles start first.
    const i64 qt = causal ? (i64)(gridDim.x - 1 - blockIdx.x) : (i64)blockIdx.x;
    const i64 b = blockIdx.z, h = blockIdx.y, q0 = qt * FH_BM;
    const int bh_q = (int)(b * hq + h), bh_kv = (int)(b * hkv + h / (hq / hkv));
    const i64 off = tk - tq;
    const int ntiles = fh_key_tiles<BN>(q0, tq, tk, causal);

    const int wg = __shfl_sync(0xffffffffu, tid >> 7, 0);
    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        if (tid == 0) {
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(map_k) : "memory");
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(map_v) : "memory");
            mbar_arrive_expect_tx(FH_QFULL, 2 * Q_BYTES);
#pragma unroll
            for (int c = 0; c < DC; ++c) {
                tma_load_3d(sq + c * Q_CHUNK, map_q, FH_QFULL, 64 * c, (int)q0, bh_q);
                tma_load_3d(sg + c * Q_CHUNK, map_g, FH_QFULL, 64 * c, (int)q0, bh_q);
            }
            fh_produce_kv<D, BN, STAGES>(bars, skv, map_k, map_v, ntiles, bh_kv);
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
    const int ci = wg - 1;
    const int warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int warp_row = (int)q0 + ci * 64 + warp * 16;
    const int row0 = warp_row + g;  // this thread's rows: row0, row0 + 8
    const int off32 = (int)off, tk32 = (int)tk, causal32 = (int)causal;
    const float sl2 = scale * LOG2E_F;
    // lse (log2 domain; +inf for a row that saw no key or lies past Tq: P = 0) and delta.
    float nl[2], dl[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const i64 row = row0 + 8 * r;
        const float l = row < tq ? lse[(i64)bh_q * tq + row] : NEG_INF;
        nl[r] = l == NEG_INF ? NEG_INF : -l * LOG2E_F;
        dl[r] = row < tq ? delta[(i64)bh_q * tq + row] : 0.f;
    }
    float acc[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc[i] = 0.f;
    const unsigned int sqa = sq + (unsigned int)ci * (64 * 128), sga = sg + (unsigned int)ci * (64 * 128);
    float s[BN / 2], dp[BN / 2];
    unsigned int pa[BN / 16][4];
    mbar_wait_soft(FH_QFULL, 0u, FH_FAULT);
    int stage = 0;
    unsigned int phase = 0;
    for (int i = 0; i < ntiles; ++i) {
        const int k0 = i * BN;
        mbar_wait_soft(FH_KFULL(stage), phase, FH_FAULT);
        mbar_wait_soft(FH_VFULL(stage), phase, FH_FAULT);
        // Both accumulators zeroed before the one fence: registers written between the two
        // products' wgmmas would make ptxas wait for the first (C7517). S and dP a group each:
        // P's exponentials run while dP is on the tensor cores.
        fh_zero<BN / 2>(s);
        fh_zero<BN / 2>(dp);
        wg_fence();
        fh_issue_ab<D, BN, DE>(s, sqa, FH_BM * 128, FH_K(stage));
        wg_commit();
        fh_issue_ab<D, BN, DE>(dp, sga, FH_BM * 128, FH_V(stage));
        wg_commit();
        wg_wait1();  // S ready; dP may still run
#pragma unroll
        for (int j = 0; j < BN / 2; ++j) fence_operand(s[j]);
        const bool edge = k0 + BN > tk32 || (causal32 && k0 + BN - 1 > warp_row + off32);
#pragma unroll
        for (int j = 0; j < BN / 2; ++j) {
            // nl = -inf (no key seen): exp2(-inf) = 0 whatever the score.
            const float p = fast_exp2(fmaf(s[j], sl2, nl[(j >> 1) & 1]));
            s[j] = nl[(j >> 1) & 1] == NEG_INF ? 0.f : p;
        }
        if (edge) {  // one branch around the whole mask
#pragma unroll
            for (int j = 0; j < BN / 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = k0 + 8 * j + 2 * t + (e & 1);
                    if (key >= tk32 || (causal32 && key > row0 + 8 * (e >> 1) + off32)) s[4 * j + e] = 0.f;
                }
        }
        block_boundary(tk32);
        wg_wait0();  // dP ready
#pragma unroll
        for (int j = 0; j < BN / 2; ++j) fence_operand(dp[j]);
#pragma unroll
        for (int j = 0; j < BN / 2; ++j) dp[j] = s[j] * (dp[j] - dl[(j >> 1) & 1]);
        fh_pack<BN>(dp, pa);
        fh_issue_pv<D, BN>(acc, pa, FH_K(stage));
        wg_commit();
        wg_wait0();
#pragma unroll
        for (int j = 0; j < D / 2; ++j) fence_operand(acc[j]);
        if (lane == 0) mbar_arrive(FH_EMPTY(stage));
        if (++stage == STAGES) {
            stage = 0;
            phase ^= 1u;
        }
    }

    const bool fault = mbar_faulted(FH_FAULT);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const i64 row = row0 + 8 * r;
        if (row >= tq) continue;
        bf16_t* out = dq + ((i64)bh_q * tq + row) * DE + 2 * t;
        const float sc = fault ? __int_as_float(0x7fc00000) : scale;
#pragma unroll
        for (int j = 0; j < DE / 8; ++j)
            *reinterpret_cast<unsigned int*>(out + 8 * j) =
                pack_bf16_rn(acc[4 * j + 2 * r] * sc, acc[4 * j + 2 * r + 1] * sc);
    }
#endif
}

// Launch: grid (ceil(Tq / 128), Hq, B), 384 threads, dynamic shared memory
// 256 + 1024 + 2 · 128 · D · 2 + 2 stages · 2 · BN · D · 2 bytes, K/V boxes of BN = 128 rows
// (src/backend/cuda/flash.rs). lse, delta: [B, Hq, Tq] f32; dq: bf16 [B, Hq, Tq, D].
#define FLASH_BWD_DQ_WG(NAME, D, BN) FLASH_BWD_DQ_WG_DE(NAME, D, BN, D)
#define FLASH_BWD_DQ_WG_DE(NAME, D, BN, DE)                                                                     \
    extern "C" __global__ void __launch_bounds__(384, 1)                                                         \
        NAME(const __grid_constant__ TmaMap map_q, const __grid_constant__ TmaMap map_k,                         \
             const __grid_constant__ TmaMap map_v, const __grid_constant__ TmaMap map_g, const float* lse,       \
             const float* delta, bf16_t* dq, i64 hq, i64 hkv, i64 tq, i64 tk, float scale, i64 causal) {         \
        flash_bwd_dq_wg<D, BN, DE>((unsigned long long)&map_q, (unsigned long long)&map_k, (unsigned long long)&map_v, \
                               (unsigned long long)&map_g, lse, delta, dq, hq, hkv, tq, tk, scale, causal);        \
    }
FLASH_BWD_DQ_WG(flash_bwd_dq_wg_d64, 64, 128)
FLASH_BWD_DQ_WG(flash_bwd_dq_wg_d128, 128, 128)
FLASH_BWD_DQ_WG_DE(flash_bwd_dq_wg_d80, 128, 128, 80)

// The GQA sum of _split's partials: out [B, Hkv, inner] bf16 = Σ over the group of part
// [B, Hkv · group, inner] f32 (inner = Tk · D, a multiple of 4). Grid-stride, 4 floats a thread.
extern "C" __global__ void flash_dkdv_group_sum(const float* __restrict__ part, bf16_t* __restrict__ out, i64 group,
                                                i64 inner, i64 total) {
    for (i64 i = 4 * ((i64)blockIdx.x * blockDim.x + threadIdx.x); i < total; i += 4 * (i64)gridDim.x * blockDim.x) {
        const i64 bk = i / inner, r = i - bk * inner;
        const float* src = part + bk * group * inner + r;
        float4 acc = *reinterpret_cast<const float4*>(src);
        for (i64 gi = 1; gi < group; ++gi) {
            const float4 x = *reinterpret_cast<const float4*>(src + gi * inner);
            acc.x += x.x;
            acc.y += x.y;
            acc.z += x.z;
            acc.w += x.w;
        }
        uint2 o;
        o.x = pack_bf16_rn(acc.x, acc.y);
        o.y = pack_bf16_rn(acc.z, acc.w);
        *reinterpret_cast<uint2*>(out + i) = o;
    }
}
