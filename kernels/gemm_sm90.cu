// Hopper GEMM (sm_90a): wgmma.mma_async m64n256k16 (bf16 in, f32 accumulate) reading both
// operands from shared memory through matrix descriptors, 128-byte-swizzled tiles filled by
// cp.async in a 3-stage pipeline. Same contract as gemm.cu:
//
//   C[b] (M x N, row stride ldc) = A[b] (M x K, lda) . B[b]^T (B stored N x K, ldb) (+ bias) (+ C)
//
// with K % 8 == 0, lda % 8 == 0, ldb % 8 == 0 and 16-byte aligned A, B. Block tile 128 x 256 x 64,
// 256 threads = 2 warpgroups of 64 rows each; 128 f32 accumulators per thread.
// TESSERA_ARCH_SUFFIX_A  (compile for sm_90a: wgmma needs the arch-specific feature set)

#define W_BM 128
#define W_BN 256
#define W_BK 64
#define W_STAGES 3
#define W_A_BYTES (W_BM * W_BK * 2)
#define W_B_BYTES (W_BN * W_BK * 2)
#define W_STAGE_BYTES (W_A_BYTES + W_B_BYTES)

// Matrix descriptor for a K-major tile with 128-byte swizzle: rows of 128 bytes, 8-row groups
// 1024 bytes apart (stride byte offset), leading byte offset unused (16).
__device__ __forceinline__ unsigned long long wg_desc(unsigned int saddr) {
    unsigned long long d = 0;
    d |= (unsigned long long)((saddr & 0x3FFFF) >> 4);
    d |= (unsigned long long)(16 >> 4) << 16;
    d |= (unsigned long long)(1024 >> 4) << 32;
    d |= 1ull << 62;
    return d;
}

__device__ __forceinline__ void wgmma_256(float* d, unsigned long long da, unsigned long long db) {
    asm volatile(
        "{\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, 1, 1, 1, 0, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(da), "l"(db));
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// One k-tile into stage base `s` (shared-window address), swizzled: the 16-byte chunk c of
// row r goes to chunk c ^ (r & 7) of that row.
__device__ __forceinline__ void wg_load_tile(unsigned int s, const bf16_t* A, const bf16_t* B, i64 M, i64 N, i64 K,
                                             i64 lda, i64 ldb, i64 m0, i64 n0, i64 k0) {
    for (int c = threadIdx.x; c < (W_BM + W_BN) * 8; c += 256) {
        int row = c >> 3, ch = c & 7;
        i64 gk = k0 + ch * 8;
        const bf16_t* src;
        bool ok;
        unsigned int dst;
        if (row < W_BM) {
            i64 gm = m0 + row;
            ok = gm < M && gk < K;
            src = ok ? A + gm * lda + gk : A;
            dst = s + row * 128 + ((ch ^ (row & 7)) << 4);
        } else {
            int r = row - W_BM;
            i64 gn = n0 + r;
            ok = gn < N && gk < K;
            src = ok ? B + gn * ldb + gk : B;
            dst = s + W_A_BYTES + r * 128 + ((ch ^ (r & 7)) << 4);
        }
        int n = ok ? 16 : 0;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
    }
}

extern "C" __global__ void __launch_bounds__(256)
gemm_wgmma_bf16(const bf16_t* A, const bf16_t* B, bf16_t* C, const bf16_t* bias, i64 M, i64 N, i64 K, i64 lda,
                i64 ldb, i64 ldc, i64 batch_a, i64 batch_b, i64 batch_c, i64 flags) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ __align__(1024) unsigned char w_smem[];
    unsigned int base = (smem_addr(w_smem) + 1023u) & ~1023u;  // swizzle needs 1024-byte alignment

    A += (i64)blockIdx.z * batch_a;
    B += (i64)blockIdx.z * batch_b;
    C += (i64)blockIdx.z * batch_c;
    i64 m0 = (i64)blockIdx.y * W_BM, n0 = (i64)blockIdx.x * W_BN;
    int wg = threadIdx.x >> 7;  // warpgroup: rows 64·wg .. 64·wg + 63 of the tile

    float d[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) d[i] = 0.f;

    i64 ktiles = (K + W_BK - 1) / W_BK;
#pragma unroll
    for (int s = 0; s < W_STAGES - 1; ++s) {
        if (s < ktiles) wg_load_tile(base + s * W_STAGE_BYTES, A, B, M, N, K, lda, ldb, m0, n0, (i64)s * W_BK);
        cp_async_commit();
    }
    for (i64 kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<W_STAGES - 2>();
        fence_proxy_async();
        __syncthreads();
        i64 pre = kt + W_STAGES - 1;
        if (pre < ktiles)
            wg_load_tile(base + (unsigned int)(pre % W_STAGES) * W_STAGE_BYTES, A, B, M, N, K, lda, ldb, m0, n0,
                         pre * W_BK);
        cp_async_commit();

        unsigned int sa = base + (unsigned int)(kt % W_STAGES) * W_STAGE_BYTES + wg * 64 * 128;
        unsigned int sb = base + (unsigned int)(kt % W_STAGES) * W_STAGE_BYTES + W_A_BYTES;
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < W_BK / 16; ++kk) wgmma_256(d, wg_desc(sa + kk * 32), wg_desc(sb + kk * 32));
        wg_commit();
        wg_wait0();
    }
    cp_async_wait<0>();

    // Accumulator layout (per warp of the warpgroup, like mma m16n8): d[4j + r] is row
    // 16·warp + g + 8·(r >= 2), column 8j + 2t + (r & 1).
    int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            i64 row = m0 + wg * 64 + warp * 16 + g + ((r >> 1) << 3);
            i64 col = n0 + j * 8 + 2 * t + (r & 1);
            if (row >= M || col >= N) continue;
            float v = d[4 * j + r];
            if (flags & 1) v += bf2f(bias[col]);
            if (flags & 2) v += bf2f(C[row * ldc + col]);
            C[row * ldc + col] = f2bf(v);
        }
    }
#endif
}
