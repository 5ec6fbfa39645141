// Indexing and assembly (src/backend/cuda/ops/index.rs, CPU reference src/ops/index.rs).
//
// Pure data movement (cat, index_select, gather forward) works on any dtype through unsigned
// storage types of its size: kernels suffixed _2, _4, _8 (bytes per element), like copy.cu.
// Kernels that add or select floats are suffixed _f32 / _bf16. Index arrays are i64 device
// arrays built on the host by the launcher; masks are u32 device arrays (nonzero = true), read
// through a `Strides` view (zero strides where the mask broadcasts).

// ---------------------------------------------------------------- cat
// One launch per input: src (any strided view, n elements, shape [outer, size_t, inner] in
// logical order) goes to dst[outer, total, inner] at offset dst_off = start_t·inner of each
// outer block. block_len = size_t·inner, dst_block = total·inner.
#define CAT_COPY(NAME, U)                                                                               \
    extern "C" __global__ void NAME(const U* src, Strides s, U* dst, i64 n, i64 block_len, i64 dst_block, \
                                    i64 dst_off) {                                                      \
        GRID_LOOP(i, n) {                                                                               \
            const i64 o = i / block_len, r = i - o * block_len;                                         \
            dst[dst_off + o * dst_block + r] = src[strided_offset(i, s)];                               \
        }                                                                                               \
    }
CAT_COPY(cat_copy_2, unsigned short)
CAT_COPY(cat_copy_4, unsigned int)
CAT_COPY(cat_copy_8, unsigned long long)

// ---------------------------------------------------------------- index_select
// x contiguous [outer, size, inner], idx [k] (each < size) -> out [outer, k, inner].
#define INDEX_SELECT(NAME, U)                                                                            \
    extern "C" __global__ void NAME(const U* x, const i64* idx, U* out, i64 n, i64 size, i64 k, i64 inner) { \
        GRID_LOOP(i, n) {                                                                                \
            const i64 q = i / inner, j = i - q * inner;                                                  \
            const i64 o = q / k, kk = q - o * k;                                                         \
            out[i] = x[(o * size + idx[kk]) * inner + j];                                                \
        }                                                                                                \
    }
INDEX_SELECT(index_select_2, unsigned short)
INDEX_SELECT(index_select_4, unsigned int)
INDEX_SELECT(index_select_8, unsigned long long)

// Backward: dx [outer, size, inner] (every element written, no atomics, deterministic):
// dx[o, s, j] = Σ_{p in starts[s] .. starts[s+1]} g[o, srcs[p], j], where srcs lists, for each
// selected row s in increasing order, the positions kk with idx[kk] = s (CSR built on the host).
template <typename T>
__device__ __forceinline__ void index_select_bwd(const T* g, const i64* starts, const i64* srcs, T* dx, i64 n,
                                                 i64 size, i64 k, i64 inner) {
    GRID_LOOP(i, n) {
        const i64 q = i / inner, j = i - q * inner;
        const i64 o = q / size, s = q - o * size;
        float acc = 0.f;
        for (i64 p = starts[s]; p < starts[s + 1]; ++p) acc += ld(g, (o * k + srcs[p]) * inner + j);
        st(dx, i, acc);
    }
}

// The same sums when few rows are selected (an embedding's gradient: a few thousand ids of a
// 151936-row table): dx is zeroed by a memset first, and only the u distinct selected rows are
// visited: dx[o, rows[r], j] = Σ_{p in seg[r] .. seg[r+1]} g[o, srcs[p], j] for r < u, in the
// dense kernel's order (the same bits). n = outer·u·inner.
// ADD: into a gradient accumulated so far instead of a zeroed dx (autograd's `record_into`, an
// embedding tied to the lm_head): each sum rounded to T as the zeroed dx would hold it, then
// added to dx's value and rounded again, the bits of the two-step dense path (dx + that dx).
__device__ __forceinline__ float round_as(const float*, float v) { return v; }
__device__ __forceinline__ float round_as(const bf16_t*, float v) { return bf2f(f2bf(v)); }

template <typename T, bool ADD>
__device__ __forceinline__ void index_select_bwd_rows(const T* g, const i64* seg, const i64* srcs, const i64* rows,
                                                      T* dx, i64 n, i64 u, i64 size, i64 k, i64 inner) {
    GRID_LOOP(i, n) {
        const i64 q = i / inner, j = i - q * inner;
        const i64 o = q / u, r = q - o * u;
        float acc = 0.f;
        for (i64 p = seg[r]; p < seg[r + 1]; ++p) acc += ld(g, (o * k + srcs[p]) * inner + j);
        const i64 at = (o * size + rows[r]) * inner + j;
        if (ADD) acc = ld(dx, at) + round_as(dx, acc);
        st(dx, at, acc);
    }
}

// ---------------------------------------------------------------- gather
// out[i] = x[src[i]]: src holds the element offset into contiguous x of every output element.
#define GATHER(NAME, U)                                                    \
    extern "C" __global__ void NAME(const U* x, const i64* src, U* out, i64 n) { \
        GRID_LOOP(i, n) { out[i] = x[src[i]]; }                            \
    }
GATHER(gather_2, unsigned short)
GATHER(gather_4, unsigned int)
GATHER(gather_8, unsigned long long)

// Backward into a zero-filled dx: for each distinct destination q < u,
// dx[dst[q]] = Σ_{p in seg[q] .. seg[q+1]} g[order[p]] (positions sorted on the host; no atomics).
template <typename T>
__device__ __forceinline__ void gather_bwd(const T* g, const i64* seg, const i64* order, const i64* dst, T* dx,
                                           i64 u) {
    GRID_LOOP(q, u) {
        float acc = 0.f;
        for (i64 p = seg[q]; p < seg[q + 1]; ++p) acc += ld(g, order[p]);
        st(dx, dst[q], acc);
    }
}

// ---------------------------------------------------------------- where / masked_fill
// out (contiguous, n elements) = mask ? a : b, every operand read through its broadcast view.
template <typename T>
__device__ __forceinline__ void where_fwd(const unsigned int* m, const Strides& ms, const T* a, const Strides& sa,
                                          const T* b, const Strides& sb, T* out, i64 n) {
    GRID_LOOP(i, n) {
        out[i] = m[strided_offset(i, ms)] ? a[strided_offset(i, sa)] : b[strided_offset(i, sb)];
    }
}

// ga = mask ? g : 0, gb = mask ? 0 : g (contiguous, n elements; each written only when wanted).
template <typename T>
__device__ __forceinline__ void where_bwd(const unsigned int* m, const Strides& ms, const T* g, const Strides& gs,
                                          T* ga, T* gb, i64 n, i64 want_a, i64 want_b) {
    GRID_LOOP(i, n) {
        const bool sel = m[strided_offset(i, ms)] != 0u;
        const float v = ld(g, strided_offset(i, gs));
        if (want_a) st(ga, i, sel ? v : 0.f);
        if (want_b) st(gb, i, sel ? 0.f : v);
    }
}

// out (contiguous) = mask ? value : x (x through its view). Also the backward, with value 0.
template <typename T>
__device__ __forceinline__ void masked_fill(const unsigned int* m, const Strides& ms, const T* x, const Strides& xs,
                                            T* out, float value, i64 n) {
    GRID_LOOP(i, n) {
        if (m[strided_offset(i, ms)]) st(out, i, value);
        else out[i] = x[strided_offset(i, xs)];
    }
}

// ---------------------------------------------------------------- masked_scatter
// x, out contiguous, n elements seen as rows of `inner` elements over which the mask is constant.
// rowsrc[r] = the number of set rows before row r when row r is set, else −1: set row r takes
// source elements rowsrc[r]·inner .. +inner (consecutive source elements in row-major order).
template <typename T>
__device__ __forceinline__ void masked_scatter_fwd(const T* x, const i64* rowsrc, const T* src, T* out, i64 n,
                                                   i64 inner) {
    GRID_LOOP(i, n) {
        const i64 r = i / inner, j = i - r * inner;
        const i64 s = rowsrc[r];
        out[i] = s >= 0 ? src[s * inner + j] : x[i];
    }
}

// gx = set ? 0 : g; gsrc[rowsrc[r]·inner + j] = g (gsrc zero-filled first: elements beyond the
// used ones keep 0). Each set element maps to a distinct source element: no races.
template <typename T>
__device__ __forceinline__ void masked_scatter_bwd(const T* g, const i64* rowsrc, T* gx, T* gsrc, i64 n, i64 inner) {
    GRID_LOOP(i, n) {
        const i64 r = i / inner, j = i - r * inner;
        const i64 s = rowsrc[r];
        if (s >= 0) {
            gsrc[s * inner + j] = g[i];
            st(gx, i, 0.f);
        } else {
            gx[i] = g[i];
        }
    }
}

#define INDEX_FLOAT_KERNELS(SFX, T)                                                                                 \
    extern "C" __global__ void index_select_bwd_##SFX(const T* g, const i64* starts, const i64* srcs, T* dx, i64 n, \
                                                      i64 size, i64 k, i64 inner) {                                 \
        index_select_bwd<T>(g, starts, srcs, dx, n, size, k, inner);                                                \
    }                                                                                                               \
    extern "C" __global__ void index_select_bwd_rows_##SFX(const T* g, const i64* seg, const i64* srcs,             \
                                                           const i64* rows, T* dx, i64 n, i64 u, i64 size, i64 k,   \
                                                           i64 inner) {                                             \
        index_select_bwd_rows<T, false>(g, seg, srcs, rows, dx, n, u, size, k, inner);                              \
    }                                                                                                               \
    extern "C" __global__ void index_select_bwd_rows_add_##SFX(const T* g, const i64* seg, const i64* srcs,         \
                                                               const i64* rows, T* dx, i64 n, i64 u, i64 size,      \
                                                               i64 k, i64 inner) {                                  \
        index_select_bwd_rows<T, true>(g, seg, srcs, rows, dx, n, u, size, k, inner);                               \
    }                                                                                                               \
    extern "C" __global__ void gather_bwd_##SFX(const T* g, const i64* seg, const i64* order, const i64* dst, T* dx, \
                                                i64 u) {                                                            \
        gather_bwd<T>(g, seg, order, dst, dx, u);                                                                   \
    }                                                                                                               \
    extern "C" __global__ void where_fwd_##SFX(const unsigned int* m, Strides ms, const T* a, Strides sa, const T* b, \
                                               Strides sb, T* out, i64 n) {                                         \
        where_fwd<T>(m, ms, a, sa, b, sb, out, n);                                                                  \
    }                                                                                                               \
    extern "C" __global__ void where_bwd_##SFX(const unsigned int* m, Strides ms, const T* g, Strides gs, T* ga,      \
                                               T* gb, i64 n, i64 want_a, i64 want_b) {                              \
        where_bwd<T>(m, ms, g, gs, ga, gb, n, want_a, want_b);                                                      \
    }                                                                                                               \
    extern "C" __global__ void masked_fill_##SFX(const unsigned int* m, Strides ms, const T* x, Strides xs, T* out,   \
                                                 float value, i64 n) {                                              \
        masked_fill<T>(m, ms, x, xs, out, value, n);                                                                \
    }                                                                                                               \
    extern "C" __global__ void masked_scatter_fwd_##SFX(const T* x, const i64* rowsrc, const T* src, T* out, i64 n,  \
                                                        i64 inner) {                                                \
        masked_scatter_fwd<T>(x, rowsrc, src, out, n, inner);                                                       \
    }                                                                                                               \
    extern "C" __global__ void masked_scatter_bwd_##SFX(const T* g, const i64* rowsrc, T* gx, T* gsrc, i64 n,        \
                                                        i64 inner) {                                                \
        masked_scatter_bwd<T>(g, rowsrc, gx, gsrc, n, inner);                                                       \
    }

INDEX_FLOAT_KERNELS(f32, float)
INDEX_FLOAT_KERNELS(bf16, bf16_t)
