//! Launcher of the tensor-core flash-attention forward (kernels/flash.cu).

use super::{arg, device};
use crate::{DType, Error, Result, Tensor};

/// Softmax(q kᵀ · scale) v for bf16 CUDA tensors q [B, Hq, Tq, D], k and v [B, Hkv, Tk, D]
/// (Hq a multiple of Hkv; D in 64, 80, 128). Returns (o [B, Hq, Tq, D] bf16, lse [B, Hq, Tq]
/// f32). No autograd.
pub fn flash_fwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    for t in [q, k, v] {
        if t.dtype() != DType::BF16 || !t.is_cuda() || t.rank() != 4 {
            return Err(Error::msg(format!(
                "flash_fwd: wants bf16 cuda tensors of rank 4, got {:?} {} on {}",
                t.shape(),
                t.dtype(),
                t.device()
            )));
        }
    }
    let (b, hq, tq, d) = (q.dim(0)?, q.dim(1)?, q.dim(2)?, q.dim(3)?);
    let (hkv, tk) = (k.dim(1)?, k.dim(2)?);
    if k.shape() != v.shape() || k.dim(0)? != b || k.dim(3)? != d || hkv == 0 || hq % hkv != 0 {
        return Err(Error::shape(
            "flash_fwd",
            format!("q {:?} k {:?} v {:?}", q.shape(), k.shape(), v.shape()),
        ));
    }
    if ![64, 80, 128].contains(&d) {
        return Err(Error::shape(
            "flash_fwd",
            format!("head dim {d} (supported: 64, 80, 128)"),
        ));
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let o = Tensor::empty_cuda(&[b, hq, tq, d], DType::BF16)?;
    let lse = Tensor::empty_cuda(&[b, hq, tq], DType::F32)?;
    let (qp, kp, vp, op, lp) = (
        q.cuda_ptr()?,
        k.cuda_ptr()?,
        v.cuda_ptr()?,
        o.cuda_ptr()?,
        lse.cuda_ptr()?,
    );
    let [hq_, hkv_, tq_, tk_] = [hq, hkv, tq, tk].map(|x| x as i64);
    let (scale, causal) = (scale as f32, causal as i64);
    let shared = (3 * 64 * (d + 8) * 2) as u32;
    device()?.launch(
        "flash.cu",
        &format!("flash_fwd_d{d}"),
        (tq.div_ceil(64) as u32, hq as u32, b as u32),
        (128, 1, 1),
        shared,
        &[
            arg(&qp),
            arg(&kp),
            arg(&vp),
            arg(&op),
            arg(&lp),
            arg(&hq_),
            arg(&hkv_),
            arg(&tq_),
            arg(&tk_),
            arg(&scale),
            arg(&causal),
        ],
    )?;
    Ok((o, lse))
}

/// Gradients of `flash_fwd` for upstream `g` [B, Hq, Tq, D]: (dq, dk, dv), deterministic (no
/// atomics): dK/dV per key tile summing the GQA group, dQ per query tile (kernels/flash.cu).
#[allow(clippy::too_many_arguments)]
pub fn flash_bwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    g: &Tensor,
    causal: bool,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, hq, tq, d) = (q.dim(0)?, q.dim(1)?, q.dim(2)?, q.dim(3)?);
    let (hkv, tk) = (k.dim(1)?, k.dim(2)?);
    if ![64, 80, 128].contains(&d) || o.shape() != q.shape() || g.shape() != q.shape() {
        return Err(Error::shape(
            "flash_bwd",
            format!("q {:?} o {:?} g {:?}", q.shape(), o.shape(), g.shape()),
        ));
    }
    let (q, k, v, o, g) = (
        q.contiguous()?,
        k.contiguous()?,
        v.contiguous()?,
        o.contiguous()?,
        g.contiguous()?,
    );
    let dev = device()?;
    let rows = b * hq * tq;
    let delta = Tensor::empty_cuda(&[rows], DType::F32)?;
    let (op, gp, dp) = (o.cuda_ptr()?, g.cuda_ptr()?, delta.cuda_ptr()?);
    crate::backend::cuda::ops::attention::launch_delta(DType::BF16, gp, op, dp, rows, d)?;
    let dq = Tensor::empty_cuda(q.shape(), DType::BF16)?;
    let dk = Tensor::empty_cuda(k.shape(), DType::BF16)?;
    let dv = Tensor::empty_cuda(v.shape(), DType::BF16)?;
    let (qp, kp, vp, lp) = (q.cuda_ptr()?, k.cuda_ptr()?, v.cuda_ptr()?, lse.cuda_ptr()?);
    let (dqp, dkp, dvp) = (dq.cuda_ptr()?, dk.cuda_ptr()?, dv.cuda_ptr()?);
    let [hq_, hkv_, tq_, tk_] = [hq, hkv, tq, tk].map(|x| x as i64);
    let (scale, causal) = (scale as f32, causal as i64);
    let tile = (64 * (d + 8) * 2) as u32;
    dev.launch(
        "flash.cu",
        &format!("flash_bwd_dkdv_d{d}"),
        (tk.div_ceil(64) as u32, hkv as u32, b as u32),
        (128, 1, 1),
        4 * tile + 128 * 4,
        &[
            arg(&qp),
            arg(&kp),
            arg(&vp),
            arg(&gp),
            arg(&lp),
            arg(&dp),
            arg(&dkp),
            arg(&dvp),
            arg(&hq_),
            arg(&hkv_),
            arg(&tq_),
            arg(&tk_),
            arg(&scale),
            arg(&causal),
        ],
    )?;
    dev.launch(
        "flash.cu",
        &format!("flash_bwd_dq_d{d}"),
        (tq.div_ceil(64) as u32, hq as u32, b as u32),
        (128, 1, 1),
        4 * tile,
        &[
            arg(&qp),
            arg(&kp),
            arg(&vp),
            arg(&gp),
            arg(&lp),
            arg(&dp),
            arg(&dqp),
            arg(&hq_),
            arg(&hkv_),
            arg(&tq_),
            arg(&tk_),
            arg(&scale),
            arg(&causal),
        ],
    )?;
    Ok((dq, dk, dv))
}
