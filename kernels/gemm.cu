// Tensor-core GEMM, bf16 in, f32 accumulate (sm_80+: mma.sync m16n8k16, cp.async 3-stage
// shared-memory pipeline, padded shared memory so fragment loads are conflict-free).
//
//   C[b] (M x N, row stride ldc) = A[b] (M x K, row stride lda) . B[b]^T    (+ bias[N]) (+ C)
//
// B is stored N x K (row stride ldb): both operands are K-contiguous, which is how
// nn.Linear's weight is stored; the launcher makes other layouts K-contiguous first.
// Requirements (checked by the launcher): K % 8 == 0, lda % 8 == 0, ldb % 8 == 0, A and B
// 16-byte aligned. M and N are arbitrary (rows beyond them are zero-filled / not stored).
//
// Block tile 128 x 128 x 32, 256 threads = 8 warps as 2 (M) x 4 (N), warp tile 64 x 32 =
// 4 x 4 mma tiles of 16 x 8; 64 f32 accumulators per thread.

#define TC_BM 128
#define TC_BN 128
#define TC_BK 32
#define TC_PAD 8
#define TC_LDS (TC_BK + TC_PAD)  // shared row stride in bf16 elements (80 bytes)
#define TC_STAGES 3

// One k-tile of A (TC_BM x TC_BK) and B (TC_BN x TC_BK) into shared stage `sa`, `sb`.
// 128 rows x 4 chunks of 16 bytes each = 512 chunks per operand, 2 per thread.
__device__ __forceinline__ void tc_load_tile(bf16_t* sa, bf16_t* sb, const bf16_t* A, const bf16_t* B,
                                             i64 M, i64 N, i64 K, i64 lda, i64 ldb, i64 m0, i64 n0, i64 k0) {
    int tid = threadIdx.x;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        int c = tid + r * 256;     // chunk 0..511
        int row = c >> 2;          // 0..127
        int kc = (c & 3) * 8;      // 0, 8, 16, 24
        i64 gk = k0 + kc;
        i64 gm = m0 + row;
        bool va = gm < M && gk < K;
        const bf16_t* srcA = va ? A + gm * lda + gk : A;
        cp_async16(sa + row * TC_LDS + kc, srcA, va);
        i64 gn = n0 + row;
        bool vb = gn < N && gk < K;
        const bf16_t* srcB = vb ? B + gn * ldb + gk : B;
        cp_async16(sb + row * TC_LDS + kc, srcB, vb);
    }
}

// flags: bit 0 = add bias[N] (bf16), bit 1 = accumulate into C.
extern "C" __global__ void __launch_bounds__(256)
gemm_tc_bf16(const bf16_t* A, const bf16_t* B, bf16_t* C, const bf16_t* bias,
             i64 M, i64 N, i64 K, i64 lda, i64 ldb, i64 ldc,
             i64 batch_a, i64 batch_b, i64 batch_c, i64 flags) {
    extern __shared__ __align__(16) unsigned char tc_smem[];
    bf16_t* sA = reinterpret_cast<bf16_t*>(tc_smem);
    bf16_t* sB = sA + TC_STAGES * TC_BM * TC_LDS;

    A += (i64)blockIdx.z * batch_a;
    B += (i64)blockIdx.z * batch_b;
    C += (i64)blockIdx.z * batch_c;
    i64 m0 = (i64)blockIdx.y * TC_BM, n0 = (i64)blockIdx.x * TC_BN;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int wm = warp >> 2, wn = warp & 3;  // 2 x 4 warps
    int g = lane >> 2, t = lane & 3;

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;

    i64 ktiles = (K + TC_BK - 1) / TC_BK;
#pragma unroll
    for (int s = 0; s < TC_STAGES - 1; ++s) {
        if (s < ktiles)
            tc_load_tile(sA + s * TC_BM * TC_LDS, sB + s * TC_BN * TC_LDS, A, B, M, N, K, lda, ldb, m0, n0,
                         (i64)s * TC_BK);
        cp_async_commit();
    }

    for (i64 kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<TC_STAGES - 2>();
        __syncthreads();
        i64 pre = kt + TC_STAGES - 1;
        if (pre < ktiles) {
            int ps = (int)(pre % TC_STAGES);
            tc_load_tile(sA + ps * TC_BM * TC_LDS, sB + ps * TC_BN * TC_LDS, A, B, M, N, K, lda, ldb, m0, n0,
                         pre * TC_BK);
        }
        cp_async_commit();

        int cs = (int)(kt % TC_STAGES);
        const bf16_t* a_s = sA + cs * TC_BM * TC_LDS + (wm * 64) * TC_LDS;
        const bf16_t* b_s = sB + cs * TC_BN * TC_LDS + (wn * 32) * TC_LDS;
#pragma unroll
        for (int kk = 0; kk < TC_BK; kk += 16) {
            unsigned int af[4][4], bfr[4][2];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const bf16_t* p = a_s + (i * 16 + g) * TC_LDS + kk + 2 * t;
                af[i][0] = ld_pair(p);
                af[i][1] = ld_pair(p + 8 * TC_LDS);
                af[i][2] = ld_pair(p + 8);
                af[i][3] = ld_pair(p + 8 * TC_LDS + 8);
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const bf16_t* p = b_s + (j * 8 + g) * TC_LDS + kk + 2 * t;
                bfr[j][0] = ld_pair(p);
                bfr[j][1] = ld_pair(p + 8);
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_bf16_16816(acc[i][j], af[i], bfr[j]);
        }
    }
    cp_async_wait<0>();

    // Epilogue: c0,c1 at (row g, cols 2t, 2t+1); c2,c3 at (row g+8, same cols).
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                i64 row = m0 + wm * 64 + i * 16 + g + h * 8;
                if (row >= M) continue;
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    i64 col = n0 + wn * 32 + j * 8 + 2 * t + e;
                    if (col >= N) continue;
                    float v = acc[i][j][h * 2 + e];
                    if (flags & 1) v += bf2f(bias[col]);
                    if (flags & 2) v += bf2f(C[row * ldc + col]);
                    C[row * ldc + col] = f2bf(v);
                }
            }
        }
    }
}
