// Fused SwiGLU (src/backend/cuda/ops/activation.rs, CPU reference src/ops/activation.rs).
// gate (a), up (b), g, out, dgate, dup: contiguous, n elements. s = sigmoid(a):
//   forward:  out = a·s·b  (computed as a / (1 + e^-a) · b, like the CPU op)
//   backward: dup = g·a·s,  dgate = g·b·s·(1 + a·(1 − s))

template <typename T>
__device__ __forceinline__ void swiglu_fwd(const T* a, const T* b, T* out, i64 n) {
    GRID_LOOP(i, n) {
        const float x = ld(a, i);
        st(out, i, x / (1.f + expf(-x)) * ld(b, i));
    }
}

template <typename T>
__device__ __forceinline__ void swiglu_bwd(const T* a, const T* b, const T* g, T* da, T* db, i64 n) {
    GRID_LOOP(i, n) {
        const float x = ld(a, i), y = ld(b, i), gi = ld(g, i);
        const float s = 1.f / (1.f + expf(-x));
        st(db, i, gi * x * s);
        st(da, i, gi * y * s * (1.f + x * (1.f - s)));
    }
}

#define SWIGLU_KERNELS(SFX, T)                                                                             \
    extern "C" __global__ void swiglu_fwd_##SFX(const T* a, const T* b, T* out, i64 n) {                    \
        swiglu_fwd<T>(a, b, out, n);                                                                       \
    }                                                                                                      \
    extern "C" __global__ void swiglu_bwd_##SFX(const T* a, const T* b, const T* g, T* da, T* db, i64 n) {  \
        swiglu_bwd<T>(a, b, g, da, db, n);                                                                 \
    }

SWIGLU_KERNELS(f32, float)
SWIGLU_KERNELS(bf16, bf16_t)
