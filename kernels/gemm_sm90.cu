// Hopper GEMM (sm_90a): wgmma.mma_async m64n256k16 (bf16 in, f32 accumulate) reading both
// operands from shared memory through matrix descriptors, 128-byte-swizzled tiles filled by
// cp.async in a 3-stage pipeline. Same contract as gemm.cu:
//
//   C[b] (M x N, row stride ldc) = A[b] (M x K, lda) . B[b]^T (B stored N x K, ldb) (+ bias) (+ C)
//
// with K % 8 == 0, lda % 8 == 0, ldb % 8 == 0 and 16-byte aligned A, B. Block tile 128 x 256 x 64,
// 256 threads = 2 warpgroups of 64 rows each; 128 f32 accumulators per thread.
// TESSERA_ARCH_SUFFIX_A  (compile for sm_90a: wgmma needs the arch-specific feature set)

#define W_BM 128
#define W_BN 256
#define W_BK 64
#define W_STAGES 3
#define W_A_BYTES (W_BM * W_BK * 2)
#define W_B_BYTES (W_BN * W_BK * 2)
#define W_STAGE_BYTES (W_A_BYTES + W_B_BYTES)

// One k-tile into stage base `s` (shared-window address), swizzled: the 16-byte chunk c of
// row r goes to chunk c ^ (r & 7) of that row.
__device__ __forceinline__ void wg_load_tile(unsigned int s, const bf16_t* A, const bf16_t* B, i64 M, i64 N, i64 K,
                                             i64 lda, i64 ldb, i64 m0, i64 n0, i64 k0) {
    for (int c = threadIdx.x; c < (W_BM + W_BN) * 8; c += 256) {
        int row = c >> 3, ch = c & 7;
        i64 gk = k0 + ch * 8;
        const bf16_t* src;
        bool ok;
        unsigned int dst;
        if (row < W_BM) {
            i64 gm = m0 + row;
            ok = gm < M && gk < K;
            src = ok ? A + gm * lda + gk : A;
            dst = s + row * 128 + ((ch ^ (row & 7)) << 4);
        } else {
            int r = row - W_BM;
            i64 gn = n0 + r;
            ok = gn < N && gk < K;
            src = ok ? B + gn * ldb + gk : B;
            dst = s + W_A_BYTES + r * 128 + ((ch ^ (r & 7)) << 4);
        }
        int n = ok ? 16 : 0;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
    }
}

extern "C" __global__ void __launch_bounds__(256)
gemm_wgmma_bf16(const bf16_t* A, const bf16_t* B, bf16_t* C, const bf16_t* bias, i64 M, i64 N, i64 K, i64 lda,
                i64 ldb, i64 ldc, i64 batch_a, i64 batch_b, i64 batch_c, i64 flags) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ __align__(1024) unsigned char w_smem[];
    unsigned int base = (smem_addr(w_smem) + 1023u) & ~1023u;  // swizzle needs 1024-byte alignment

    A += (i64)blockIdx.z * batch_a;
    B += (i64)blockIdx.z * batch_b;
    C += (i64)blockIdx.z * batch_c;
    i64 m0 = (i64)blockIdx.y * W_BM, n0 = (i64)blockIdx.x * W_BN;
    int wg = threadIdx.x >> 7;  // warpgroup: rows 64·wg .. 64·wg + 63 of the tile

    float d[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) d[i] = 0.f;

    i64 ktiles = (K + W_BK - 1) / W_BK;
#pragma unroll
    for (int s = 0; s < W_STAGES - 1; ++s) {
        if (s < ktiles) wg_load_tile(base + s * W_STAGE_BYTES, A, B, M, N, K, lda, ldb, m0, n0, (i64)s * W_BK);
        cp_async_commit();
    }
    for (i64 kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<W_STAGES - 2>();
        fence_proxy_async();
        __syncthreads();
        i64 pre = kt + W_STAGES - 1;
        if (pre < ktiles)
            wg_load_tile(base + (unsigned int)(pre % W_STAGES) * W_STAGE_BYTES, A, B, M, N, K, lda, ldb, m0, n0,
                         pre * W_BK);
        cp_async_commit();

        unsigned int sa = base + (unsigned int)(kt % W_STAGES) * W_STAGE_BYTES + wg * 64 * 128;
        unsigned int sb = base + (unsigned int)(kt % W_STAGES) * W_STAGE_BYTES + W_A_BYTES;
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < W_BK / 16; ++kk) wgmma_256<0, 0>(d, wg_desc(sa + kk * 32), wg_desc(sb + kk * 32));
        wg_commit();
        wg_wait0();
    }
    cp_async_wait<0>();

    // Accumulator layout (per warp of the warpgroup, like mma m16n8): d[4j + r] is row
    // 16·warp + g + 8·(r >= 2), column 8j + 2t + (r & 1).
    int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            i64 row = m0 + wg * 64 + warp * 16 + g + ((r >> 1) << 3);
            i64 col = n0 + j * 8 + 2 * t + (r & 1);
            if (row >= M || col >= N) continue;
            float v = d[4 * j + r];
            if (flags & 1) v += bf2f(bias[col]);
            if (flags & 2) v += bf2f(C[row * ldc + col]);
            C[row * ldc + col] = f2bf(v);
        }
    }
#endif
}

// ---- Warp-specialised persistent variant (gemm_wgmma_ws_*) ----
//
// Same product, operands fetched by TMA (cp.async.bulk.tensor, 128-byte swizzle, zero fill
// outside the tensor) into a ring of STAGES shared-memory stages. 384 threads = 3 warpgroups:
// warpgroup 0 is the producer (one thread issues the copies, 40 registers), warpgroups 1 and 2
// are the consumers (232 registers), each owning 64 rows x BN columns of the 128 x BN block tile
// and keeping one wgmma group in flight. Stage s has two mbarriers: full[s] (1 arrival + the
// stage's bytes, completed by TMA) and empty[s] (one arrival per consumer warp, after the wgmmas
// that read the stage retired). The grid is persistent (one CTA per SM, tiles t = blockIdx.x,
// + gridDim.x, ...) so the producer loads the next tile while the consumers store this one.
// Tiles are ordered in groups of WS_GROUP_M M-blocks (M fastest within a group) so CTAs running
// together share B tiles in L2. The batch is folded into the tile index.
//
// Operands live in the tensor maps. K-major (TA / TB = 0): the host encodes A as [batch,] M x K
// and B as [batch,] N x K, box 64 (K) x 128 or BN rows. MN-major (TA / TB = 1, the operand's
// M or N dimension contiguous, as in the backward's W and Gᵀ, X): A as [batch,] K x M, B as
// [batch,] K x N, box 64 (M or N) x 64 (K), loaded 128 / 64 or BN / 64 times per stage (boxes
// wholly past M or N are skipped: those rows of the tile are never stored). flags: 1 = bias,
// 2 = accumulate into C, 4 = A's map has a batch dimension, 8 = B's map has a batch dimension
// (otherwise shared by every batch).

#define WS_BM 128
#define WS_BK 64
#define WS_A_BYTES (WS_BM * WS_BK * 2)
#define WS_RING_BYTES 196608  // stages x (128 + BN) x 64 bf16: 4 x 48 KB for BN = 256
#define WS_EPI_BYTES 16384    // per consumer warpgroup: the TMA-store epilogue's buffer (_ts kernels)
#define WS_GROUP_M 16
#define WS_CONSUMER_WARPS 8


// Tile t -> (batch, M-block, N-block): groups of WS_GROUP_M M-blocks, M fastest within a group.
__device__ __forceinline__ void ws_tile(int t, int m_blocks, int n_blocks, int& bz, int& mb, int& nb) {
    int per_batch = m_blocks * n_blocks;
    bz = t / per_batch;
    int r = t - bz * per_batch;
    int group_tiles = WS_GROUP_M * n_blocks;
    int group = r / group_tiles;
    int first_m = group * WS_GROUP_M;
    int rows = min(m_blocks - first_m, WS_GROUP_M);
    int q = r - group * group_tiles;
    mb = first_m + q % rows;
    nb = q / rows;
}

template <int BN, int STAGES, int TA, int TB, int TS>
__device__ __forceinline__ void ws_gemm(unsigned long long map_a, unsigned long long map_b, unsigned long long map_c,
                                        bf16_t* C,
                                        const bf16_t* bias, i64 M, i64 N, i64 K, i64 ldc, i64 batch, i64 batch_c,
                                        i64 flags) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr unsigned int STAGE_BYTES = WS_A_BYTES + BN * WS_BK * 2;
    static_assert(STAGES * STAGE_BYTES == WS_RING_BYTES, "ring size");
    static_assert(2 * STAGES * 8 <= 252, "barriers fit in the first 256 bytes, before the fault word");
    // Dynamic shared memory: 2·STAGES mbarriers, then the ring at the next 1024-byte boundary
    // (128-byte swizzle repeats every 1024 bytes; TMA and the wgmma descriptors agree on it
    // only from such a boundary). Host size: WS_RING_BYTES + 256 + 1024.
    extern __shared__ __align__(1024) unsigned char ws_smem[];
    const unsigned int bars = smem_addr(ws_smem);
    const unsigned int ring = (bars + 256u + 1023u) & ~1023u;
#define WS_FULL(s) (bars + 8u * (unsigned int)(s))
#define WS_EMPTY(s) (bars + 8u * (unsigned int)(STAGES + (s)))
#define WS_FAULT (bars + 252u)  // the soft waits' fault word (hopper.cuh)

    const int tid = threadIdx.x;
    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(WS_FULL(s), 1);
            mbar_init(WS_EMPTY(s), WS_CONSUMER_WARPS);
        }
        mbar_init_done(WS_FAULT);
    }
    __syncthreads();

    const int m_blocks = (int)((M + WS_BM - 1) / WS_BM), n_blocks = (int)((N + BN - 1) / BN);
    const int total = m_blocks * n_blocks * (int)batch;
    const int ktiles = (int)((K + WS_BK - 1) / WS_BK);
    const int wg = tid >> 7;

    if (wg == 0) {
        // Producer warpgroup: give registers to the consumers, one thread issues every copy.
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
        if (tid == 0) {
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(map_a) : "memory");
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(map_b) : "memory");
            const bool a3 = flags & 4, b3 = flags & 8;
            int stage = 0;
            unsigned int phase = 0;
            for (int t = blockIdx.x; t < total; t += gridDim.x) {
                int bz, mb, nb;
                ws_tile(t, m_blocks, n_blocks, bz, mb, nb);
                const int row_a = mb * WS_BM, row_b = nb * BN;
                // MN-major operands: the 64-wide boxes that hold at least one row of M / N.
                const int boxes_a = TA ? min(WS_BM / 64, (int)((M - row_a + 63) / 64)) : 1;
                const int boxes_b = TB ? min(BN / 64, (int)((N - row_b + 63) / 64)) : 1;
                const unsigned int bytes = (TA ? boxes_a * WG_MN_BOX_BYTES : WS_A_BYTES) +
                                           (TB ? boxes_b * WG_MN_BOX_BYTES : BN * WS_BK * 2);
                for (int kt = 0; kt < ktiles; ++kt) {
                    // Wait until the consumers freed the slot (passes at once on the first lap).
                    mbar_wait(WS_EMPTY(stage), phase ^ 1u);
                    const unsigned int sa = ring + (unsigned int)stage * STAGE_BYTES;
                    const unsigned int full = WS_FULL(stage);
                    mbar_arrive_expect_tx(full, bytes);
                    const int k0 = kt * WS_BK;
                    if (TA) {
                        for (int i = 0; i < boxes_a; ++i) {
                            if (a3) tma_load_3d(sa + i * WG_MN_BOX_BYTES, map_a, full, row_a + 64 * i, k0, bz);
                            else tma_load_2d(sa + i * WG_MN_BOX_BYTES, map_a, full, row_a + 64 * i, k0);
                        }
                    } else if (a3) {
                        tma_load_3d(sa, map_a, full, k0, row_a, bz);
                    } else {
                        tma_load_2d(sa, map_a, full, k0, row_a);
                    }
                    const unsigned int sb = sa + WS_A_BYTES;
                    if (TB) {
                        for (int i = 0; i < boxes_b; ++i) {
                            if (b3) tma_load_3d(sb + i * WG_MN_BOX_BYTES, map_b, full, row_b + 64 * i, k0, bz);
                            else tma_load_2d(sb + i * WG_MN_BOX_BYTES, map_b, full, row_b + 64 * i, k0);
                        }
                    } else if (b3) {
                        tma_load_3d(sb, map_b, full, k0, row_b, bz);
                    } else {
                        tma_load_2d(sb, map_b, full, k0, row_b);
                    }
                    if (++stage == STAGES) {
                        stage = 0;
                        phase ^= 1u;
                    }
                }
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
        const int ci = wg - 1;  // consumer: rows 64·ci .. 64·ci + 63 of the block tile
        const int warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, tq = lane & 3;
        const bool pairs = ((ldc | batch_c) & 1) == 0 && (((unsigned long long)C) & 3) == 0;
        int stage = 0;
        unsigned int phase = 0;
        float d[BN / 2];
        for (int t = blockIdx.x; t < total; t += gridDim.x) {
            int bz, mb, nb;
            ws_tile(t, m_blocks, n_blocks, bz, mb, nb);
#pragma unroll
            for (int i = 0; i < BN / 2; ++i) {
                d[i] = 0.f;
                fence_operand(d[i]);
            }
            int prev = 0;
            for (int kt = 0; kt < ktiles; ++kt) {
                mbar_wait_soft(WS_FULL(stage), phase, WS_FAULT);
                // This consumer's 64 rows of A: rows 64·ci.. (K-major) or the ci-th box (MN-major),
                // 8192 bytes into the stage either way.
                const unsigned int sa = ring + (unsigned int)stage * STAGE_BYTES + (unsigned int)ci * (64 * 128);
                const unsigned int sb = ring + (unsigned int)stage * STAGE_BYTES + WS_A_BYTES;
                wg_fence();
#pragma unroll
                for (int kk = 0; kk < WS_BK / 16; ++kk) {
                    const unsigned long long da = TA ? wg_desc_mn(sa + kk * 2048) : wg_desc(sa + kk * 32);
                    const unsigned long long db = TB ? wg_desc_mn(sb + kk * 2048) : wg_desc(sb + kk * 32);
                    wgmma_bn<BN, TA, TB>(d, da, db);
                }
                wg_commit();
                // The previous k-tile's group has retired: its stage can be refilled.
                wg_wait1();
                if (kt > 0 && lane == 0) mbar_arrive(WS_EMPTY(prev));
                prev = stage;
                if (++stage == STAGES) {
                    stage = 0;
                    phase ^= 1u;
                }
            }
            wg_wait0();
#pragma unroll
            for (int i = 0; i < BN / 2; ++i) fence_operand(d[i]);
            if (lane == 0) mbar_arrive(WS_EMPTY(prev));
            if (mbar_faulted(WS_FAULT)) {  // a wait gave up: NaN, not a silently wrong tile
#pragma unroll
                for (int i = 0; i < BN / 2; ++i) d[i] = __int_as_float(0x7fc00000);
            }
            if (flags & 16) continue;  // benchmark diagnostic: the mainloop without the stores

            if constexpr (TS != 0) {
                // TMA-store epilogue: this warpgroup's 64 x BN tile, 128 columns a round, into its
                // 16 KB buffer as two 64 x 64 boxes in the 128-byte-swizzled layout (row r's
                // 16-byte chunk c at r·128 + ((c ^ r % 8) · 16): conflict-free 4-byte stores), then
                // one thread hands them to the TMA engine, which clips the edges. The next round
                // (or tile) waits only until the engine has read the buffer.
                const unsigned int ebuf = ring + WS_RING_BYTES + (unsigned int)ci * WS_EPI_BYTES;
                const bool issuer = (tid & 127) == 0;
                constexpr int JR = (BN < 128 ? BN : 128) / 8;  // n-blocks of 8 columns per round
#pragma unroll
                for (int rnd = 0; rnd < (BN + 127) / 128; ++rnd) {
                    if (issuer) bulk_wait_read0();
                    named_bar_sync(1 + ci, 128);
#pragma unroll
                    for (int jj = 0; jj < JR; ++jj) {
                        const int j = rnd * 16 + jj;
                        const i64 col = (i64)nb * BN + 8 * j + 2 * tq;
                        float b0 = 0.f, b1 = 0.f;
                        if (flags & 1) {
                            if (col < N) b0 = bf2f(bias[col]);
                            if (col + 1 < N) b1 = bf2f(bias[col + 1]);
                        }
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            const unsigned int row = (unsigned int)(16 * warp + g + 8 * h);
                            const unsigned int at = ebuf + (unsigned int)(jj >> 3) * 8192u + row * 128u +
                                                    ((((unsigned int)jj & 7u) ^ (row & 7u)) << 4) + 4u * (unsigned int)tq;
                            st_shared_u32(at, ws_pack(d[4 * j + 2 * h] + b0, d[4 * j + 2 * h + 1] + b1));
                        }
                    }
                    fence_proxy_async();  // the generic-proxy writes, visible to the TMA engine
                    named_bar_sync(1 + ci, 128);
                    if (issuer) {
                        const int row = mb * WS_BM + ci * 64;
#pragma unroll
                        for (int box = 0; box < JR / 8; ++box) {
                            const int col = nb * BN + rnd * 128 + box * 64;
                            if (col >= N || row >= M) continue;
                            if (flags & 32) tma_store_3d(map_c, ebuf + box * 8192u, col, row, bz);
                            else tma_store_2d(map_c, ebuf + box * 8192u, col, row);
                        }
                        bulk_commit();
                    }
                }
                continue;
            }

            // Epilogue straight from registers. d[4j + r]: row 16·warp + g + 8·(r >= 2),
            // column 8j + 2·tq + (r & 1) of this consumer's 64 x BN tile.
            bf16_t* Cb = C + (i64)bz * batch_c;
            const i64 row0 = (i64)mb * WS_BM + ci * 64 + warp * 16 + g;
            const i64 col0 = (i64)nb * BN + 2 * tq;
            if (pairs && (i64)(mb + 1) * WS_BM <= M && (i64)(nb + 1) * BN <= N) {
                // Interior tile: no bounds checks, every column pair one 32-bit store.
                bf16_t* p0 = Cb + row0 * ldc + col0;
#pragma unroll
                for (int j = 0; j < BN / 8; ++j) {
                    float b0 = 0.f, b1 = 0.f;
                    if (flags & 1) {
                        b0 = bf2f(bias[col0 + 8 * j]);
                        b1 = bf2f(bias[col0 + 8 * j + 1]);
                    }
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        bf16_t* p = p0 + 8 * h * ldc + 8 * j;
                        float v0 = d[4 * j + 2 * h] + b0, v1 = d[4 * j + 2 * h + 1] + b1;
                        if (flags & 2) {
                            unsigned int old = ld_pair(p);
                            v0 += bf2f((bf16_t)(old & 0xffffu));
                            v1 += bf2f((bf16_t)(old >> 16));
                        }
                        *reinterpret_cast<unsigned int*>(p) = ws_pack(v0, v1);
                    }
                }
                continue;
            }
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                const i64 col = col0 + 8 * j;
                if (col >= N) continue;
                const bool two = col + 1 < N;
                float b0 = 0.f, b1 = 0.f;
                if (flags & 1) {
                    b0 = bf2f(bias[col]);
                    if (two) b1 = bf2f(bias[col + 1]);
                }
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const i64 row = row0 + 8 * h;
                    if (row >= M) continue;
                    float v0 = d[4 * j + 2 * h] + b0, v1 = d[4 * j + 2 * h + 1] + b1;
                    bf16_t* p = Cb + row * ldc + col;
                    if (two && pairs) {
                        if (flags & 2) {
                            unsigned int old = ld_pair(p);
                            v0 += bf2f((bf16_t)(old & 0xffffu));
                            v1 += bf2f((bf16_t)(old >> 16));
                        }
                        *reinterpret_cast<unsigned int*>(p) = ws_pack(v0, v1);
                    } else {
                        if (flags & 2) v0 += bf2f(p[0]);
                        p[0] = f2bf(v0);
                        if (two) {
                            if (flags & 2) v1 += bf2f(p[1]);
                            p[1] = f2bf(v1);
                        }
                    }
                }
            }
        }
        // The TMA stores must have read shared memory before the block exits.
        if (TS != 0 && (tid & 127) == 0) bulk_wait0();
    }
#undef WS_FULL
#undef WS_EMPTY
#undef WS_FAULT
#endif
}

// Kernels per block-tile width: 128 x 256 (4 stages), 128 x 128 (6) and 128 x 64 (8) for
// products with too few 128 x 256 tiles to fill the GPU; per operand layout: K-major both
// (no suffix), A MN-major (_ta), B MN-major (_tb), both (_tab); per epilogue: stores from
// registers (no suffix) or through shared memory and the TMA engine (_ts; not with flags & 2,
// C's map in map_c, flags 32 when it has a batch dimension). Launch: 384 threads, dynamic shared
// memory WS_RING_BYTES + 256 + 1024 (+ 2 WS_EPI_BYTES for _ts), grid = min(tiles, SMs).
// flags 16 skips the stores (a benchmark's ceiling).
#define WS_KERNEL(name, BN, STAGES, TA, TB, TS)                                                                 \
    extern "C" __global__ void __launch_bounds__(384, 1)                                                         \
        name(const __grid_constant__ TmaMap map_a, const __grid_constant__ TmaMap map_b,                         \
             const __grid_constant__ TmaMap map_c, bf16_t* C, const bf16_t* bias, i64 M, i64 N, i64 K, i64 ldc,  \
             i64 batch, i64 batch_c, i64 flags) {                                                                \
        ws_gemm<BN, STAGES, TA, TB, TS>((unsigned long long)&map_a, (unsigned long long)&map_b,                  \
                                        (unsigned long long)&map_c, C, bias, M, N, K, ldc, batch, batch_c, flags); \
    }
#define WS_KERNELS_EPI(name, BN, STAGES, TS)    \
    WS_KERNEL(name, BN, STAGES, 0, 0, TS)       \
    WS_KERNEL(name##_ta, BN, STAGES, 1, 0, TS)  \
    WS_KERNEL(name##_tb, BN, STAGES, 0, 1, TS)  \
    WS_KERNEL(name##_tab, BN, STAGES, 1, 1, TS)
#define WS_KERNELS(name, BN, STAGES)          \
    WS_KERNELS_EPI(name, BN, STAGES, 0)       \
    WS_KERNELS_EPI(name##_ts, BN, STAGES, 1)
WS_KERNELS(gemm_wgmma_ws_bf16, 256, 4)
WS_KERNELS(gemm_wgmma_ws_n128_bf16, 128, 6)
WS_KERNELS(gemm_wgmma_ws_n64_bf16, 64, 8)
