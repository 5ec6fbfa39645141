//! Fused losses on CUDA (kernels/loss.cu), never materialising the softmax: one block per row
//! computes the row's log-sum-exp in one pass (online max/sum) and the picked log-probability;
//! the backward recomputes e^{x − lse} per element.
//!
//! `src/ops/loss.rs` validates the targets on the host (they may live on either device; they
//! are [rows] ids, small) and passes them here; they are uploaded as i64 with −1 for ignored rows.

use super::index::{upload_i64, upstream};
use crate::autograd::record;
use crate::backend::cuda::kernels::suffix;
use crate::backend::cuda::{arg, device};
use crate::{DType, Error, Result, Tensor};

/// Threads per block of the row kernels (vocabularies are long rows).
const ROW_THREADS: u32 = 512;

fn row_grid(rows: usize, op: &str) -> Result<(u32, u32, u32)> {
    if rows > i32::MAX as usize {
        return Err(Error::msg(format!(
            "{op}: {rows} rows exceed the cuda grid"
        )));
    }
    Ok((rows as u32, 1, 1))
}

/// Per row of the contiguous cuda logits `x` [rows, v]: (lse, x[t] − lse) in f32 (0 where the
/// target is None), and the targets on the device.
fn lse_pick(x: &Tensor, v: usize, targets: &[Option<usize>]) -> Result<(Tensor, Tensor, Tensor)> {
    let rows = targets.len();
    let sfx = suffix(x.dtype(), "cross_entropy")?;
    let t: Vec<i64> = targets.iter().map(|t| t.map_or(-1, |c| c as i64)).collect();
    let t = upload_i64(&t, &[rows])?;
    let lse = Tensor::empty_cuda(&[rows], DType::F32)?;
    let picked = Tensor::empty_cuda(&[rows], DType::F32)?;
    if rows > 0 {
        let (xp, tp, lp, pp, v64) = (
            x.cuda_ptr()?,
            t.cuda_ptr()?,
            lse.cuda_ptr()?,
            picked.cuda_ptr()?,
            v as i64,
        );
        device()?.launch(
            "loss.cu",
            &format!("lse_pick_{sfx}"),
            row_grid(rows, "cross_entropy")?,
            (ROW_THREADS, 1, 1),
            0,
            &[arg(&xp), arg(&tp), arg(&lp), arg(&pp), arg(&v64)],
        )?;
    }
    Ok((t, lse, picked))
}

/// dx = (softmax(x) − onehot(t)) · g_r · scale per row (0 on ignored rows).
fn lse_pick_backward(
    x: &Tensor,
    t: &Tensor,
    lse: &Tensor,
    g: &Tensor,
    v: usize,
    scale: f32,
    g_per_row: bool,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let sfx = suffix(dtype, "cross_entropy_backward")?;
    let g = upstream(g, dtype)?;
    let dx = Tensor::empty_cuda(x.shape(), dtype)?;
    let rows = t.numel();
    if rows > 0 && v > 0 {
        let (xp, tp, lp, gp, dp) = (
            x.cuda_ptr()?,
            t.cuda_ptr()?,
            lse.cuda_ptr()?,
            g.cuda_ptr()?,
            dx.cuda_ptr()?,
        );
        let (v64, gpr) = (v as i64, g_per_row as i64);
        device()?.launch(
            "loss.cu",
            &format!("lse_pick_bwd_{sfx}"),
            row_grid(rows, "cross_entropy_backward")?,
            (ROW_THREADS, 1, 1),
            0,
            &[
                arg(&xp),
                arg(&tp),
                arg(&lp),
                arg(&gp),
                arg(&dp),
                arg(&v64),
                arg(&scale),
                arg(&gpr),
            ],
        )?;
    }
    Ok(dx)
}

/// Mean cross-entropy for the contiguous detached cuda logits `x` [..., v] of `input` (the
/// tensor to record the gradient for) and validated targets (None = ignore_index).
pub fn cross_entropy(
    input: &Tensor,
    x: Tensor,
    v: usize,
    targets: &[Option<usize>],
) -> Result<Tensor> {
    let dtype = x.dtype();
    let sfx = suffix(dtype, "cross_entropy")?;
    let counted = targets.iter().filter(|t| t.is_some()).count();
    let scale = 1.0 / counted.max(1) as f32;
    let (t, lse, picked) = lse_pick(&x, v, targets)?;
    let out = Tensor::empty_cuda(&[], dtype)?;
    let (pp, op, rows64) = (picked.cuda_ptr()?, out.cuda_ptr()?, targets.len() as i64);
    device()?.launch(
        "loss.cu",
        &format!("ce_mean_{sfx}"),
        (1, 1, 1),
        (ROW_THREADS, 1, 1),
        0,
        &[arg(&pp), arg(&op), arg(&rows64), arg(&scale)],
    )?;
    drop(picked);
    Ok(record("cross_entropy", out, &[input], move |g| {
        Ok(vec![Some(lse_pick_backward(
            &x, &t, &lse, g, v, scale, false,
        )?)])
    }))
}

/// log softmax(x)[id] per row, shaped like `ids_shape` (= the logits' leading dims).
pub fn log_prob_of(
    input: &Tensor,
    x: Tensor,
    v: usize,
    ids: &[usize],
    ids_shape: &[usize],
) -> Result<Tensor> {
    let dtype = x.dtype();
    suffix(dtype, "log_prob_of")?;
    let targets: Vec<Option<usize>> = ids.iter().map(|&c| Some(c)).collect();
    let (t, lse, picked) = lse_pick(&x, v, &targets)?;
    let picked = if dtype == DType::F32 {
        picked
    } else {
        super::cast(&picked, dtype)?
    };
    let out = picked.reshape(ids_shape)?;
    Ok(record("log_prob_of", out, &[input], move |g| {
        Ok(vec![Some(lse_pick_backward(
            &x, &t, &lse, g, v, -1.0, true,
        )?)])
    }))
}
