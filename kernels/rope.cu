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
// once per chunk (32-bit index arithmetic when the chunk count fits). `rope_*` is the general
// one-thread-per-pair fallback.

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

// ---- 16-byte vector loads/stores: VEC = 16 / sizeof(T) elements as floats ----
template <typename T>
struct Vec;
template <>
struct Vec<float> {
    static constexpr int N = 4;
};
template <>
struct Vec<bf16_t> {
    static constexpr int N = 8;
};

// p must be 16-byte aligned. f gets Vec<T>::N values.
__device__ __forceinline__ void ld16(const float* p, float* f) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    f[0] = __uint_as_float(v.x);
    f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z);
    f[3] = __uint_as_float(v.w);
}
__device__ __forceinline__ void ld16(const bf16_t* p, float* f) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        f[2 * k] = __uint_as_float(w[k] << 16);             // element 2k: low half
        f[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);  // element 2k + 1: high half
    }
}
// The stores are written in PTX: through a plain uint4 store NVVM sometimes splits one into four
// 4-byte stores. p is a generic pointer to global memory (the same address in both spaces).
__device__ __forceinline__ void st_v4(void* p, unsigned int a, unsigned int b, unsigned int c, unsigned int d) {
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}
__device__ __forceinline__ void st16(float* p, const float* f) {
    st_v4(p, __float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
}
__device__ __forceinline__ void st16(bf16_t* p, const float* f) {
    st_v4(p, pack_bf16(f[0], f[1]), pack_bf16(f[2], f[3]), pack_bf16(f[4], f[5]), pack_bf16(f[6], f[7]));
}

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

#define ROPE_KERNEL(SFX, T)                                                                                  \
    extern "C" __global__ void rope_##SFX(const T* x, Strides xs, const T* cos, Strides cs, const T* sin,    \
                                          Strides ss, T* y, i64 rows, i64 h, i64 inverse) {                  \
        rope_impl<T>(x, xs, cos, cs, sin, ss, y, rows, h, inverse);                                          \
    }                                                                                                        \
    extern "C" __global__ void rope_vec_##SFX(const T* x, Strides xs, const T* cos, Strides cs,              \
                                              const T* sin, Strides ss, T* y, i64 rows, i64 h, i64 inverse) { \
        rope_vec_impl<T>(x, xs, cos, cs, sin, ss, y, rows, h, inverse);                                      \
    }

ROPE_KERNEL(f32, float)
ROPE_KERNEL(bf16, bf16_t)
