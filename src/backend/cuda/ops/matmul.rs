//! CUDA matmul and linear (kernels/matmul.cu): one tiled GEMM kernel reads both operands
//! through element strides (transposed views cost no copy), walks broadcast batch dims with
//! stride 0 and sums reduced batch dims in-kernel (the gradient of a broadcast operand), and
//! fuses linear's bias into its epilogue. Backward: dA = G Bᵀ, dB = Aᵀ G, reduced to each
//! operand's shape exactly as the CPU op's `sum_to_shape` does; linear's bias gradient is a
//! deterministic two-pass column sum.

use super::{arg, device, grid_for, THREADS};
use crate::autograd::record;
use crate::backend::cuda::gemm_tc::{gemm_choice, Major};
use crate::backend::cuda::kernels::suffix;
use crate::tensor::{broadcast_shapes, contiguous_strides};
use crate::{DType, Error, Result, Tensor};

const BM: usize = 64;
const BN: usize = 64;
const GEMM_THREADS: u32 = 256;
const MAXB: usize = 8;
/// CUDA's limit on gridDim.y and gridDim.z (the kernel loops over the rest).
const GRID_YZ_MAX: usize = 65535;

/// `struct GemmBatch` of kernels/matmul.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct GemmBatch {
    rank: i64,
    shape: [i64; MAXB],
    sa: [i64; MAXB],
    sb: [i64; MAXB],
    sc: [i64; MAXB],
    rrank: i64,
    rshape: [i64; MAXB],
    ra: [i64; MAXB],
    rb: [i64; MAXB],
}

/// One GEMM operand: device address of the view's first element, element strides of each
/// (full, broadcast) batch dim, and of the matrix rows and columns.
struct Operand {
    ptr: u64,
    batch: Vec<usize>,
    rs: usize,
    cs: usize,
}

/// `t` [..., R, C] seen with the batch dims `full_batch` (broadcast), transposed if asked
/// (no copy: the row and column strides swap).
fn operand(t: &Tensor, full_batch: &[usize], transpose: bool) -> Result<Operand> {
    let r = t.rank();
    let mut shape = full_batch.to_vec();
    shape.extend_from_slice(&t.shape()[r - 2..]);
    let l = t.layout().broadcast_as(&shape)?;
    let nb = full_batch.len();
    let (rs, cs) = (l.strides[nb], l.strides[nb + 1]);
    let (rs, cs) = if transpose { (cs, rs) } else { (rs, cs) };
    Ok(Operand {
        ptr: t.cuda_ptr()?,
        batch: l.strides[..nb].to_vec(),
        rs,
        cs,
    })
}

/// C [out_batch..., m, n] = Σ_reduced A [full_batch..., m, k] @ B [full_batch..., k, n]
/// (+ bias [n]). `out_batch` aligns with the right of `full_batch`; a full dim that is
/// missing or 1 in `out_batch` is summed over.
#[allow(clippy::too_many_arguments)]
fn gemm(
    dtype: DType,
    (m, n, k): (usize, usize, usize),
    a: &Operand,
    b: &Operand,
    full_batch: &[usize],
    out_batch: &[usize],
    bias: Option<&Tensor>,
    op: &'static str,
) -> Result<Tensor> {
    let sfx = suffix(dtype, op)?;
    let (l, lo) = (full_batch.len(), out_batch.len());
    if lo > l {
        return Err(Error::msg(format!(
            "internal: {op}: output batch {out_batch:?} longer than {full_batch:?}"
        )));
    }
    let mut out_shape = out_batch.to_vec();
    out_shape.extend([m, n]);
    let out_strides = contiguous_strides(&out_shape);
    let mut bt = GemmBatch::default();
    let (mut z, mut r) = (1usize, 1usize);
    for j in 0..l {
        let f = full_batch[j];
        if f == 1 {
            continue;
        }
        let od = (j >= l - lo).then(|| j - (l - lo));
        match od {
            Some(o) if out_batch[o] == f => {
                let i = bt.rank as usize;
                if i == MAXB {
                    return Err(Error::shape(
                        op,
                        format!("cuda supports at most {MAXB} batch dims, got {full_batch:?}"),
                    ));
                }
                bt.shape[i] = f as i64;
                bt.sa[i] = a.batch[j] as i64;
                bt.sb[i] = b.batch[j] as i64;
                bt.sc[i] = out_strides[o] as i64;
                bt.rank += 1;
                z *= f;
            }
            Some(o) if out_batch[o] != 1 => {
                return Err(Error::msg(format!(
                    "internal: {op}: cannot reduce batch {full_batch:?} to {out_batch:?}"
                )));
            }
            _ => {
                let i = bt.rrank as usize;
                if i == MAXB {
                    return Err(Error::shape(
                        op,
                        format!("cuda supports at most {MAXB} batch dims, got {full_batch:?}"),
                    ));
                }
                bt.rshape[i] = f as i64;
                bt.ra[i] = a.batch[j] as i64;
                bt.rb[i] = b.batch[j] as i64;
                bt.rrank += 1;
                r *= f;
            }
        }
    }
    if m * n * z == 0 {
        return Tensor::empty_cuda(&out_shape, dtype);
    }
    if r == 0 {
        // An empty reduced batch: the sum is zero (plus the bias, which only linear passes
        // and never with a batch).
        return Tensor::zeros_on(&out_shape, dtype, crate::Device::Cuda);
    }
    if gemm_choice() == "cublas" {
        if let Some(out) = gemm_cublas(dtype, (m, n, k), a, b, &bt, &out_shape, bias)? {
            return Ok(out);
        }
    }
    if tensor_cores_apply(dtype, z, r, k) {
        return gemm_tensor_cores((m, n, k), a, b, &out_shape, bias);
    }
    let out = Tensor::empty_cuda(&out_shape, dtype)?;
    let bias = match bias {
        Some(t) => Some(t.contiguous()?),
        None => None,
    };
    // (A batch of z products, each summed over r of them.)
    super::super::gemm_tc::note_product(m, n, k * r, z);
    let bias_ptr = match &bias {
        Some(t) => t.cuda_ptr()?,
        None => 0u64,
    };
    let grid = (
        n.div_ceil(BN) as u32,
        m.div_ceil(BM).min(GRID_YZ_MAX) as u32,
        z.min(GRID_YZ_MAX) as u32,
    );
    let c = out.cuda_ptr()?;
    let (m64, n64, k64) = (m as i64, n as i64, k as i64);
    let (a_rs, a_cs, b_rs, b_cs) = (a.rs as i64, a.cs as i64, b.rs as i64, b.cs as i64);
    let (z64, r64) = (z as i64, r as i64);
    device()?.launch(
        "matmul.cu",
        &format!("gemm_{sfx}"),
        grid,
        (GEMM_THREADS, 1, 1),
        0,
        &[
            arg(&a.ptr),
            arg(&b.ptr),
            arg(&bias_ptr),
            arg(&c),
            arg(&m64),
            arg(&n64),
            arg(&k64),
            arg(&a_rs),
            arg(&a_cs),
            arg(&b_rs),
            arg(&b_cs),
            arg(&bt),
            arg(&z64),
            arg(&r64),
        ],
    )?;
    Ok(out)
}

/// The product through cuBLAS (`--gemm cublas`, the benchmark reference): one product or a
/// batch along one (or several collapsible) dims with nonzero strides (or B broadcast over A's
/// evenly spaced rows: one product), no summed batch dims;
/// linear's bias is written into C first and added by beta = 1. None when cuBLAS cannot take
/// it as laid out: the caller's kernels run it.
fn gemm_cublas(
    dtype: DType,
    (m, n, k): (usize, usize, usize),
    a: &Operand,
    b: &Operand,
    bt: &GemmBatch,
    out_shape: &[usize],
    bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    use crate::backend::cuda::cublas::{self, Mat};
    if bt.rrank > 0 {
        return Ok(None);
    }
    // The batch dims as one stride each (row-major dims, outer first): each outer dim's
    // strides must be the inner dim's times its size.
    let rank = bt.rank as usize;
    let mut z: usize = bt.shape[..rank].iter().map(|&s| s as usize).product();
    for i in 1..rank {
        let outer = |s: &[i64; MAXB]| s[i - 1] == s[i] * bt.shape[i];
        if !(outer(&bt.sa) && outer(&bt.sb) && outer(&bt.sc)) {
            return Ok(None);
        }
    }
    let stride = |s: &[i64; MAXB]| if rank == 0 { 0 } else { s[rank - 1] as usize };
    let mat = |o: &Operand, rows, cols, batch| Mat {
        rows,
        cols,
        rs: o.rs,
        cs: o.cs,
        batch,
    };
    let (mut ma, mb) = (mat(a, m, k, stride(&bt.sa)), mat(b, k, n, stride(&bt.sb)));
    if z > 1 && mb.batch == 0 && ma.cs == 1 && ma.batch == m * ma.rs {
        // B broadcast over A's batch, whose rows are evenly spaced across it ([B, T, K] @ [K,
        // N]): one product of z·m rows, as torch.matmul folds it (C is contiguous either way).
        (ma.rows, ma.batch, z) = (z * m, 0, 1);
    }
    let Some(call) = cublas::call_for(dtype, &ma, &mb, z) else {
        return Ok(None);
    };
    let out = match bias {
        // Always a copy: a one-row broadcast view counts as contiguous and `contiguous()` would
        // hand back the bias itself, which the product would then be added into.
        Some(bias) => {
            crate::backend::cuda::ops::contiguous(&bias.detach().broadcast_as(out_shape)?)?
        }
        None => Tensor::empty_cuda(out_shape, dtype)?,
    };
    cublas::gemm(&call, a.ptr, b.ptr, out.cuda_ptr()?, bias.is_some())?;
    Ok(Some(out))
}

/// Whether the tensor-core kernel (kernels/gemm.cu) takes this product: bf16, one matrix
/// (no batch). A K that is not a multiple of 8 is padded with zero columns (the vision MLP's
/// intermediate size 3420, say). `TESSERA_GEMM=simple` forces the SIMT kernel (benchmarks).
fn tensor_cores_apply(dtype: DType, z: usize, r: usize, k: usize) -> bool {
    dtype == DType::BF16 && z == 1 && r == 1 && k > 0 && gemm_choice() != "simple"
}

/// A [rows, kp] copy of the operand seen as element (i, j) at `ptr + i·rs + j·cs` (j < k),
/// with zero columns k..kp: the tensor-core kernel needs K and the row stride a multiple of 8.
fn k_padded(ptr: u64, rows: usize, k: usize, kp: usize, rs: usize, cs: usize) -> Result<Tensor> {
    // A transposed operand is first made K-contiguous by the tiled transpose (coalesced),
    // then padded row by row.
    let (_tmp, ptr, rs, cs) = if rs == 1 && cs != 1 && rows > 1 && k > 1 {
        let (t, p, ld) = k_contiguous(ptr, rows, k, rs, cs)?;
        (t, p, ld, 1)
    } else {
        (None, ptr, rs, cs)
    };
    let t = Tensor::empty_cuda(&[rows, kp], DType::BF16)?;
    let grid = grid_for(rows * kp);
    let (dst, [r, k, kp, rs, cs]) = (t.cuda_ptr()?, [rows, k, kp, rs, cs].map(|v| v as i64));
    device()?.launch(
        "copy.cu",
        "pad_cols_2",
        (grid, 1, 1),
        (THREADS as u32, 1, 1),
        0,
        &[
            arg(&ptr),
            arg(&dst),
            arg(&r),
            arg(&k),
            arg(&kp),
            arg(&rs),
            arg(&cs),
        ],
    )?;
    Ok(t)
}

/// A K-contiguous copy (`rows` x `k`, row stride k) of the operand seen as
/// element (i, j) at `ptr + i·rs + j·cs`, unless it already is one with an aligned stride.
fn k_contiguous(
    ptr: u64,
    rows: usize,
    k: usize,
    rs: usize,
    cs: usize,
) -> Result<(Option<Tensor>, u64, usize)> {
    if (cs == 1 || k == 1) && rs.is_multiple_of(8) && ptr.is_multiple_of(16) {
        return Ok((None, ptr, rs));
    }
    let t = Tensor::empty_cuda(&[rows, k], DType::BF16)?;
    if rs == 1 && rows > 1 && k > 1 {
        // A transposed operand: tiled transpose through shared memory.
        super::transpose_into(ptr, t.cuda_ptr()?, rows, k, cs, 2)?;
        let dst = t.cuda_ptr()?;
        return Ok((Some(t), dst, k));
    }
    let st = super::Strides::new(&[rows, k], &[rs, cs], "matmul")?;
    let (dst, n) = (t.cuda_ptr()?, (rows * k) as i64);
    device()?.launch(
        "copy.cu",
        "strided_copy_2",
        (grid_for(rows * k), 1, 1),
        (THREADS as u32, 1, 1),
        0,
        &[arg(&ptr), arg(&dst), arg(&st), arg(&n)],
    )?;
    Ok((Some(t), dst, k))
}

/// The operand seen as element (i, j) at `ptr + i·rs + j·cs` (i < rows, j < k) as the
/// warp-specialised kernel can read it without a copy: K-major (j contiguous) or MN-major
/// (i contiguous), with its `ld`; None when it is neither, or misaligned.
fn as_stored(ptr: u64, rows: usize, k: usize, rs: usize, cs: usize) -> Option<(Major, usize)> {
    if !ptr.is_multiple_of(16) {
        return None;
    }
    // A stride of 0 (a broadcast operand) is no layout TMA can read: the caller copies it.
    if (cs == 1 || k == 1) && k.is_multiple_of(8) && (rows == 1 || (rs > 0 && rs.is_multiple_of(8)))
    {
        let ld = if rows == 1 { k } else { rs };
        return Some((Major::K, ld));
    }
    if (rs == 1 || rows == 1) && (k == 1 || (cs > 0 && cs.is_multiple_of(8))) {
        let ld = if k == 1 { rows.next_multiple_of(8) } else { cs };
        return Some((Major::MN, ld));
    }
    None
}

/// The tensor-core product with an M/N-contiguous operand read as stored (the warp-specialised
/// kernel's MN-major mode, `gemm_tc::mn_major_enabled`) instead of transposed into a copy: the
/// backward's `G · W` (W MN-major) and `Gᵀ · X` (both). None when that mode is off or does not
/// apply (no MN-major operand, a misaligned or strided one, K not a multiple of 8 beside a
/// K-major operand): the caller copies as before.
fn gemm_mn_major(
    (m, n, k): (usize, usize, usize),
    a: &Operand,
    b: &Operand,
    out_shape: &[usize],
    bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    use crate::backend::cuda::gemm_tc::{self, TcKernel};
    let kernel = TcKernel::default_for_device();
    if !gemm_tc::mn_major_enabled() || !kernel.is_ws() {
        return Ok(None);
    }
    // Bᵀ element (j, kk) = B (kk, j) at ptr + kk·rs + j·cs.
    let (Some((ma, lda)), Some((mb, ldb))) = (
        as_stored(a.ptr, m, k, a.rs, a.cs),
        as_stored(b.ptr, n, k, b.cs, b.rs),
    ) else {
        return Ok(None);
    };
    if (ma, mb) == (Major::K, Major::K)
        || !gemm_tc::ws_supported((m, n, k), (lda, ldb), 1, (0, 0), (ma, mb))
    {
        return Ok(None);
    }
    let out = Tensor::empty_cuda(out_shape, DType::BF16)?;
    let (_bias, bias_ptr) = crate::backend::cuda::gemm_tc::contiguous_bias(bias)?;
    gemm_tc::launch_majors(
        kernel,
        a.ptr,
        b.ptr,
        out.cuda_ptr()?,
        bias_ptr,
        (m, n, k),
        (lda, ldb, n),
        1,
        (0, 0, 0),
        false,
        (ma, mb),
    )?;
    Ok(Some(out))
}

/// C [m, n] = A [m, k] @ B [k, n] (+ bias) on tensor cores: A made K-contiguous ([m, k]), B
/// made K-contiguous as Bᵀ ([n, k]); copies only when the views are not already so (or, with
/// `gemm_mn_major`, read M/N-contiguous operands as they are). A K that is not a multiple of 8
/// is padded with zero columns in both (the products are equal).
fn gemm_tensor_cores(
    (m, n, k): (usize, usize, usize),
    a: &Operand,
    b: &Operand,
    out_shape: &[usize],
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    if let Some(out) = gemm_mn_major((m, n, k), a, b, out_shape, bias)? {
        return Ok(out);
    }
    let kp = k.next_multiple_of(8);
    let (_ka, ap, lda, _kb, bp, ldb);
    if kp != k {
        let pa = k_padded(a.ptr, m, k, kp, a.rs, a.cs)?;
        // Bᵀ element (j, kk) = B (kk, j) at ptr + kk·rs + j·cs.
        let pb = k_padded(b.ptr, n, k, kp, b.cs, b.rs)?;
        (ap, lda, bp, ldb) = (pa.cuda_ptr()?, kp, pb.cuda_ptr()?, kp);
        (_ka, _kb) = (Some(pa), Some(pb));
    } else {
        (_ka, ap, lda) = k_contiguous(a.ptr, m, k, a.rs, a.cs)?;
        // Bᵀ element (j, kk) = B (kk, j) at ptr + kk·rs + j·cs.
        (_kb, bp, ldb) = k_contiguous(b.ptr, n, k, b.cs, b.rs)?;
    }
    let out = Tensor::empty_cuda(out_shape, DType::BF16)?;
    let (_bias, bias_ptr) = crate::backend::cuda::gemm_tc::contiguous_bias(bias)?;
    crate::backend::cuda::gemm_tc::launch(
        ap,
        bp,
        out.cuda_ptr()?,
        bias_ptr,
        (m, n, kp),
        (lda, ldb, n),
        1,
        (0, 0, 0),
        false,
    )?;
    Ok(out)
}

fn same_device(op: &'static str, ts: &[&Tensor]) -> Result<()> {
    if ts.iter().any(|t| !t.is_cuda()) {
        let devs: Vec<String> = ts.iter().map(|t| format!("{:?}", t.device())).collect();
        return Err(Error::msg(format!(
            "{op}: all inputs must be on the same device, got {}",
            devs.join(", ")
        )));
    }
    Ok(())
}

/// `a @ b` of two device tensors (shapes validated like the CPU op), no graph.
fn matmul_raw(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (m, k, n, batch) = crate::ops::matmul::matmul_dims(a, b)?;
    let (oa, ob) = (operand(a, &batch, false)?, operand(b, &batch, false)?);
    gemm(
        a.dtype(),
        (m, n, k),
        &oa,
        &ob,
        &batch,
        &batch,
        None,
        "matmul",
    )
}

/// Batched matrix product on CUDA with the CPU op's semantics and backward.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    same_device("matmul", &[a, b])?;
    let out = matmul_raw(a, b)?;
    let grads = [a.requires_grad(), b.requires_grad()];
    let (ad, bd) = (a.detach(), b.detach());
    Ok(record("matmul", out, &[a, b], move |g| {
        let (ra, rb) = (ad.rank(), bd.rank());
        let (m, k, n) = (ad.shape()[ra - 2], ad.shape()[ra - 1], bd.shape()[rb - 1]);
        let batch = broadcast_shapes("matmul", &ad.shape()[..ra - 2], &bd.shape()[..rb - 2])?;
        let og = operand(g, &batch, false)?;
        let ga = if grads[0] {
            // dA [a_batch..., M, K] = Σ G [.., M, N] @ Bᵀ [.., N, K]
            let ob = operand(&bd, &batch, true)?;
            Some(gemm(
                g.dtype(),
                (m, k, n),
                &og,
                &ob,
                &batch,
                &ad.shape()[..ra - 2],
                None,
                "matmul backward",
            )?)
        } else {
            None
        };
        let gb = if grads[1] {
            // dB [b_batch..., K, N] = Σ Aᵀ [.., K, M] @ G [.., M, N]
            let oa = operand(&ad, &batch, true)?;
            Some(gemm(
                g.dtype(),
                (k, n, m),
                &oa,
                &og,
                &batch,
                &bd.shape()[..rb - 2],
                None,
                "matmul backward",
            )?)
        } else {
            None
        };
        Ok(vec![ga, gb])
    }))
}

/// Column sums of `g2` [rows, cols] (linear's bias gradient) in `g2`'s dtype: deterministic
/// two passes (chunks of rows into f32 partials, then the sum of the partials).
fn column_sums(g2: &Tensor) -> Result<Tensor> {
    let g2 = g2.contiguous()?;
    let (rows, cols) = (g2.shape()[0], g2.shape()[1]);
    let dtype = g2.dtype();
    let sfx = suffix(dtype, "linear backward")?;
    if cols == 0 {
        return Tensor::empty_cuda(&[0], dtype);
    }
    if rows == 0 {
        return Tensor::zeros_on(&[cols], dtype, crate::Device::Cuda);
    }
    // 16-byte vectors (one per thread) when the columns and the pointer allow it.
    let gp = g2.cuda_ptr()?;
    let per = 16 / dtype.size_in_bytes();
    let vec = cols.is_multiple_of(per) && gp.is_multiple_of(16);
    let (kernel, threads) = if vec {
        (format!("colsum_partial_vec_{sfx}"), cols / per)
    } else {
        (format!("colsum_partial_{sfx}"), cols)
    };
    let col_blocks = threads.div_ceil(THREADS);
    let (rows_per_chunk, chunks) = super::col_chunks(rows);
    let part = Tensor::empty_cuda(&[chunks, cols], DType::F32)?;
    let out = Tensor::empty_cuda(&[cols], dtype)?;
    let pp = part.cuda_ptr()?;
    let (rows64, cols64, rpc64) = (rows as i64, cols as i64, rows_per_chunk as i64);
    device()?.launch(
        "matmul.cu",
        &kernel,
        (col_blocks as u32, chunks as u32, 1),
        (THREADS as u32, 1, 1),
        0,
        &[arg(&gp), arg(&pp), arg(&rows64), arg(&cols64), arg(&rpc64)],
    )?;
    super::col_partials_sum(
        "matmul.cu",
        &format!("colsum_sum_{sfx}"),
        pp,
        out.cuda_ptr()?,
        chunks,
        cols,
    )?;
    Ok(out)
}

/// `x [..., in] @ weight[out, in]ᵀ + bias[out]` on CUDA (bias fused into the GEMM epilogue),
/// with the CPU op's validation and backward.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let mut all = vec![x, weight];
    if let Some(b) = bias {
        all.push(b);
    }
    same_device("linear", &all)?;
    if all.iter().any(|t| t.dtype() != x.dtype()) {
        let ds: Vec<String> = all.iter().map(|t| t.dtype().to_string()).collect();
        return Err(Error::msg(format!(
            "linear: dtype mismatch ({})",
            ds.join(", ")
        )));
    }
    let din = *x.shape().last().unwrap_or(&0);
    let dout = weight.shape()[0];
    let x2 = x.detach().reshape(&[usize::MAX, din])?;
    let w = weight.detach();
    let rows = x2.shape()[0];
    let y = gemm(
        x.dtype(),
        (rows, dout, din),
        &operand(&x2, &[], false)?,
        &operand(&w, &[], true)?,
        &[],
        &[],
        bias,
        "linear",
    )?;
    let mut out_shape = x.shape().to_vec();
    *out_shape.last_mut().expect("rank >= 1") = dout;
    let out = y.reshape(&out_shape)?;
    let in_shape = x.shape().to_vec();
    let grads = [
        x.requires_grad(),
        weight.requires_grad(),
        bias.is_some_and(|b| b.requires_grad()),
    ];
    let has_bias = bias.is_some();
    Ok(record("linear", out, &all, move |g| {
        let g2 = g.reshape(&[usize::MAX, dout])?;
        let dtype = g2.dtype();
        let og = operand(&g2, &[], false)?;
        let gx = if grads[0] {
            // dX [rows, in] = G [rows, out] @ W [out, in]
            let ow = operand(&w, &[], false)?;
            Some(
                gemm(
                    dtype,
                    (rows, din, dout),
                    &og,
                    &ow,
                    &[],
                    &[],
                    None,
                    "linear backward",
                )?
                .reshape(&in_shape)?,
            )
        } else {
            None
        };
        let gw = if grads[1] {
            // dW [out, in] = Gᵀ [out, rows] @ X [rows, in]
            let ogt = operand(&g2, &[], true)?;
            let ox = operand(&x2, &[], false)?;
            Some(gemm(
                dtype,
                (dout, din, rows),
                &ogt,
                &ox,
                &[],
                &[],
                None,
                "linear backward",
            )?)
        } else {
            None
        };
        let mut res = vec![gx, gw];
        if has_bias {
            res.push(if grads[2] {
                Some(column_sums(&g2)?)
            } else {
                None
            });
        }
        Ok(res)
    }))
}
