// Elementwise ops (src/backend/cuda/ops/elementwise.rs). One generic family:
//   unary_<T>(x, y, n, op, a, b)                  y = f_op(x; a, b), contiguous
//   unary_backward_<T>(g, s, dx, n, op, a, b)     dx = g * f'_op(s; a, b), s = saved x or y, contiguous
//   binary_<T>(a, b, out, n, op)                  out = a (op) b, all contiguous, same shape
//   binary_strided_<T>(a, b, out, s, n, op)       out = a (op) b, a and b strided / broadcast
//                                                 (stride 0) against the contiguous output
// The op codes match the constants in the Rust launcher. Every launch is a grid-stride loop;
// the contiguous kernels move 16 bytes per load/store when all pointers are 16-byte aligned
// (then a scalar loop does the tail).

// ------------------------------------------------------------------------------ op codes

#define U_AFFINE 0   // x * a + b
#define U_EXP 1
#define U_LOG 2
#define U_SQRT 3
#define U_RSQRT 4
#define U_POW 5      // x ^ a
#define U_ABS 6
#define U_CLAMP 7    // min(max(x, a), b)
#define U_SIGMOID 8
#define U_TANH 9
#define U_SILU 10    // x * sigmoid(x)
#define U_GELU 11    // x/2 * (1 + erf(x / sqrt 2))

#define G_SQRT 0     // s = y: g * 0.5 / y
#define G_RSQRT 1    // s = x: g * -0.5 * r^3, r = 1/sqrt(x)
#define G_POW 2      // s = x: g * a * x^b   (a = p, b = p - 1)
#define G_ABS 3      // s = x: g * sign(x)   (0 at 0)
#define G_CLAMP 4    // s = x: g where a <= x <= b, else 0
#define G_SIGMOID 5  // s = x: g * σ(x) (1 - σ(x))
#define G_TANH 6     // s = x: g * (1 - tanh(x)^2)
#define G_SILU 7     // s = x: g * σ(x) (1 + x (1 - σ(x)))
#define G_GELU 8     // s = x: g * (Φ(x) + x φ(x))

#define B_ADD 0
#define B_SUB 1
#define B_MUL 2
#define B_DIV 3

// ------------------------------------------------------------------------------ math

__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + expf(-x)); }

template <int OP>
__device__ __forceinline__ float unary_fn(float x, float a, float b) {
    switch (OP) {
        case U_AFFINE: return x * a + b;
        case U_EXP: return expf(x);
        case U_LOG: return logf(x);
        case U_SQRT: return sqrtf(x);
        case U_RSQRT: return 1.f / sqrtf(x);
        case U_POW: return powf(x, a);
        case U_ABS: return fabsf(x);
        case U_CLAMP: return fminf(fmaxf(x, a), b);
        case U_SIGMOID: return sigmoid_f(x);
        case U_TANH: return tanhf(x);
        case U_SILU: return x * sigmoid_f(x);
        case U_GELU: return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
        default: return x;
    }
}

template <int OP>
__device__ __forceinline__ float grad_fn(float g, float s, float a, float b) {
    switch (OP) {
        case G_SQRT: return g * 0.5f / s;
        case G_RSQRT: {
            float r = 1.f / sqrtf(s);
            return g * -0.5f * r * r * r;
        }
        case G_POW: return g * a * powf(s, b);
        case G_ABS: return s > 0.f ? g : (s < 0.f ? -g : 0.f);
        case G_CLAMP: return (s >= a && s <= b) ? g : 0.f;
        case G_SIGMOID: {
            float y = sigmoid_f(s);
            return g * y * (1.f - y);
        }
        case G_TANH: {
            float y = tanhf(s);
            return g * (1.f - y * y);
        }
        case G_SILU: {
            float y = sigmoid_f(s);
            return g * y * (1.f + s * (1.f - y));
        }
        case G_GELU: {
            float cdf = 0.5f * (1.f + erff(s * 0.70710678118654752f));
            float pdf = expf(-0.5f * s * s) * 0.3989422804014327f;
            return g * (cdf + s * pdf);
        }
        default: return g;
    }
}

template <int OP>
__device__ __forceinline__ float binary_fn(float x, float y) {
    switch (OP) {
        case B_ADD: return x + y;
        case B_SUB: return x - y;
        case B_MUL: return x * y;
        case B_DIV: return x / y;
        default: return x;
    }
}

// ------------------------------------------------------------------------------ 16-byte packs

struct alignas(16) Pack16 {
    unsigned int w[4];
};

__device__ __forceinline__ bool aligned16(const void* p) {
    return (((unsigned long long)p) & 15ull) == 0;
}

// Loads the 16/sizeof(T) elements p[i..] (p + i 16-byte aligned) as floats.
template <typename T>
__device__ __forceinline__ void load_pack(const T* p, i64 i, float* v) {
    Pack16 u = *reinterpret_cast<const Pack16*>(p + i);
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int k = 0; k < (int)(16 / sizeof(T)); ++k) v[k] = ld(e, k);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, i64 i, const float* v) {
    Pack16 u;
    T* e = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int k = 0; k < (int)(16 / sizeof(T)); ++k) st(e, k, v[k]);
    *reinterpret_cast<Pack16*>(p + i) = u;
}

// y[i] = f(x[i]) for i < n (contiguous).
template <typename T, typename F>
__device__ __forceinline__ void map1_loop(const T* x, T* y, i64 n, F f) {
    constexpr int V = 16 / sizeof(T);
    const i64 tid = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    i64 start = 0;
    if (aligned16(x) && aligned16(y)) {
        const i64 packs = n / V;
        for (i64 p = tid; p < packs; p += stride) {
            float v[V];
            load_pack(x, p * V, v);
#pragma unroll
            for (int k = 0; k < V; ++k) v[k] = f(v[k]);
            store_pack(y, p * V, v);
        }
        start = packs * V;
    }
    for (i64 i = start + tid; i < n; i += stride) st(y, i, f(ld(x, i)));
}

// out[i] = f(a[i], b[i]) for i < n (contiguous).
template <typename T, typename F>
__device__ __forceinline__ void map2_loop(const T* a, const T* b, T* out, i64 n, F f) {
    constexpr int V = 16 / sizeof(T);
    const i64 tid = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    i64 start = 0;
    if (aligned16(a) && aligned16(b) && aligned16(out)) {
        const i64 packs = n / V;
        for (i64 p = tid; p < packs; p += stride) {
            float va[V], vb[V];
            load_pack(a, p * V, va);
            load_pack(b, p * V, vb);
#pragma unroll
            for (int k = 0; k < V; ++k) va[k] = f(va[k], vb[k]);
            store_pack(out, p * V, va);
        }
        start = packs * V;
    }
    for (i64 i = start + tid; i < n; i += stride) st(out, i, f(ld(a, i), ld(b, i)));
}

// ------------------------------------------------------------------------------ kernels

template <typename T>
__device__ void unary_impl(const T* x, T* y, i64 n, i64 op, float a, float b) {
#define UNARY_CASE(OP) \
    case OP: map1_loop(x, y, n, [=](float v) { return unary_fn<OP>(v, a, b); }); break;
    switch (op) {
        UNARY_CASE(U_AFFINE)
        UNARY_CASE(U_EXP)
        UNARY_CASE(U_LOG)
        UNARY_CASE(U_SQRT)
        UNARY_CASE(U_RSQRT)
        UNARY_CASE(U_POW)
        UNARY_CASE(U_ABS)
        UNARY_CASE(U_CLAMP)
        UNARY_CASE(U_SIGMOID)
        UNARY_CASE(U_TANH)
        UNARY_CASE(U_SILU)
        UNARY_CASE(U_GELU)
        default: break;
    }
#undef UNARY_CASE
}

template <typename T>
__device__ void unary_backward_impl(const T* g, const T* s, T* dx, i64 n, i64 op, float a, float b) {
#define GRAD_CASE(OP) \
    case OP: map2_loop(g, s, dx, n, [=](float gv, float sv) { return grad_fn<OP>(gv, sv, a, b); }); break;
    switch (op) {
        GRAD_CASE(G_SQRT)
        GRAD_CASE(G_RSQRT)
        GRAD_CASE(G_POW)
        GRAD_CASE(G_ABS)
        GRAD_CASE(G_CLAMP)
        GRAD_CASE(G_SIGMOID)
        GRAD_CASE(G_TANH)
        GRAD_CASE(G_SILU)
        GRAD_CASE(G_GELU)
        default: break;
    }
#undef GRAD_CASE
}

template <typename T>
__device__ void binary_impl(const T* a, const T* b, T* out, i64 n, i64 op) {
#define BIN_CASE(OP) \
    case OP: map2_loop(a, b, out, n, [](float x, float y) { return binary_fn<OP>(x, y); }); break;
    switch (op) {
        BIN_CASE(B_ADD)
        BIN_CASE(B_SUB)
        BIN_CASE(B_MUL)
        BIN_CASE(B_DIV)
        default: break;
    }
#undef BIN_CASE
}

// Shape of the (contiguous) output and the element strides of both inputs against it
// (0 where an input is broadcast). Dims of size 1 are dropped and mergeable dims merged by
// the launcher. Matches `Bcast` in src/backend/cuda/ops/elementwise.rs.
struct Bcast {
    i64 rank;
    i64 shape[MAX_RANK];
    i64 sa[MAX_RANK];
    i64 sb[MAX_RANK];
};

template <typename T, int OP>
__device__ __forceinline__ void binary_strided_loop(const T* a, const T* b, T* out, const Bcast& s, i64 n) {
    GRID_LOOP(i, n) {
        i64 r = i, oa = 0, ob = 0;
        for (int d = (int)s.rank - 1; d >= 0; --d) {
            const i64 len = s.shape[d];
            const i64 k = r % len;
            r /= len;
            oa += k * s.sa[d];
            ob += k * s.sb[d];
        }
        st(out, i, binary_fn<OP>(ld(a, oa), ld(b, ob)));
    }
}

template <typename T>
__device__ void binary_strided_impl(const T* a, const T* b, T* out, const Bcast& s, i64 n, i64 op) {
    switch (op) {
        case B_ADD: binary_strided_loop<T, B_ADD>(a, b, out, s, n); break;
        case B_SUB: binary_strided_loop<T, B_SUB>(a, b, out, s, n); break;
        case B_MUL: binary_strided_loop<T, B_MUL>(a, b, out, s, n); break;
        case B_DIV: binary_strided_loop<T, B_DIV>(a, b, out, s, n); break;
        default: break;
    }
}

#define ELEMENTWISE_KERNELS(SFX, T)                                                              \
    extern "C" __global__ void unary_##SFX(const T* x, T* y, i64 n, i64 op, float a, float b) {  \
        unary_impl<T>(x, y, n, op, a, b);                                                        \
    }                                                                                            \
    extern "C" __global__ void unary_backward_##SFX(const T* g, const T* s, T* dx, i64 n,        \
                                                    i64 op, float a, float b) {                  \
        unary_backward_impl<T>(g, s, dx, n, op, a, b);                                           \
    }                                                                                            \
    extern "C" __global__ void binary_##SFX(const T* a, const T* b, T* out, i64 n, i64 op) {     \
        binary_impl<T>(a, b, out, n, op);                                                        \
    }                                                                                            \
    extern "C" __global__ void binary_strided_##SFX(const T* a, const T* b, T* out, Bcast s,     \
                                                    i64 n, i64 op) {                             \
        binary_strided_impl<T>(a, b, out, s, n, op);                                             \
    }

ELEMENTWISE_KERNELS(f32, float)
ELEMENTWISE_KERNELS(bf16, bf16_t)
