// Batched GEMM with strided operands and broadcast / reduced batch dims, plus the column sums
// of linear's bias gradient. The "simple correct" version: a shared-memory tiled kernel with
// f32 accumulation (tensor-core kernels come later).
//
//   C[z] = sum_r A[z, r] @ B[z, r] (+ bias)        A: [M, K], B: [K, N], C: [M, N]
//
// A and B are read through element strides (a_rs, a_cs, b_rs, b_cs), so a transposed view
// costs no copy. The batch is described by `GemmBatch`: `rank` outer dims (one C matrix
// each, C offset from `sc`) and `rrank` reduced dims summed into the same C matrix (the
// gradient of a broadcast operand). Batch strides may be 0 (broadcast). C is written densely:
// row stride N, matrix at offset decode(z).sc. Every load and store is bounds-checked, so any
// M, N, K >= 0 works (K == 0 writes zeros plus bias).
//
// Tiles: 64 x 64 block tile, BK = 16, 256 threads; thread (ty, tx) = (tid / 16, tid % 16)
// owns the 4 x 4 outputs (ty + 16 i, tx + 16 j), so its shared-memory reads are broadcasts
// (A) or 16 consecutive floats (B).

#define GEMM_BM 64
#define GEMM_BN 64
#define GEMM_BK 16
#define GEMM_THREADS 256
#define GEMM_MAXB 8

struct GemmBatch {
    i64 rank;                // outer batch dims
    i64 shape[GEMM_MAXB];
    i64 sa[GEMM_MAXB];       // element strides of A, B and C for each outer dim
    i64 sb[GEMM_MAXB];
    i64 sc[GEMM_MAXB];
    i64 rrank;               // reduced batch dims
    i64 rshape[GEMM_MAXB];
    i64 ra[GEMM_MAXB];       // element strides of A and B for each reduced dim
    i64 rb[GEMM_MAXB];
};

template <typename T>
__device__ __forceinline__ void gemm_tiled(const T* __restrict__ A, const T* __restrict__ B,
                                           const T* __restrict__ bias, T* __restrict__ C, i64 M,
                                           i64 N, i64 K, i64 a_rs, i64 a_cs, i64 b_rs, i64 b_cs,
                                           const GemmBatch& bt, i64 Z, i64 R) {
    __shared__ float As[GEMM_BK][GEMM_BM + 4];  // As[k][m]
    __shared__ float Bs[GEMM_BK][GEMM_BN + 4];  // Bs[k][n]
    const int tid = threadIdx.x;
    const int tx = tid & 15, ty = tid >> 4;
    // Load mapping: consecutive threads walk the operand's unit-stride dimension.
    const bool a_kfast = (a_cs == 1);
    const bool b_nfast = (b_cs == 1);
    const i64 m_tiles = (M + GEMM_BM - 1) / GEMM_BM;
    const i64 n0 = (i64)blockIdx.x * GEMM_BN;

    // All loop bounds below depend only on block indices: every thread of the block runs the
    // same iterations, so the __syncthreads inside are reached by all.
    for (i64 z = blockIdx.z; z < Z; z += gridDim.z) {
        i64 oa = 0, ob = 0, oc = 0;
        {
            i64 rem = z;
            for (int d = (int)bt.rank - 1; d >= 0; --d) {
                i64 idx = rem % bt.shape[d];
                rem /= bt.shape[d];
                oa += idx * bt.sa[d];
                ob += idx * bt.sb[d];
                oc += idx * bt.sc[d];
            }
        }
        for (i64 mt = blockIdx.y; mt < m_tiles; mt += gridDim.y) {
            const i64 m0 = mt * GEMM_BM;
            float acc[4][4];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

            for (i64 r = 0; r < R; ++r) {
                i64 pa = oa, pb = ob;
                {
                    i64 rem = r;
                    for (int d = (int)bt.rrank - 1; d >= 0; --d) {
                        i64 idx = rem % bt.rshape[d];
                        rem /= bt.rshape[d];
                        pa += idx * bt.ra[d];
                        pb += idx * bt.rb[d];
                    }
                }
                for (i64 k0 = 0; k0 < K; k0 += GEMM_BK) {
                    // A tile: 64 x 16 = 1024 elements, 4 per thread.
#pragma unroll
                    for (int l = 0; l < 4; ++l) {
                        int idx = tid + l * GEMM_THREADS;
                        int mm, kk;
                        if (a_kfast) {
                            mm = idx / GEMM_BK;
                            kk = idx % GEMM_BK;
                        } else {
                            kk = idx / GEMM_BM;
                            mm = idx % GEMM_BM;
                        }
                        i64 gm = m0 + mm, gk = k0 + kk;
                        As[kk][mm] = (gm < M && gk < K) ? ld(A, pa + gm * a_rs + gk * a_cs) : 0.f;
                    }
                    // B tile: 16 x 64 = 1024 elements, 4 per thread.
#pragma unroll
                    for (int l = 0; l < 4; ++l) {
                        int idx = tid + l * GEMM_THREADS;
                        int nn, kk;
                        if (b_nfast) {
                            kk = idx / GEMM_BN;
                            nn = idx % GEMM_BN;
                        } else {
                            nn = idx / GEMM_BK;
                            kk = idx % GEMM_BK;
                        }
                        i64 gn = n0 + nn, gk = k0 + kk;
                        Bs[kk][nn] = (gn < N && gk < K) ? ld(B, pb + gk * b_rs + gn * b_cs) : 0.f;
                    }
                    __syncthreads();
#pragma unroll
                    for (int kk = 0; kk < GEMM_BK; ++kk) {
                        float a[4], b[4];
#pragma unroll
                        for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
                        for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
                        for (int i = 0; i < 4; ++i)
#pragma unroll
                            for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
                    }
                    __syncthreads();
                }
            }

#pragma unroll
            for (int i = 0; i < 4; ++i) {
                i64 gm = m0 + ty + 16 * i;
                if (gm >= M) continue;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    i64 gn = n0 + tx + 16 * j;
                    if (gn >= N) continue;
                    float v = acc[i][j];
                    if (bias != nullptr) v += ld(bias, gn);
                    st(C, oc + gm * N + gn, v);
                }
            }
        }
    }
}

#define GEMM_KERNEL(SFX, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 2)                              \
        gemm_##SFX(const T* A, const T* B, const T* bias, T* C, i64 M, i64 N, i64 K,          \
                   i64 a_rs, i64 a_cs, i64 b_rs, i64 b_cs, GemmBatch bt, i64 Z, i64 R) {      \
        gemm_tiled<T>(A, B, bias, C, M, N, K, a_rs, a_cs, b_rs, b_cs, bt, Z, R);              \
    }
GEMM_KERNEL(f32, float)
GEMM_KERNEL(bf16, bf16_t)

// Column sums of a contiguous [rows, cols] matrix (linear's bias gradient), deterministic in
// two passes. Pass 1: grid (ceil(cols / 256), chunks); block (x, c) sums rows
// [c * rows_per_chunk, (c + 1) * rows_per_chunk) of 256 columns into part[c, col] (f32).
template <typename T>
__device__ __forceinline__ void colsum_partial(const T* __restrict__ g, float* __restrict__ part,
                                               i64 rows, i64 cols, i64 rows_per_chunk) {
    i64 col = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= cols) return;
    i64 r0 = (i64)blockIdx.y * rows_per_chunk;
    i64 r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
    float s = 0.f;
    for (i64 r = r0; r < r1; ++r) s += ld(g, r * cols + col);
    part[(i64)blockIdx.y * cols + col] = s;
}

// Pass 1 with one 16-byte vector (Vec<T>::N columns) per thread, when cols is a multiple of N
// and g is 16-byte aligned (col_partials_vec of common.cuh): the same sums in the same order
// (the chunks depend on the rows alone, `col_chunks`). grid (ceil(cols / N / 256), chunks).

// Pass 2: out[col] = the sum over chunks of part[c, col] (col_partials_sum), in the output dtype.
#define COLSUM_KERNELS(SFX, T)                                                                \
    extern "C" __global__ void colsum_partial_##SFX(const T* g, float* part, i64 rows,        \
                                                    i64 cols, i64 rows_per_chunk) {           \
        colsum_partial<T>(g, part, rows, cols, rows_per_chunk);                               \
    }                                                                                         \
    extern "C" __global__ void colsum_partial_vec_##SFX(const T* g, float* part, i64 rows,    \
                                                        i64 cols, i64 rows_per_chunk) {       \
        col_partials_vec<T, false>(g, nullptr, nullptr, part, rows, cols, rows_per_chunk);                           \
    }                                                                                         \
    extern "C" __global__ void colsum_sum_##SFX(const float* part, T* out, i64 chunks,        \
                                                i64 cols) {                                   \
        col_partials_sum<T>(part, out, chunks, cols);                                         \
    }
COLSUM_KERNELS(f32, float)
COLSUM_KERNELS(bf16, bf16_t)
