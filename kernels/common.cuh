// Prepended to every kernels/*.cu file by the NVRTC compile step (src/backend/cuda/compile.rs).
// No CUDA headers: NVRTC ships without them on machines that have only the driver and the
// NVRTC library, so bf16 is a raw 16-bit type converted here.
//
// Argument convention (the Rust launchers rely on it): pointers are device addresses passed
// as typed pointers, sizes/strides/counts `i64`, scalars `float`, shape descriptors `Strides`
// by value.

typedef unsigned short bf16_t;
typedef long long i64;

#define MAX_RANK 8
#define NEG_INF __int_as_float(0xff800000)
#define POS_INF __int_as_float(0x7f800000)

// bf16 <-> f32. Round to nearest even; NaN stays NaN.
__device__ __forceinline__ float bf2f(bf16_t x) { return __uint_as_float(((unsigned int)x) << 16); }
__device__ __forceinline__ bf16_t f2bf(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

// Load any storage type as float, store float as any storage type.
__device__ __forceinline__ float ld(const float* p, i64 i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16_t* p, i64 i) { return bf2f(p[i]); }
__device__ __forceinline__ void st(float* p, i64 i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16_t* p, i64 i, float v) { p[i] = f2bf(v); }

// A tensor view: shape and element strides (row-major logical order). `rank` <= MAX_RANK.
struct Strides {
    i64 rank;
    i64 shape[MAX_RANK];
    i64 stride[MAX_RANK];
};

// Element offset of the i-th element in logical row-major order.
__device__ __forceinline__ i64 strided_offset(i64 i, const Strides& s) {
    i64 off = 0;
    for (int d = (int)s.rank - 1; d >= 0; --d) {
        i64 n = s.shape[d];
        off += (i % n) * s.stride[d];
        i /= n;
    }
    return off;
}

// Reductions over a warp and over a block (blockDim.x a multiple of 32, <= 1024).
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Every thread gets the block's sum. `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int nw = (blockDim.x + 31) >> 5;
    v = lane < nw ? scratch[lane] : 0.f;
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int nw = (blockDim.x + 31) >> 5;
    v = lane < nw ? scratch[lane] : NEG_INF;
    return warp_max(v);
}

// Grid-stride loop over n items.
#define GRID_LOOP(i, n) \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

// ---- sm_80+ building blocks for the tensor-core kernels (gemm.cu, flash.cu) ----

__device__ __forceinline__ unsigned int smem_addr(const void* p) {
    unsigned int a;
    asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16-byte async copy global -> shared; `valid` false zero-fills the destination.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    unsigned int s = smem_addr(smem);
    int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void mma_bf16_16816(float* d, const unsigned int* a, const unsigned int* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two adjacent bf16 values as one 32-bit register (low half = p[0]).
__device__ __forceinline__ unsigned int ld_pair(const bf16_t* p) { return *reinterpret_cast<const unsigned int*>(p); }
__device__ __forceinline__ unsigned int pack_bf16(float lo, float hi) {
    return (unsigned int)f2bf(lo) | ((unsigned int)f2bf(hi) << 16);
}
