// Rotary position embedding, rotate-half convention (src/backend/cuda/ops/rope.rs, CPU reference
// src/ops/rope.rs). x is read as rows of length d = 2h whose last dim has stride 1; `xs`, `cs`,
// `ss` map a row index (row-major over the leading dims of the output) to the element offset of
// that row's first element in x, cos and sin (cos/sin broadcast: zero strides). y is contiguous
// [rows, d]. One thread per (row, j < h) pair:
//   forward (inverse = 0): y_j = x_j c_j − x_{j+h} s_j,   y_{j+h} = x_{j+h} c_{j+h} + x_j s_{j+h}
//   inverse (inverse = 1): y_j = x_j c_j + x_{j+h} s_{j+h}, y_{j+h} = x_{j+h} c_{j+h} − x_j s_j
// (the inverse is the transpose of the rotation: the backward of rope).

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

#define ROPE_KERNEL(SFX, T)                                                                                  \
    extern "C" __global__ void rope_##SFX(const T* x, Strides xs, const T* cos, Strides cs, const T* sin,    \
                                          Strides ss, T* y, i64 rows, i64 h, i64 inverse) {                  \
        rope_impl<T>(x, xs, cos, cs, sin, ss, y, rows, h, inverse);                                          \
    }

ROPE_KERNEL(f32, float)
ROPE_KERNEL(bf16, bf16_t)
