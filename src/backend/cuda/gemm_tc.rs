//! Launcher of the tensor-core GEMM (kernels/gemm.cu): bf16 operands, f32 accumulation,
//! `C = A · Bᵀ (+ bias) (+ C)` with both operands K-contiguous.

use super::{arg, device};
use crate::{DType, Error, Result, Tensor};

const BM: usize = 128;
const BN: usize = 128;
const LDS: usize = 32 + 8;
const STAGES: usize = 3;
const SHARED_BYTES: u32 = (2 * STAGES * BM * LDS * 2) as u32;

/// Whether a [.., M, K] x [N, K] product with these row strides can use the tensor-core path.
pub fn eligible(k: usize, lda: usize, ldb: usize, a_ptr: u64, b_ptr: u64) -> bool {
    k.is_multiple_of(8)
        && lda.is_multiple_of(8)
        && ldb.is_multiple_of(8)
        && a_ptr.is_multiple_of(16)
        && b_ptr.is_multiple_of(16)
        && k > 0
}

/// Raw launch: `batch` products, element strides between products `batch_*` (0 = shared).
#[allow(clippy::too_many_arguments)]
pub fn launch(
    a: u64,
    b: u64,
    c: u64,
    bias: Option<u64>,
    (m, n, k): (usize, usize, usize),
    (lda, ldb, ldc): (usize, usize, usize),
    batch: usize,
    (batch_a, batch_b, batch_c): (usize, usize, usize),
    accumulate: bool,
) -> Result<()> {
    let flags: i64 = bias.is_some() as i64 | ((accumulate as i64) << 1);
    let bias = bias.unwrap_or(0);
    let [m_, n_, k_, lda_, ldb_, ldc_, ba, bb, bc] =
        [m, n, k, lda, ldb, ldc, batch_a, batch_b, batch_c].map(|v| v as i64);
    let grid = (n.div_ceil(BN) as u32, m.div_ceil(BM) as u32, batch as u32);
    device()?.launch(
        "gemm.cu",
        "gemm_tc_bf16",
        grid,
        (256, 1, 1),
        SHARED_BYTES,
        &[
            arg(&a),
            arg(&b),
            arg(&c),
            arg(&bias),
            arg(&m_),
            arg(&n_),
            arg(&k_),
            arg(&lda_),
            arg(&ldb_),
            arg(&ldc_),
            arg(&ba),
            arg(&bb),
            arg(&bc),
            arg(&flags),
        ],
    )
}

/// `a [.., M, K] · b[N, K]ᵀ (+ bias[N])` for bf16 CUDA tensors, no autograd. `a` and `b` are
/// made contiguous; K must be a multiple of 8.
pub fn matmul_bt(a: &Tensor, b: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if a.dtype() != DType::BF16 || b.dtype() != DType::BF16 || !a.is_cuda() || !b.is_cuda() {
        return Err(Error::msg("gemm_tc: bf16 cuda tensors only"));
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let k = *a.shape().last().unwrap_or(&0);
    if b.rank() != 2 || b.dim(1)? != k {
        return Err(Error::shape(
            "gemm_tc",
            format!("{:?} x {:?}ᵀ", a.shape(), b.shape()),
        ));
    }
    let n = b.dim(0)?;
    let m = a.numel() / k.max(1);
    if !eligible(k, k, k, a.cuda_ptr()?, b.cuda_ptr()?) {
        return Err(Error::msg(format!(
            "gemm_tc: K = {k} is not a multiple of 8"
        )));
    }
    let mut shape = a.shape().to_vec();
    *shape.last_mut().expect("rank >= 1") = n;
    let out = Tensor::empty_cuda(&shape, DType::BF16)?;
    let bias = match bias {
        Some(t) => Some(t.contiguous()?),
        None => None,
    };
    let bias_ptr = match &bias {
        Some(t) => Some(t.cuda_ptr()?),
        None => None,
    };
    launch(
        a.cuda_ptr()?,
        b.cuda_ptr()?,
        out.cuda_ptr()?,
        bias_ptr,
        (m, n, k),
        (k, k, n),
        1,
        (0, 0, 0),
        false,
    )?;
    Ok(out)
}
