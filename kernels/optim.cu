// Optimiser kernels: fused AdamW and SGD steps on f32 master weights, and the global gradient
// norm of clip_grad_norm (two-pass, deterministic, accumulated in f64 like the CPU path).
//
// The update arithmetic matches src/optim/{adamw,sgd}.rs operation for operation in f32, with
// explicitly rounded intrinsics (no FMA contraction), so CUDA and CPU steps agree bit for bit.
// The scalars are computed on the host in f64 and rounded once to f32.

// AdamW (torch semantics), contiguous f32 p, m, v and g (f32, or bf16: the gradient of a bf16
// compute copy, converted as it is read, exactly as a cast kernel would) of n elements:
//   p *= decay (decoupled; decay = 1 - lr*wd, skipped when has_decay == 0)
//   m  = m + (1 - b1) (g - m);   v = v b2 + (1 - b2) g g
//   p  = p + neg_step * m / (sqrt(v) / sqrt(bc2) + eps)
// copy (null: none): the bf16 compute copy of p (mixed precision), written as the cast kernel
// rounds it, so the next forward needs no cast pass.
// The update of one element in registers: p, m, v from the gradient g.
__device__ __forceinline__ void adamw_reg(float& p, float& m, float& v, float g, bool has_decay, float decay,
                                          float one_minus_beta1, float beta2, float one_minus_beta2, float bc2_sqrt,
                                          float eps, float neg_step) {
    float pi = p;
    if (has_decay) pi = __fmul_rn(pi, decay);
    const float mi = __fadd_rn(m, __fmul_rn(one_minus_beta1, __fsub_rn(g, m)));
    const float vi = __fadd_rn(__fmul_rn(v, beta2), __fmul_rn(__fmul_rn(one_minus_beta2, g), g));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
    m = mi;
    v = vi;
    p = __fadd_rn(pi, __fdiv_rn(__fmul_rn(neg_step, mi), denom));
}

// One element of the update (i): reads p, m, v and the gradient gi, writes p, m, v and the copy.
__device__ __forceinline__ void adamw_elem(float* p, float* m, float* v, bf16_t* copy, i64 i, float gi,
                                           bool has_decay, float decay, float one_minus_beta1, float beta2,
                                           float one_minus_beta2, float bc2_sqrt, float eps, float neg_step) {
    float pi = p[i], mi = m[i], vi = v[i];
    adamw_reg(pi, mi, vi, gi, has_decay, decay, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step);
    m[i] = mi;
    v[i] = vi;
    p[i] = pi;
    if (copy != nullptr) copy[i] = f2bf(pi);
}

#define ADAMW_KERNEL(name, G)                                                                                     \
    extern "C" __global__ void name(float* p, const G* g, float* m, float* v, i64 n, i64 has_decay, float decay, \
                                    float one_minus_beta1, float beta2, float one_minus_beta2, float bc2_sqrt,   \
                                    float eps, float neg_step, bf16_t* copy) {                                  \
        GRID_LOOP(i, n) {                                                                                       \
            adamw_elem(p, m, v, copy, i, ld(g, i), has_decay != 0, decay, one_minus_beta1, beta2,               \
                       one_minus_beta2, bc2_sqrt, eps, neg_step);                                               \
        }                                                                                                       \
    }
ADAMW_KERNEL(adamw_f32, float)
ADAMW_KERNEL(adamw_f32_gbf16, bf16_t)

// Multi-tensor AdamW: one launch updates every tensor of a table (the optimiser's CUDA
// parameters), with the per-element arithmetic above, so the results equal the per-tensor
// kernels' bit for bit. Block b works on ADAMW_MULTI_ELEMS elements of the last tensor whose
// first_block <= b (found by binary search: first_block is the running sum of each tensor's
// ceil(n / ADAMW_MULTI_ELEMS)). flags: 1 = weight decay, 2 = the gradient is bf16. The layout
// matches `AdamWTensor` in src/backend/cuda/ops/optim.rs.
struct AdamWTensor {
    float* p;
    const void* g;
    float* m;
    float* v;
    bf16_t* copy;  // null: none
    i64 n;
    i64 first_block;
    float decay;
    float neg_step;
    float bc2_sqrt;
    int flags;
};
static_assert(sizeof(AdamWTensor) == 72, "AdamWTensor matches the host's layout");
#define ADAMW_MULTI_ELEMS 8192

// Elements [start, end) of tensor t, start a multiple of 4: 16-byte loads and stores of p, m
// and v (8-byte ones of a bf16 gradient and the copy), 4 elements a thread, when every pointer
// is 16-byte aligned; the same per-element arithmetic either way.
template <bool GB>
__device__ __forceinline__ void adamw_multi_range(const AdamWTensor& t, i64 start, i64 end, float one_minus_beta1,
                                                  float beta2, float one_minus_beta2, float eps) {
    const bool decay = t.flags & 1;
    const unsigned long long any = (unsigned long long)t.p | (unsigned long long)t.m | (unsigned long long)t.v |
                                   (unsigned long long)t.g | (unsigned long long)t.copy;
    i64 tail = start;
    if ((any & 15) == 0) {
        const i64 quads = (end - start) >> 2;
        for (i64 j = threadIdx.x; j < quads; j += blockDim.x) {
            const i64 i = start + 4 * j;
            float4 p4 = *reinterpret_cast<const float4*>(t.p + i);
            float4 m4 = *reinterpret_cast<const float4*>(t.m + i);
            float4 v4 = *reinterpret_cast<const float4*>(t.v + i);
            float g[4];
            if (GB) {
                const uint2 r = *reinterpret_cast<const uint2*>((const bf16_t*)t.g + i);
                g[0] = bf2f((bf16_t)(r.x & 0xffffu));
                g[1] = bf2f((bf16_t)(r.x >> 16));
                g[2] = bf2f((bf16_t)(r.y & 0xffffu));
                g[3] = bf2f((bf16_t)(r.y >> 16));
            } else {
                const float4 r = *reinterpret_cast<const float4*>((const float*)t.g + i);
                g[0] = r.x;
                g[1] = r.y;
                g[2] = r.z;
                g[3] = r.w;
            }
            adamw_reg(p4.x, m4.x, v4.x, g[0], decay, t.decay, one_minus_beta1, beta2, one_minus_beta2, t.bc2_sqrt, eps,
                      t.neg_step);
            adamw_reg(p4.y, m4.y, v4.y, g[1], decay, t.decay, one_minus_beta1, beta2, one_minus_beta2, t.bc2_sqrt, eps,
                      t.neg_step);
            adamw_reg(p4.z, m4.z, v4.z, g[2], decay, t.decay, one_minus_beta1, beta2, one_minus_beta2, t.bc2_sqrt, eps,
                      t.neg_step);
            adamw_reg(p4.w, m4.w, v4.w, g[3], decay, t.decay, one_minus_beta1, beta2, one_minus_beta2, t.bc2_sqrt, eps,
                      t.neg_step);
            *reinterpret_cast<float4*>(t.p + i) = p4;
            *reinterpret_cast<float4*>(t.m + i) = m4;
            *reinterpret_cast<float4*>(t.v + i) = v4;
            if (t.copy != nullptr)
                *reinterpret_cast<uint2*>(t.copy + i) = make_uint2(pack_bf16(p4.x, p4.y), pack_bf16(p4.z, p4.w));
        }
        tail = start + 4 * quads;
    }
    for (i64 i = tail + threadIdx.x; i < end; i += blockDim.x) {
        const float gi = GB ? bf2f(((const bf16_t*)t.g)[i]) : ((const float*)t.g)[i];
        adamw_elem(t.p, t.m, t.v, t.copy, i, gi, decay, t.decay, one_minus_beta1, beta2, one_minus_beta2, t.bc2_sqrt,
                   eps, t.neg_step);
    }
}

extern "C" __global__ void adamw_multi_f32(const AdamWTensor* ts, int count, float one_minus_beta1, float beta2,
                                           float one_minus_beta2, float eps) {
    const i64 b = blockIdx.x;
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (ts[mid].first_block <= b) lo = mid;
        else hi = mid - 1;
    }
    const AdamWTensor t = ts[lo];
    const i64 start = (b - t.first_block) * ADAMW_MULTI_ELEMS;
    const i64 end = min(start + (i64)ADAMW_MULTI_ELEMS, t.n);
    if (t.flags & 2) adamw_multi_range<true>(t, start, end, one_minus_beta1, beta2, one_minus_beta2, eps);
    else adamw_multi_range<false>(t, start, end, one_minus_beta1, beta2, one_minus_beta2, eps);
}

// SGD (torch semantics), contiguous f32 p, g (and buf when momentum is used):
//   d = g + wd p (when has_wd);  buf = first ? d : buf * mu + (1 - tau) d
//   d = nesterov ? d + mu buf : buf;   p = p + neg_lr d
// buf == nullptr: plain SGD (p = p + neg_lr d).
extern "C" __global__ void sgd_f32(float* p, const float* g, float* buf, i64 n, i64 has_wd, float wd,
                                   float momentum, float one_minus_dampening, float neg_lr, i64 nesterov,
                                   i64 first) {
    GRID_LOOP(i, n) {
        float d = g[i];
        if (has_wd) d = __fadd_rn(d, __fmul_rn(wd, p[i]));
        if (buf != nullptr) {
            const float b = first ? d : __fadd_rn(__fmul_rn(buf[i], momentum), __fmul_rn(one_minus_dampening, d));
            buf[i] = b;
            d = nesterov ? __fadd_rn(d, __fmul_rn(momentum, b)) : b;
        }
        p[i] = __fadd_rn(p[i], __fmul_rn(neg_lr, d));
    }
}

// ---------------------------------------------------------------- gradient norm
__device__ __forceinline__ double warp_sum_f64(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum of a block's values (blockDim.x a multiple of 32, <= 1024); valid in thread 0.
__device__ __forceinline__ double block_sum_f64(double v) {
    __shared__ double scratch[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum_f64(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const int nw = (blockDim.x + 31) >> 5;
    v = (warp == 0 && lane < nw) ? scratch[lane] : 0.0;
    if (warp == 0) v = warp_sum_f64(v);
    return v;
}

// Pass 1: partial[blockIdx.x] = sum over this block's grid-stride elements of x^2 (f64).
template <typename T>
__device__ __forceinline__ void sumsq_partial(const T* __restrict__ x, i64 n, double* __restrict__ partial) {
    double s = 0.0;
    GRID_LOOP(i, n) {
        const double xi = (double)ld(x, i);
        s += xi * xi;
    }
    s = block_sum_f64(s);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
extern "C" __global__ void sumsq_partial_f32(const float* x, i64 n, double* partial) {
    sumsq_partial<float>(x, n, partial);
}
extern "C" __global__ void sumsq_partial_bf16(const bf16_t* x, i64 n, double* partial) {
    sumsq_partial<bf16_t>(x, n, partial);
}

// Pass 2 (one block): out[0] = sum of partial[0..n).
extern "C" __global__ void sumsq_final(const double* partial, i64 n, double* out) {
    double s = 0.0;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) s += partial[i];
    s = block_sum_f64(s);
    if (threadIdx.x == 0) out[0] = s;
}

// y = x * c (the clipped gradient; c already rounded to the dtype on the host), contiguous.
template <typename T>
__device__ __forceinline__ void scale_copy(const T* __restrict__ x, T* __restrict__ y, float c, i64 n) {
    GRID_LOOP(i, n) { st(y, i, __fmul_rn(ld(x, i), c)); }
}
extern "C" __global__ void grad_scale_f32(const float* x, float* y, float c, i64 n) {
    scale_copy<float>(x, y, c, n);
}
extern "C" __global__ void grad_scale_bf16(const bf16_t* x, bf16_t* y, float c, i64 n) {
    scale_copy<bf16_t>(x, y, c, n);
}
