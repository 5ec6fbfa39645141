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

// Casts with 16-byte accesses on the bf16 side: chunk i is elements 8i .. 8i + 7 (n8 chunks;
// the launcher checks 16-byte alignment and casts the tail with the scalar kernels). Same
// rounding as f2bf (NaN payloads kept), so the results equal the scalar kernels bit for bit.
extern "C" __global__ void cast_f32_bf16_v8(const float4* src, uint4* dst, i64 n8) {
    GRID_LOOP(i, n8) {
        const float4 a = src[2 * i], b = src[2 * i + 1];
        dst[i] = make_uint4(pack_bf16(a.x, a.y), pack_bf16(a.z, a.w), pack_bf16(b.x, b.y), pack_bf16(b.z, b.w));
    }
}
extern "C" __global__ void cast_bf16_f32_v8(const uint4* src, float4* dst, i64 n8) {
    GRID_LOOP(i, n8) {
        const uint4 v = src[i];
#define BF_LO(u) __uint_as_float((u) << 16)
#define BF_HI(u) __uint_as_float((u) & 0xffff0000u)
        dst[2 * i] = make_float4(BF_LO(v.x), BF_HI(v.x), BF_LO(v.y), BF_HI(v.y));
        dst[2 * i + 1] = make_float4(BF_LO(v.z), BF_HI(v.z), BF_LO(v.w), BF_HI(v.w));
#undef BF_LO
#undef BF_HI
    }
}

// transpose_2 with 64 x 64 tiles and 4-byte accesses (two adjacent elements per thread, a
// 128-byte line per warp and row). `src_pairs`: ld and src are such that pairs (r, r + 1) of
// one source row are 4-byte aligned; `dst_pairs`: the same for dst's rows (cols even, dst
// aligned). Otherwise elements move one at a time. Same contract as transpose_2.
extern "C" __global__ void transpose_2_x2(const unsigned short* src, unsigned short* dst, i64 rows, i64 cols, i64 ld,
                                          int src_pairs, int dst_pairs) {
    __shared__ unsigned short tile[64][66];  // [c - c0][r - r0]
    const i64 r0 = (i64)blockIdx.y * 64, c0 = (i64)blockIdx.x * 64;
    const int tx = threadIdx.x;
    for (int k = threadIdx.y; k < 64; k += 8) {
        const i64 c = c0 + k, r = r0 + 2 * tx;
        if (c >= cols) continue;
        const unsigned short* p = src + c * ld + r;
        if (src_pairs && r + 1 < rows) {
            const unsigned int v = *reinterpret_cast<const unsigned int*>(p);
            tile[k][2 * tx] = (unsigned short)(v & 0xffffu);
            tile[k][2 * tx + 1] = (unsigned short)(v >> 16);
        } else {
            if (r < rows) tile[k][2 * tx] = p[0];
            if (r + 1 < rows) tile[k][2 * tx + 1] = p[1];
        }
    }
    __syncthreads();
    for (int k = threadIdx.y; k < 64; k += 8) {
        const i64 r = r0 + k, c = c0 + 2 * tx;
        if (r >= rows) continue;
        const unsigned short a = tile[2 * tx][k], b = tile[2 * tx + 1][k];
        unsigned short* q = dst + r * cols + c;
        if (dst_pairs && c + 1 < cols) {
            *reinterpret_cast<unsigned int*>(q) = (unsigned int)a | ((unsigned int)b << 16);
        } else {
            if (c < cols) q[0] = a;
            if (c + 1 < cols) q[1] = b;
        }
    }
}
