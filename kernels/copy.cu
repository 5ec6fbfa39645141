// Layout and dtype kernels: strided gather into a contiguous buffer (`contiguous`), dtype
// casts, fills. Every launch is a grid-stride loop over the output's elements.

// dst[i] = src[offset(i)] for a strided view of rank <= MAX_RANK.
#define STRIDED_COPY(NAME, T)                                                             \
    extern "C" __global__ void NAME(const T* src, T* dst, Strides s, i64 n) {            \
        GRID_LOOP(i, n) { dst[i] = src[strided_offset(i, s)]; }                          \
    }
STRIDED_COPY(strided_copy_4, unsigned int)
STRIDED_COPY(strided_copy_2, unsigned short)
STRIDED_COPY(strided_copy_8, unsigned long long)

// Casts between f32 and bf16 (contiguous).
extern "C" __global__ void cast_f32_bf16(const float* src, bf16_t* dst, i64 n) {
    GRID_LOOP(i, n) { dst[i] = f2bf(src[i]); }
}
extern "C" __global__ void cast_bf16_f32(const bf16_t* src, float* dst, i64 n) {
    GRID_LOOP(i, n) { dst[i] = bf2f(src[i]); }
}

extern "C" __global__ void fill_f32(float* dst, float v, i64 n) {
    GRID_LOOP(i, n) { dst[i] = v; }
}
extern "C" __global__ void fill_bf16(bf16_t* dst, float v, i64 n) {
    bf16_t b = f2bf(v);
    GRID_LOOP(i, n) { dst[i] = b; }
}

// Vectorised strided copy for views whose last dim is contiguous: each thread moves 16 bytes.
// `outer` describes the view without its last dim (element strides); a row has `row_vecs`
// 16-byte chunks; `esize` is the element size in bytes. The launcher checks that every row
// start is 16-byte aligned.
extern "C" __global__ void strided_copy_rows16(const unsigned char* src, uint4* dst, Strides outer, i64 row_vecs,
                                               i64 esize, i64 n_vecs) {
    GRID_LOOP(c, n_vecs) {
        i64 row = c / row_vecs, col = c - row * row_vecs;
        const uint4* s = reinterpret_cast<const uint4*>(src + strided_offset(row, outer) * esize) + col;
        dst[c] = *s;
    }
}

// Transpose through shared memory: dst [rows, cols] (row-major) = the view whose element
// (r, c) is src[c·ld + r] (a transposed matrix). 32 x 32 tiles, 32 x 8 threads: reads are
// coalesced along r, writes along c.
#define TRANSPOSE(NAME, T)                                                                      \
    extern "C" __global__ void NAME(const T* src, T* dst, i64 rows, i64 cols, i64 ld) {         \
        __shared__ T tile[32][33];                                                              \
        i64 r0 = (i64)blockIdx.y * 32, c0 = (i64)blockIdx.x * 32;                               \
        for (int k = threadIdx.y; k < 32; k += 8) {                                             \
            i64 c = c0 + k, r = r0 + threadIdx.x;                                               \
            if (c < cols && r < rows) tile[k][threadIdx.x] = src[c * ld + r];                   \
        }                                                                                       \
        __syncthreads();                                                                        \
        for (int k = threadIdx.y; k < 32; k += 8) {                                             \
            i64 r = r0 + k, c = c0 + threadIdx.x;                                               \
            if (r < rows && c < cols) dst[r * cols + c] = tile[threadIdx.x][k];                 \
        }                                                                                       \
    }
TRANSPOSE(transpose_2, unsigned short)
TRANSPOSE(transpose_4, unsigned int)

// K-padded operand copy for the tensor-core GEMM: dst [rows, kp] (row-major) with
// dst(r, j) = src[r·rs + j·cs] for j < k and 0 for k <= j < kp.
extern "C" __global__ void pad_cols_2(const unsigned short* src, unsigned short* dst, i64 rows, i64 k, i64 kp, i64 rs,
                                      i64 cs) {
    GRID_LOOP(i, rows * kp) {
        i64 r = i / kp, j = i - r * kp;
        dst[i] = j < k ? src[r * rs + j * cs] : (unsigned short)0;
    }
}
