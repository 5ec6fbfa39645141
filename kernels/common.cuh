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

// ldmatrix: four 8x8 bf16 matrices from shared memory, one instruction. Lane l gives the address
// of row l % 8 of matrix l / 8 (16-byte aligned); r[i] receives matrix i in the mma fragment
// layout (lane holds row lane / 4, elements 2 (lane % 4) and + 1). The .trans form transposes
// each matrix on the way (a B operand stored [k][n] becomes the fragment an [n][k] one gives).
// For m16n8k16 with a row stride of `ld` elements:
//   A 16x16 at p (rows m, k contiguous):          ldsm_x4(a, p + (l & 15) * ld + (l >> 4) * 8)
//   B of two n-blocks, stored [n][k] at p:        ldsm_x4(b, p + ((l & 7) + (l >> 4) * 8) * ld + ((l >> 3) & 1) * 8)
//                                                 -> {b[0], b[1]} n 0..7, {b[2], b[3]} n 8..15
//   B of two n-blocks, stored [k][n] at p:        ldsm_x4_t(b, p + (l & 15) * ld + (l >> 4) * 8)
//                                                 -> {b[0], b[1]} n 0..7, {b[2], b[3]} n 8..15
// The address forms take a 32-bit shared-memory byte address (smem_addr): in register-bound
// loops, generic pointers cost 64-bit address registers.
__device__ __forceinline__ void ldsm_x4(unsigned int* r, unsigned int a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned int* r, unsigned int a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldsm_x4(unsigned int* r, const bf16_t* p) { ldsm_x4(r, smem_addr(p)); }
__device__ __forceinline__ void ldsm_x4_t(unsigned int* r, const bf16_t* p) { ldsm_x4_t(r, smem_addr(p)); }

// Two adjacent bf16 values as one 32-bit register (low half = p[0]).
__device__ __forceinline__ unsigned int ld_pair(const bf16_t* p) { return *reinterpret_cast<const unsigned int*>(p); }
__device__ __forceinline__ unsigned int pack_bf16(float lo, float hi) {
    return (unsigned int)f2bf(lo) | ((unsigned int)f2bf(hi) << 16);
}

// ---- 16-byte vectors of f32 (4) or bf16 (8) values, unpacked to / packed from floats ----
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

template <typename T>
__device__ __forceinline__ void unpack16(const uint4& u, float* f);
template <>
__device__ __forceinline__ void unpack16<float>(const uint4& u, float* f) {
    f[0] = __uint_as_float(u.x);
    f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z);
    f[3] = __uint_as_float(u.w);
}
template <>
__device__ __forceinline__ void unpack16<bf16_t>(const uint4& u, float* f) {
    f[0] = __uint_as_float(u.x << 16);
    f[1] = __uint_as_float(u.x & 0xffff0000u);
    f[2] = __uint_as_float(u.y << 16);
    f[3] = __uint_as_float(u.y & 0xffff0000u);
    f[4] = __uint_as_float(u.z << 16);
    f[5] = __uint_as_float(u.z & 0xffff0000u);
    f[6] = __uint_as_float(u.w << 16);
    f[7] = __uint_as_float(u.w & 0xffff0000u);
}

template <typename T>
__device__ __forceinline__ uint4 pack16(const float* f);
template <>
__device__ __forceinline__ uint4 pack16<float>(const float* f) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
}
template <>
__device__ __forceinline__ uint4 pack16<bf16_t>(const float* f) {
    return make_uint4(pack_bf16(f[0], f[1]), pack_bf16(f[2], f[3]), pack_bf16(f[4], f[5]), pack_bf16(f[6], f[7]));
}

// Load Vec<T>::N values from a 16-byte aligned p (the rope and swiglu kernels' form).
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

// ---- fast math and stores of the memory-bound row kernels (reduce.cu, loss.cu, rope.cu) ----

#define LOG2E_F 1.4426950408889634f

// 2^x with one MUFU.EX2 (max relative error about 2 ulp; results below 2^-126 flush to 0;
// 2^-inf = 0, 2^NaN = NaN). e^{x - m} is fast_exp2(fmaf(x, LOG2E_F, -m * LOG2E_F)): the
// product is exact inside the fma, so the only extra error is the rounding of m * log2(e).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// 2^x on the FMA and integer pipes, no MUFU (FlashAttention-4's trick, for kernels whose
// exponentials keep the 16 MUFU a clock per SM busy): x rounded to an integer n by the 1.5·2^23
// addition (n in t's low mantissa bits), 2^f for f = x − n in [−0.5, 0.5] by a degree-5
// polynomial (relative error ≤ 2.4e-7, about 2 ulp, as ex2.approx), and n added to the
// exponent. Below 2^-125 it returns 0 (as ex2.approx.ftz for x < −126; −inf gives 0), and a NaN
// is returned as it came (the bit trick would turn the canonical 0x7fffffff into FLT_MAX).
// Domain: x < 128 (the exponent add overflows from 128, where ex2.approx gives +inf); its
// callers pass x <= 0 (logits less their row maximum). 12 instructions against one MUFU.EX2.
__device__ __forceinline__ float poly_exp2(float x) {
    const float xc = x < -125.f ? -125.f : x;  // a comparison, so a NaN passes through
    const float t = xc + 12582912.f;
    const float n = t - 12582912.f;
    const float f = xc - n;
    float p = fmaf(0.001327647129073739f, f, 0.009675540961325169f);
    p = fmaf(p, f, 0.05550713092088699f);
    p = fmaf(p, f, 0.24022120237350464f);
    p = fmaf(p, f, 0.6931469440460205f);
    p = fmaf(p, f, 1.0000001192092896f);
    // Unsigned: t's bits shifted left by 23 overflow a signed int (the same bits, defined).
    const float r = __uint_as_float(__float_as_uint(p) + (__float_as_uint(t) << 23));
    return x < -125.f ? 0.f : (x != x ? x : r);
}

// pack_bf16 in one instruction on sm_80+ (cvt.rn.bf16x2.f32: round to nearest even, the same
// bits as f2bf except that every NaN becomes the canonical 0x7fff).
__device__ __forceinline__ unsigned int pack_bf16_rn(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned int r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return pack_bf16(lo, hi);
#endif
}

// The A fragment (16 x 16 of an m16n8k16 product, or a warp's 16 rows of a wgmma's register A)
// made of two adjacent n-blocks of accumulators: lo holds k 0..7, hi k 8..15. One product's
// output (flash attention's P, dS) feeds the next product straight from registers.
__device__ __forceinline__ void fa_acc_to_a(unsigned int* a, const float* lo, const float* hi) {
    a[0] = pack_bf16_rn(lo[0], lo[1]);
    a[1] = pack_bf16_rn(lo[2], lo[3]);
    a[2] = pack_bf16_rn(hi[0], hi[1]);
    a[3] = pack_bf16_rn(hi[2], hi[3]);
}

// Vec<T>::N floats stored as one 16-byte vector at the 16-byte aligned p (pack_bf16_rn for bf16).
__device__ __forceinline__ void st16_rn(float* p, const float* f) { st16(p, f); }
__device__ __forceinline__ void st16_rn(bf16_t* p, const float* f) {
    st_v4(p, pack_bf16_rn(f[0], f[1]), pack_bf16_rn(f[2], f[3]), pack_bf16_rn(f[4], f[5]), pack_bf16_rn(f[6], f[7]));
}

// A 16-byte vector of -inf values of T (padding that leaves a max and a sum of exps unchanged).
template <typename T>
__device__ __forceinline__ uint4 neg_inf16();
template <>
__device__ __forceinline__ uint4 neg_inf16<float>() {
    return make_uint4(0xff800000u, 0xff800000u, 0xff800000u, 0xff800000u);
}
template <>
__device__ __forceinline__ uint4 neg_inf16<bf16_t>() {
    return make_uint4(0xff80ff80u, 0xff80ff80u, 0xff80ff80u, 0xff80ff80u);
}

// Column sums in two passes (linear's bias gradient, rmsnorm's weight gradient): pass 1 writes
// the f32 sums of chunks of rows, partial[c, j]; pass 2 adds them.
//
// Pass 1 with one 16-byte vector (Vec<T>::N columns) per thread: partial[c, j] = Σ over rows r
// of chunk c of g[r, j], or of g[r, j]·x[r, j]·rstd[r] when SCALED (rmsnorm's weight
// gradient). g, x: contiguous [rows, d], d a multiple of N, 16-byte aligned. grid
// (ceil((d / N) / blockDim.x), chunks); chunk c covers rows [c·rows_per_chunk, ...).
template <typename T, bool SCALED>
__device__ __forceinline__ void col_partials_vec(const T* g, const T* x, const float* rstd, float* partial, i64 rows,
                                                 i64 d, i64 rows_per_chunk) {
    constexpr int N = Vec<T>::N;
    const i64 nv = d / N;
    const i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= nv) return;
    const i64 c = blockIdx.y;
    const i64 r0 = c * rows_per_chunk;
    const i64 r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
    const uint4* gv = reinterpret_cast<const uint4*>(g);
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    float acc[N];
#pragma unroll
    for (int e = 0; e < N; ++e) acc[e] = 0.f;
#pragma unroll 4
    for (i64 r = r0; r < r1; ++r) {
        float gf[N];
        unpack16<T>(gv[r * nv + j], gf);
        if (SCALED) {
            float xf[N];
            unpack16<T>(xv[r * nv + j], xf);
            const float rs = rstd[r];
#pragma unroll
            for (int e = 0; e < N; ++e) acc[e] += gf[e] * xf[e] * rs;
        } else {
#pragma unroll
            for (int e = 0; e < N; ++e) acc[e] += gf[e];
        }
    }
    float* out = partial + c * d + j * N;
#pragma unroll
    for (int e = 0; e < N; ++e) out[e] = acc[e];
}

// Pass 2: grid ceil(d / 32), block (32, 8): warp w sums chunks w, w + 8, ... of its 32
// columns, then warp 0 adds the 8 sums in order. Deterministic, and 8 loads in flight per
// column where one thread per column walked every chunk in turn.
template <typename T>
__device__ __forceinline__ void col_partials_sum(const float* __restrict__ partial, T* __restrict__ out, i64 chunks,
                                                 i64 d) {
    __shared__ float s[8][33];
    const i64 j = (i64)blockIdx.x * 32 + threadIdx.x;
    float acc = 0.f;
    if (j < d)
        for (i64 c = threadIdx.y; c < chunks; c += 8) acc += partial[c * d + j];
    s[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && j < d) {
        float t = 0.f;
#pragma unroll
        for (int w = 0; w < 8; ++w) t += s[w][threadIdx.x];
        st(out, j, t);
    }
}
