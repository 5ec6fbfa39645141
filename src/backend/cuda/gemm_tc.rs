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

/// Which tensor-core kernel runs a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcKernel {
    /// kernels/gemm.cu: mma.sync m16n8k16 (sm_80+), 128x128x32 tiles.
    MmaSync,
    /// kernels/gemm_sm90.cu: wgmma m64n256k16 (sm_90a only), 128x256x64 tiles.
    Wgmma,
}

impl TcKernel {
    /// The default: mma.sync, or wgmma with `TESSERA_GEMM=wgmma` on an sm_90 device.
    pub fn default_for_device() -> TcKernel {
        let hopper = device().map(|d| d.cc == (9, 0)).unwrap_or(false);
        if hopper && std::env::var("TESSERA_GEMM").is_ok_and(|v| v == "wgmma") {
            TcKernel::Wgmma
        } else {
            TcKernel::MmaSync
        }
    }
}

/// Raw launch: `batch` products, element strides between products `batch_*` (0 = shared).
#[allow(clippy::too_many_arguments)]
pub fn launch(
    a: u64,
    b: u64,
    c: u64,
    bias: Option<u64>,
    mnk: (usize, usize, usize),
    ld: (usize, usize, usize),
    batch: usize,
    batch_strides: (usize, usize, usize),
    accumulate: bool,
) -> Result<()> {
    launch_with(
        TcKernel::default_for_device(),
        a,
        b,
        c,
        bias,
        mnk,
        ld,
        batch,
        batch_strides,
        accumulate,
    )
}

/// `launch` with an explicit kernel choice.
#[allow(clippy::too_many_arguments)]
pub fn launch_with(
    kernel: TcKernel,
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
    let (file, name, grid, shared) = match kernel {
        TcKernel::MmaSync => (
            "gemm.cu",
            "gemm_tc_bf16",
            (n.div_ceil(BN) as u32, m.div_ceil(BM) as u32, batch as u32),
            SHARED_BYTES,
        ),
        TcKernel::Wgmma => {
            if device()?.cc != (9, 0) {
                return Err(Error::msg(
                    "gemm: the wgmma kernel needs an sm_90 (Hopper) device",
                ));
            }
            (
                "gemm_sm90.cu",
                "gemm_wgmma_bf16",
                (n.div_ceil(256) as u32, m.div_ceil(128) as u32, batch as u32),
                (3 * (128 + 256) * 64 * 2 + 1024) as u32,
            )
        }
    };
    device()?.launch(
        file,
        name,
        grid,
        (256, 1, 1),
        shared,
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
    matmul_bt_with(TcKernel::default_for_device(), a, b, bias)
}

/// `matmul_bt` with an explicit kernel choice.
pub fn matmul_bt_with(
    kernel: TcKernel,
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
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
    launch_with(
        kernel,
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
