//! cuBLAS, the reference the hand-written GEMM is measured against, never the default:
//! `--gemm cublas` (or `TESSERA_GEMM=cublas`) sends every product `Tensor::matmul` and `linear`
//! can express to `cublasGemmEx` / `cublasGemmStridedBatchedEx` instead of kernels/gemm*.cu, so
//! one run gives the ratio of a product, or of the whole training step, to cuBLAS on the same
//! card. The calls are PyTorch's for `torch.matmul`: f32 accumulation (`CUBLAS_COMPUTE_32F`),
//! the default algorithm, a 32 MiB workspace. libcublas is loaded at run time like the driver;
//! without it choosing cuBLAS is an error that says so, never a panic.

use super::{device, CudaBuffer};
use crate::{DType, Error, Result};
use cudarc::cublas::sys;
use std::ffi::c_void;
use std::sync::OnceLock;

/// The process's handle, bound to the device's stream, with its workspace.
pub(crate) struct Handle {
    raw: sys::cublasHandle_t,
    _workspace: CudaBuffer,
    /// cublasGetVersion's number (major·10000 + minor·100 + patch).
    version: i32,
}

// SAFETY: the handle is only used on the device's single stream, whose work is ordered by the
// driver; cuBLAS handles may be used from any thread with the context current (`device()`).
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

/// cuBLAS's workspace: PyTorch's default on Hopper (CUBLAS_WORKSPACE_CONFIG=:4096:8).
const WORKSPACE_BYTES: usize = 32 << 20;

fn check(what: &str, status: sys::cublasStatus_t) -> Result<()> {
    match status {
        sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(()),
        s => Err(Error::msg(format!("cublas: {what}: {s:?}"))),
    }
}

/// The handle, made on first use; the error (no libcublas, no device) is remembered.
pub(crate) fn handle() -> Result<&'static Handle> {
    static H: OnceLock<std::result::Result<Handle, String>> = OnceLock::new();
    H.get_or_init(|| {
        let make = || -> Result<Handle> {
            let dev = device()?;
            // SAFETY: only probes whether the shared library can be opened.
            if !unsafe { sys::is_culib_present() } {
                return Err(Error::msg(
                    "cublas: libcublas.so could not be loaded (cuBLAS is the GEMM benchmark \
                     reference; put the CUDA toolkit's lib64 on LD_LIBRARY_PATH)",
                ));
            }
            let workspace = dev.alloc(WORKSPACE_BYTES)?;
            let mut raw: sys::cublasHandle_t = std::ptr::null_mut();
            // SAFETY: creates a fresh handle on the current (primary) context.
            check("cublasCreate", unsafe { sys::cublasCreate_v2(&mut raw) })?;
            let mut version = 0;
            // SAFETY: the handle made above, given the device's stream and a workspace that
            // lives as long as the handle (the process). The version is read first: a library
            // older than cuBLAS 11.2 (CUDA 11.0 update 1) has no cublasSetWorkspace_v2 (cudarc's
            // loader would panic on the missing symbol), and one before 11 no
            // CUBLAS_COMPUTE_32F.
            let setup = unsafe {
                check(
                    "cublasGetVersion",
                    sys::cublasGetVersion_v2(raw, &mut version),
                )
                .and_then(|()| match version {
                    v if v < 110200 => Err(Error::msg(format!(
                        "cublas: libcublas {v} is older than 11.2 (put a newer CUDA toolkit's \
                         lib64 first on LD_LIBRARY_PATH)"
                    ))),
                    _ => Ok(()),
                })
                .and_then(|()| {
                    check(
                        "cublasSetStream",
                        sys::cublasSetStream_v2(raw, dev.stream as sys::cudaStream_t),
                    )
                })
                .and_then(|()| {
                    check(
                        "cublasSetWorkspace",
                        sys::cublasSetWorkspace_v2(
                            raw,
                            workspace.ptr() as *mut c_void,
                            WORKSPACE_BYTES,
                        ),
                    )
                })
            };
            if let Err(e) = setup {
                // SAFETY: the handle made above, used by nothing else.
                unsafe { sys::cublasDestroy_v2(raw) };
                return Err(e);
            }
            Ok(Handle {
                raw,
                _workspace: workspace,
                version,
            })
        };
        make().map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| Error::Msg(e.clone()))
}

/// The version of the libcublas loaded (major·10000 + minor·100 + patch): which library the
/// reference numbers come from.
pub fn version() -> Result<i32> {
    Ok(handle()?.version)
}

/// A matrix operand as tessera views it: `rows` x `cols`, element (r, c) at `r·rs + c·cs`
/// elements from its first, and `batch` elements between the products of a batch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
    pub batch: usize,
}

/// How cuBLAS (column-major) reads `m`'s transpose: op(X) = mᵀ with X column-major of leading
/// dimension `ld`. Row-major m (cs = 1) is mᵀ column-major as stored (N); column-major m
/// (rs = 1) is X = m (T). None for any other layout (a broadcast row, a strided view).
pub(crate) fn transposed(m: &Mat) -> Option<(sys::cublasOperation_t, usize)> {
    let (r, c) = (m.rows.max(1), m.cols.max(1));
    if (m.cs == 1 || c == 1) && (m.rs >= c || r == 1) {
        return Some((
            sys::cublasOperation_t::CUBLAS_OP_N,
            if r == 1 { c } else { m.rs },
        ));
    }
    if (m.rs == 1 || r == 1) && (m.cs >= r || c == 1) {
        return Some((
            sys::cublasOperation_t::CUBLAS_OP_T,
            if c == 1 { r } else { m.cs },
        ));
    }
    None
}

fn data_type(dtype: DType) -> Option<sys::cudaDataType> {
    match dtype {
        DType::BF16 => Some(sys::cudaDataType::CUDA_R_16BF),
        DType::F16 => Some(sys::cudaDataType::CUDA_R_16F),
        DType::F32 => Some(sys::cudaDataType::CUDA_R_32F),
        _ => None,
    }
}

/// The column-major call that computes row-major C [m, n] = A B for a batch of `count`
/// products: row-major C is column-major Cᵀ = Bᵀ Aᵀ, so cuBLAS's first operand is our B and
/// its second our A, and its (m, n) are our (n, m); C's leading dimension is n, and C's
/// products are m·n elements apart.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Call {
    pub ty: sys::cudaDataType,
    pub op_first: sys::cublasOperation_t,
    pub op_second: sys::cublasOperation_t,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub ld_first: i32,
    pub ld_second: i32,
    pub ldc: i32,
    pub stride_first: i64,
    pub stride_second: i64,
    pub stride_c: i64,
    pub count: i32,
}

/// `Call` for `count` products of A (`a.rows` x `a.cols`) times B (`b.cols` wide) in `dtype`;
/// None when cuBLAS cannot take them: a dtype other than bf16, f16 or f32, an operand layout
/// it does not read (see `transposed`), K = 0, a size past its 32-bit arguments, or a batch
/// that repeats an operand (stride 0). The caller's kernels run those.
pub(crate) fn call_for(dtype: DType, a: &Mat, b: &Mat, count: usize) -> Option<Call> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if k == 0 || (count > 1 && (a.batch == 0 || b.batch == 0)) {
        return None;
    }
    let ((op_first, ld_first), (op_second, ld_second)) = (transposed(b)?, transposed(a)?);
    let int = |v: usize| i32::try_from(v).ok();
    let long = |v: usize| i64::try_from(v).ok();
    Some(Call {
        ty: data_type(dtype)?,
        op_first,
        op_second,
        m: int(n)?,
        n: int(m)?,
        k: int(k)?,
        ld_first: int(ld_first)?,
        ld_second: int(ld_second)?,
        ldc: int(n.max(1))?,
        stride_first: long(b.batch)?,
        stride_second: long(a.batch)?,
        stride_c: long(m * n)?,
        count: int(count)?,
    })
}

/// Issues `call` (`call_for`) on A at `a`, B at `b` and C at `c`: C = A B, or C += A B when
/// `accumulate`.
pub(crate) fn gemm(call: &Call, a: u64, b: u64, c: u64, accumulate: bool) -> Result<()> {
    let h = handle()?.raw;
    let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
    let (alpha, beta) = (
        &alpha as *const f32 as *const c_void,
        &beta as *const f32 as *const c_void,
    );
    let compute = sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
    let algo = sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
    let (ap, bp, cp) = (a as *const c_void, b as *const c_void, c as *mut c_void);
    let Call {
        ty,
        op_first,
        op_second,
        m,
        n,
        k,
        ld_first,
        ld_second,
        ldc,
        stride_first,
        stride_second,
        stride_c,
        count,
    } = *call;
    // In our terms: `count` products of [n, k] times [k, m].
    let us = |v: i32| v as usize;
    super::gemm_tc::note_product(us(n), us(m), us(k), us(count));
    device()?.recorded("cublas_gemm", super::take_note(), || {
        // SAFETY: the operands are live device allocations laid out as `transposed` read them
        // (leading dimensions checked there), C holds count·m·n elements, alpha and beta outlive
        // the call (cuBLAS reads host scalars before it returns).
        let status = unsafe {
            if count == 1 {
                // One product: the call torch.matmul makes.
                sys::cublasGemmEx(
                    h, op_first, op_second, m, n, k, alpha, bp, ty, ld_first, ap, ty, ld_second,
                    beta, cp, ty, ldc, compute, algo,
                )
            } else {
                sys::cublasGemmStridedBatchedEx(
                    h,
                    op_first,
                    op_second,
                    m,
                    n,
                    k,
                    alpha,
                    bp,
                    ty,
                    ld_first,
                    stride_first,
                    ap,
                    ty,
                    ld_second,
                    stride_second,
                    beta,
                    cp,
                    ty,
                    ldc,
                    stride_c,
                    count,
                    compute,
                    algo,
                )
            }
        };
        check(&format!("gemm {n}x{k}x{m} (batch {count}, {ty:?})"), status)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sys::cublasOperation_t::{CUBLAS_OP_N as N, CUBLAS_OP_T as T};

    fn mat(rows: usize, cols: usize, rs: usize, cs: usize) -> Mat {
        Mat {
            rows,
            cols,
            rs,
            cs,
            batch: 0,
        }
    }

    /// The column-major reading of each layout a product meets: row-major and transposed views,
    /// padded rows, single rows and columns; broadcast and strided views refused.
    #[test]
    fn operands_map_to_column_major() {
        assert_eq!(transposed(&mat(4, 6, 6, 1)), Some((N, 6)), "row-major");
        assert_eq!(transposed(&mat(4, 6, 8, 1)), Some((N, 8)), "padded rows");
        assert_eq!(
            transposed(&mat(4, 6, 1, 4)),
            Some((T, 4)),
            "a transposed view"
        );
        assert_eq!(transposed(&mat(4, 6, 1, 5)), Some((T, 5)));
        assert_eq!(transposed(&mat(1, 6, 0, 1)), Some((N, 6)), "one row");
        assert_eq!(transposed(&mat(4, 1, 1, 0)), Some((N, 1)), "one column");
        assert_eq!(
            transposed(&mat(4, 1, 3, 0)),
            Some((N, 3)),
            "a strided column"
        );
        assert_eq!(transposed(&mat(1, 6, 0, 2)), Some((T, 2)), "a strided row");
        assert_eq!(transposed(&mat(4, 6, 0, 1)), None, "a broadcast row");
        assert_eq!(transposed(&mat(4, 6, 12, 2)), None, "every other column");
        assert_eq!(transposed(&mat(4, 6, 4, 1)), None, "rows overlap");
    }

    /// cuBLAS's column-major semantics on the host: C (m x n, leading dimension ldc) =
    /// op(first) op(second), each operand element (r, c) read as its op says.
    fn emulate(call: &Call, first: &[f64], second: &[f64]) -> Vec<f64> {
        let (m, n, k) = (call.m as usize, call.n as usize, call.k as usize);
        let at = |buf: &[f64], op, ld: i32, r: usize, c: usize| {
            let ld = ld as usize;
            if op == N {
                buf[r + c * ld]
            } else {
                buf[c + r * ld]
            }
        };
        let ldc = call.ldc as usize;
        let mut out = vec![f64::NAN; ldc * n];
        for j in 0..n {
            for i in 0..m {
                out[i + j * ldc] = (0..k)
                    .map(|l| {
                        at(first, call.op_first, call.ld_first, i, l)
                            * at(second, call.op_second, call.ld_second, l, j)
                    })
                    .sum();
            }
        }
        out
    }

    /// The call `gemm` makes, run by `emulate`, gives row-major A B for every layout pair a
    /// product meets (row-major, padded rows, transposed views, padded transposed views) and
    /// degenerate sizes: the argument mapping, checked without a GPU.
    #[test]
    fn the_column_major_call_computes_the_row_major_product() {
        let mut seed = 1u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as f64 / (1u64 << 31) as f64 - 0.5
        };
        // (rs, cs) of a rows x cols view: row-major, rows padded, transposed, transposed padded.
        let layouts =
            |rows: usize, cols: usize| [(cols, 1), (cols + 3, 1), (1, rows), (1, rows + 2)];
        let mut checked = 0;
        for (m, k, n) in [
            (3, 5, 7),
            (1, 4, 6),
            (5, 1, 3),
            (4, 6, 1),
            (1, 1, 1),
            (8, 16, 24),
        ] {
            for (ars, acs) in layouts(m, k) {
                for (brs, bcs) in layouts(k, n) {
                    let len = |rows: usize, cols: usize, rs: usize, cs: usize| {
                        (rows - 1) * rs + (cols - 1) * cs + 1
                    };
                    let abuf: Vec<f64> = (0..len(m, k, ars, acs)).map(|_| next()).collect();
                    let bbuf: Vec<f64> = (0..len(k, n, brs, bcs)).map(|_| next()).collect();
                    let (a, b) = (mat(m, k, ars, acs), mat(k, n, brs, bcs));
                    let call = call_for(DType::F32, &a, &b, 1)
                        .unwrap_or_else(|| panic!("{m}x{k}x{n} A ({ars}, {acs}) B ({brs}, {bcs})"));
                    let got = emulate(&call, &bbuf, &abuf);
                    for i in 0..m {
                        for j in 0..n {
                            let want: f64 = (0..k)
                                .map(|l| abuf[i * ars + l * acs] * bbuf[l * brs + j * bcs])
                                .sum();
                            let g = got[i * n + j];
                            assert!(
                                (g - want).abs() < 1e-12,
                                "{m}x{k}x{n} A ({ars}, {acs}) B ({brs}, {bcs}) C[{i}][{j}]: {g} vs {want} ({call:?})"
                            );
                        }
                    }
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 6 * 16);
    }
}
