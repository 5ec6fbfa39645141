// Fused SwiGLU (src/backend/cuda/ops/activation.rs, CPU reference src/ops/activation.rs).
// gate (a), up (b), g, out, dgate, dup: contiguous, n elements. s = sigmoid(a):
//   forward:  out = a·s·b  (computed as a / (1 + e^-a) · b, like the CPU op)
//   backward: dup = g·a·s,  dgate = g·b·s·(1 + a·(1 − s))
//
// Two kernels per direction: `swiglu_*_vec_*` when every pointer is 16-byte aligned (checked by
// the launcher): one thread per 16-byte chunk (8 bf16 or 4 f32, one uint4 load per input and one
// uint4 store per output), the last n % VEC elements done one by one by the first threads of the
// grid; and the scalar `swiglu_*` fallback for misaligned views. Same formulas, f32 math.

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

// ---- the per-element formulas (shared by both kernels) ----
__device__ __forceinline__ float swiglu_f(float x, float y) { return x / (1.f + expf(-x)) * y; }
__device__ __forceinline__ void swiglu_b(float x, float y, float gi, float& dx, float& dy) {
    const float s = 1.f / (1.f + expf(-x));
    dy = gi * x * s;
    dx = gi * y * s * (1.f + x * (1.f - s));
}

// ---- scalar fallback ----
template <typename T>
__device__ __forceinline__ void swiglu_fwd(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out,
                                           i64 n) {
    GRID_LOOP(i, n) { st(out, i, swiglu_f(ld(a, i), ld(b, i))); }
}

template <typename T>
__device__ __forceinline__ void swiglu_bwd(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ g,
                                           T* __restrict__ da, T* __restrict__ db, i64 n) {
    GRID_LOOP(i, n) {
        float dx, dy;
        swiglu_b(ld(a, i), ld(b, i), ld(g, i), dx, dy);
        st(db, i, dy);
        st(da, i, dx);
    }
}

// ---- 16-byte vector path (all pointers 16-byte aligned) ----
template <typename T>
__device__ __forceinline__ void swiglu_fwd_vec(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out,
                                               i64 n) {
    constexpr int V = Vec<T>::N;
    const i64 nv = n / V;
    GRID_LOOP(c, nv) {
        const i64 o = c * V;
        float x[V], y[V];
        ld16(a + o, x);
        ld16(b + o, y);
#pragma unroll
        for (int k = 0; k < V; ++k) x[k] = swiglu_f(x[k], y[k]);
        st16(out + o, x);
    }
    // The n % V tail, one element per thread of the first threads.
    const i64 i = nv * V + (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) st(out, i, swiglu_f(ld(a, i), ld(b, i)));
}

template <typename T>
__device__ __forceinline__ void swiglu_bwd_vec(const T* __restrict__ a, const T* __restrict__ b,
                                               const T* __restrict__ g, T* __restrict__ da, T* __restrict__ db,
                                               i64 n) {
    constexpr int V = Vec<T>::N;
    const i64 nv = n / V;
    GRID_LOOP(c, nv) {
        const i64 o = c * V;
        float x[V], y[V], gi[V];
        ld16(a + o, x);
        ld16(b + o, y);
        ld16(g + o, gi);
#pragma unroll
        for (int k = 0; k < V; ++k) {
            float dx, dy;
            swiglu_b(x[k], y[k], gi[k], dx, dy);
            x[k] = dx;
            y[k] = dy;
        }
        st16(da + o, x);
        st16(db + o, y);
    }
    const i64 i = nv * V + (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float dx, dy;
        swiglu_b(ld(a, i), ld(b, i), ld(g, i), dx, dy);
        st(db, i, dy);
        st(da, i, dx);
    }
}

#define SWIGLU_KERNELS(SFX, T)                                                                             \
    extern "C" __global__ void swiglu_fwd_##SFX(const T* a, const T* b, T* out, i64 n) {                    \
        swiglu_fwd<T>(a, b, out, n);                                                                       \
    }                                                                                                      \
    extern "C" __global__ void swiglu_bwd_##SFX(const T* a, const T* b, const T* g, T* da, T* db, i64 n) {  \
        swiglu_bwd<T>(a, b, g, da, db, n);                                                                 \
    }                                                                                                      \
    extern "C" __global__ void swiglu_fwd_vec_##SFX(const T* a, const T* b, T* out, i64 n) {                \
        swiglu_fwd_vec<T>(a, b, out, n);                                                                   \
    }                                                                                                      \
    extern "C" __global__ void swiglu_bwd_vec_##SFX(const T* a, const T* b, const T* g, T* da, T* db,       \
                                                    i64 n) {                                               \
        swiglu_bwd_vec<T>(a, b, g, da, db, n);                                                             \
    }

SWIGLU_KERNELS(f32, float)
SWIGLU_KERNELS(bf16, bf16_t)
