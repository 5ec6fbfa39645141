// Fused SwiGLU (src/backend/cuda/ops/activation.rs, CPU reference src/ops/activation.rs).
// gate (a), up (b), g, out, dgate, dup: contiguous, n elements. s = sigmoid(a):
//   forward:  out = a·s·b  (computed as a / (1 + e^-a) · b, like the CPU op)
//   backward: dup = g·a·s,  dgate = g·b·s·(1 + a·(1 − s))
//
// Two kernels per direction: `swiglu_*_vec_*` when every pointer is 16-byte aligned (checked by
// the launcher): one thread per 16-byte chunk (8 bf16 or 4 f32, one uint4 load per input and one
// uint4 store per output), the last n % VEC elements done one by one by the first threads of the
// grid; and the scalar `swiglu_*` fallback for misaligned views. Same formulas, f32 math.

// 16-byte vectors: Vec<T>, ld16, st16 (kernels/common.cuh).

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
