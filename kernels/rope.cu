// Rotary position embedding, rotate-half convention (src/backend/cuda/ops/rope.rs, CPU reference
// src/ops/rope.rs). x is read as rows of length d = 2h whose last dim has stride 1; `xs`, `cs`,
// `ss` map a row index (row-major over the leading dims of the output) to the element offset of
// that row's first element in x, cos and sin (cos/sin broadcast: zero strides). y is contiguous
// [rows, d]. One thread per (row, j < h) pair:
//   forward (inverse = 0): y_j = x_j c_j − x_{j+h} s_j,   y_{j+h} = x_{j+h} c_{j+h} + x_j s_{j+h}
//   inverse (inverse = 1): y_j = x_j c_j + x_{j+h} s_{j+h}, y_{j+h} = x_{j+h} c_{j+h} − x_j s_j
// (the inverse is the transpose of the rotation: the backward of rope).
//
// Two kernels: `rope_vec_*` (the launcher checks: h a multiple of VEC = 16 / sizeof(T), every
// pointer 16-byte aligned, every row stride of x/cos/sin a multiple of VEC) runs one thread per
// VEC-element chunk of a row's first half, paired with the matching chunk of the second half:
// 16-byte loads of x, cos, sin at j and j + h, two 16-byte stores, the three row offsets computed
// once per chunk (32-bit index arithmetic when the chunk count fits). `rope_heads_*` (below) is
// the same 16-byte path for rows with a head dim, cos/sin loaded once per 4 heads. `rope_*` is
// the general one-thread-per-pair fallback.

template <typename T>
__device__ __forceinline__ void rope_impl(const T* x, const Strides& xs, const T* cos, const Strides& cs, const T* sin,
                                          const Strides& ss, T* y, i64 rows, i64 h, i64 inverse) {
    GRID_LOOP(i, rows * h) {
        const i64 row = i / h, j = i - row * h;
        const i64 xo = strided_offset(row, xs), co = strided_offset(row, cs), so = strided_offset(row, ss);
        const float x1 = ld(x, xo + j), x2 = ld(x, xo + j + h);
        const float c1 = ld(cos, co + j), c2 = ld(cos, co + j + h);
        const float s1 = ld(sin, so + j), s2 = ld(sin, so + j + h);
        float y1, y2;
        if (inverse) {
            y1 = x1 * c1 + x2 * s2;
            y2 = x2 * c2 - x1 * s1;
        } else {
            y1 = x1 * c1 - x2 * s1;
            y2 = x2 * c2 + x1 * s2;
        }
        const i64 yo = row * 2 * h;
        st(y, yo + j, y1);
        st(y, yo + j + h, y2);
    }
}

// 16-byte vectors: Vec<T>, ld16, st16 (kernels/common.cuh).

// strided_offset with 32-bit division; valid when i and every s.shape[d] are < 2^32.
__device__ __forceinline__ i64 strided_offset_u32(unsigned int i, const Strides& s) {
    i64 off = 0;
    for (int d = (int)s.rank - 1; d >= 0; --d) {
        const unsigned int n = (unsigned int)s.shape[d];
        const unsigned int q = i / n;
        off += (i64)(i - q * n) * s.stride[d];
        i = q;
    }
    return off;
}

// One chunk: row `row`, elements [j, j + V) and [j + h, j + h + V).
template <typename T>
__device__ __forceinline__ void rope_chunk(const T* __restrict__ x, i64 xo, const T* __restrict__ cos, i64 co,
                                           const T* __restrict__ sin, i64 so, T* __restrict__ y, i64 yo, i64 h,
                                           i64 inverse) {
    constexpr int V = Vec<T>::N;
    float x1[V], x2[V], c1[V], c2[V], s1[V], s2[V];
    ld16(x + xo, x1);
    ld16(x + xo + h, x2);
    ld16(cos + co, c1);
    ld16(cos + co + h, c2);
    ld16(sin + so, s1);
    ld16(sin + so + h, s2);
    float y1[V], y2[V];
    if (inverse) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
            y1[k] = x1[k] * c1[k] + x2[k] * s2[k];
            y2[k] = x2[k] * c2[k] - x1[k] * s1[k];
        }
    } else {
#pragma unroll
        for (int k = 0; k < V; ++k) {
            y1[k] = x1[k] * c1[k] - x2[k] * s1[k];
            y2[k] = x2[k] * c2[k] + x1[k] * s2[k];
        }
    }
    st16(y + yo, y1);
    st16(y + yo + h, y2);
}

template <typename T>
__device__ __forceinline__ void rope_vec_impl(const T* x, const Strides& xs, const T* cos, const Strides& cs,
                                              const T* sin, const Strides& ss, T* y, i64 rows, i64 h, i64 inverse) {
    constexpr int V = Vec<T>::N;
    const i64 cpr = h / V;  // chunks per row (h % V == 0)
    const i64 n = rows * cpr;
    if (n <= 0xffffffffLL) {
        // Every index and shape fits in 32 bits (rows <= n): cheap divisions.
        const unsigned int ucpr = (unsigned int)cpr;
        GRID_LOOP(i, n) {
            const unsigned int ui = (unsigned int)i;
            const unsigned int row = ui / ucpr;
            const i64 j = (i64)(ui - row * ucpr) * V;
            const i64 xo = strided_offset_u32(row, xs) + j;
            const i64 co = strided_offset_u32(row, cs) + j;
            const i64 so = strided_offset_u32(row, ss) + j;
            rope_chunk<T>(x, xo, cos, co, sin, so, y, (i64)row * 2 * h + j, h, inverse);
        }
    } else {
        GRID_LOOP(i, n) {
            const i64 row = i / cpr;
            const i64 j = (i - row * cpr) * V;
            const i64 xo = strided_offset(row, xs) + j;
            const i64 co = strided_offset(row, cs) + j;
            const i64 so = strided_offset(row, ss) + j;
            rope_chunk<T>(x, xo, cos, co, sin, so, y, row * 2 * h + j, h, inverse);
        }
    }
}

// Heads path (`rope_heads_*`, the launcher checks the rope_vec conditions and that the rows have
// a "head" dim along which cos and sin do not change, stride 0 in both). The rows are then
// (position p, head k): x row offset xs(p) + k·x_head, y row offset ys(p) + k·y_head, cos/sin
// row offsets cs(p), ss(p) (xs, ys, cs, ss: Strides over the position dims, the head dim
// removed). One thread per (p, head group, chunk): it loads its cos/sin chunks once and rotates
// the same chunk of ROPE_HEADS consecutive heads, all loads issued before the first store.
// Thread index i (32-bit; the host checks the count): chunk = i % cpr, then the head group,
// then p, so the lanes of a warp read whole 128-byte lines of x and share their cos/sin lines.
#define ROPE_HEADS 4

template <typename T>
__device__ __forceinline__ void rope_rotate(const float* x1, const float* x2, const float* c1, const float* c2,
                                            const float* s1, const float* s2, float* y1, float* y2, i64 inverse) {
    constexpr int V = Vec<T>::N;
    if (inverse) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
            y1[k] = x1[k] * c1[k] + x2[k] * s2[k];
            y2[k] = x2[k] * c2[k] - x1[k] * s1[k];
        }
    } else {
#pragma unroll
        for (int k = 0; k < V; ++k) {
            y1[k] = x1[k] * c1[k] - x2[k] * s1[k];
            y2[k] = x2[k] * c2[k] + x1[k] * s2[k];
        }
    }
}

template <typename T>
__device__ __forceinline__ void rope_heads_impl(const T* __restrict__ x, const Strides& xs, i64 x_head,
                                                const T* __restrict__ cos, const Strides& cs,
                                                const T* __restrict__ sin, const Strides& ss, T* __restrict__ y,
                                                const Strides& ys, i64 y_head, i64 positions, i64 heads, i64 h,
                                                i64 inverse) {
    constexpr int V = Vec<T>::N;
    const unsigned int cpr = (unsigned int)(h / V);  // chunks per half row
    const unsigned int groups = (unsigned int)((heads + ROPE_HEADS - 1) / ROPE_HEADS);
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned int rest = i / cpr;
    const unsigned int p = rest / groups;
    if (p >= (unsigned int)positions) return;
    const i64 j = (i64)(i - rest * cpr) * V;
    const int k0 = (int)(rest - p * groups) * ROPE_HEADS;
    const int nk = (int)heads - k0 < ROPE_HEADS ? (int)heads - k0 : ROPE_HEADS;
    const T* xp = x + strided_offset_u32(p, xs) + j + (i64)k0 * x_head;
    T* yp = y + strided_offset_u32(p, ys) + j + (i64)k0 * y_head;
    const T* cp = cos + strided_offset_u32(p, cs) + j;
    const T* sp = sin + strided_offset_u32(p, ss) + j;
    uint4 a[ROPE_HEADS], b[ROPE_HEADS];
#pragma unroll
    for (int k = 0; k < ROPE_HEADS; ++k) {
        if (k < nk) {
            a[k] = *reinterpret_cast<const uint4*>(xp + k * x_head);
            b[k] = *reinterpret_cast<const uint4*>(xp + k * x_head + h);
        }
    }
    const uint4 uc1 = *reinterpret_cast<const uint4*>(cp), uc2 = *reinterpret_cast<const uint4*>(cp + h);
    const uint4 us1 = *reinterpret_cast<const uint4*>(sp), us2 = *reinterpret_cast<const uint4*>(sp + h);
    float c1[V], c2[V], s1[V], s2[V];
    unpack16<T>(uc1, c1);
    unpack16<T>(uc2, c2);
    unpack16<T>(us1, s1);
    unpack16<T>(us2, s2);
#pragma unroll
    for (int k = 0; k < ROPE_HEADS; ++k) {
        if (k < nk) {
            float x1[V], x2[V], y1[V], y2[V];
            unpack16<T>(a[k], x1);
            unpack16<T>(b[k], x2);
            rope_rotate<T>(x1, x2, c1, c2, s1, s2, y1, y2, inverse);
            st16_rn(yp + k * y_head, y1);
            st16_rn(yp + k * y_head + h, y2);
        }
    }
}

#define ROPE_KERNEL(SFX, T)                                                                                  \
    extern "C" __global__ void rope_##SFX(const T* x, Strides xs, const T* cos, Strides cs, const T* sin,    \
                                          Strides ss, T* y, i64 rows, i64 h, i64 inverse) {                  \
        rope_impl<T>(x, xs, cos, cs, sin, ss, y, rows, h, inverse);                                          \
    }                                                                                                        \
    extern "C" __global__ void rope_vec_##SFX(const T* x, Strides xs, const T* cos, Strides cs,              \
                                              const T* sin, Strides ss, T* y, i64 rows, i64 h, i64 inverse) { \
        rope_vec_impl<T>(x, xs, cos, cs, sin, ss, y, rows, h, inverse);                                      \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                                        \
        rope_heads_##SFX(const T* x, Strides xs, i64 x_head, const T* cos, Strides cs, const T* sin,         \
                         Strides ss, T* y, Strides ys, i64 y_head, i64 positions, i64 heads, i64 h,          \
                         i64 inverse) {                                                                      \
        rope_heads_impl<T>(x, xs, x_head, cos, cs, sin, ss, y, ys, y_head, positions, heads, h, inverse);    \
    }

ROPE_KERNEL(f32, float)
ROPE_KERNEL(bf16, bf16_t)
