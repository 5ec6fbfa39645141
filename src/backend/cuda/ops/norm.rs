//! RMSNorm on CUDA (kernels/norm.cu): fused forward saving the f32 rstd of every row, fused
//! backward for dx, and a deterministic two-pass column sum for dweight. The weight must have
//! x's dtype and device.
//!
//! Fast paths: when d is a multiple of a 16-byte vector (8 bf16 / 4 f32) and every pointer is
//! 16-byte aligned, the row kernels hold their row in registers (16-byte loads/stores, one read
//! of each input; `RowVec` picks one warp per row for short rows, one block per row otherwise)
//! and the dweight partial sums read 16-byte vectors (same sums, same order). Anything else
//! (odd d, misaligned views, rows longer than 32768 bf16 / 16384 f32) uses the looping kernels.

use super::index::{on_cuda, upstream};
use super::reduce::RowVec;
use crate::autograd::{record, record_many};
use crate::backend::cuda::kernels::suffix;
use crate::backend::cuda::{arg, device};
use crate::{DType, Device, Error, Result, Tensor};

/// Threads per block of the row kernels.
const ROW_THREADS: u32 = 256;
/// Threads per block (columns) of the dweight partial sums.
const COL_THREADS: usize = 256;

fn row_grid(rows: usize) -> Result<(u32, u32, u32)> {
    if rows > i32::MAX as usize {
        return Err(Error::msg(format!(
            "rms_norm: {rows} rows exceed the cuda grid"
        )));
    }
    Ok((rows as u32, 1, 1))
}

/// `x.rms_norm(weight, eps)` for cuda tensors (shapes validated by the caller).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    on_cuda("rms_norm", &[x, weight])?;
    let dtype = x.dtype();
    if weight.dtype() != dtype {
        return Err(Error::msg(format!(
            "rms_norm: on cuda the weight must have the input's dtype ({dtype}), got {}",
            weight.dtype()
        )));
    }
    let sfx = suffix(dtype, "rms_norm")?;
    let d = *x.shape().last().unwrap_or(&0);
    let xc = x.detach().contiguous()?;
    let w = weight.detach().contiguous()?;
    let rows = xc.numel().checked_div(d).unwrap_or(0);
    let y = Tensor::empty_cuda(x.shape(), dtype)?;
    let rstd = Tensor::empty_cuda(&[rows], DType::F32)?;
    if rows > 0 {
        let (xp, wp, yp, rp) = (
            xc.cuda_ptr()?,
            w.cuda_ptr()?,
            y.cuda_ptr()?,
            rstd.cuda_ptr()?,
        );
        let (d64, eps32, rows64) = (d as i64, eps as f32, rows as i64);
        if let Some(pl) = RowVec::plan(d, dtype.size_in_bytes(), 8, &[xp, wp, yp]) {
            let (grid, block) = pl.dims(rows, "rms_norm")?;
            device()?.launch(
                "norm.cu",
                &format!("rms_norm_fwd_v{}_{sfx}", pl.vpt),
                grid,
                block,
                0,
                &[
                    arg(&xp),
                    arg(&wp),
                    arg(&yp),
                    arg(&rp),
                    arg(&rows64),
                    arg(&d64),
                    arg(&eps32),
                ],
            )?;
        } else {
            device()?.launch(
                "norm.cu",
                &format!("rms_norm_fwd_{sfx}"),
                row_grid(rows)?,
                (ROW_THREADS, 1, 1),
                0,
                &[
                    arg(&xp),
                    arg(&wp),
                    arg(&yp),
                    arg(&rp),
                    arg(&d64),
                    arg(&eps32),
                ],
            )?;
        }
    }
    let grads = [x.requires_grad(), weight.requires_grad()];
    Ok(record("rms_norm", y, &[x, weight], move |g| {
        let g = upstream(g, dtype)?;
        let (dx, dw) = backward(&xc, &w, &rstd, &g, None, grads)?;
        Ok(vec![dx, dw])
    }))
}

/// The gradients of y = rms_norm(x) · w given g = dL/dy, from x's rows `xc` (contiguous) and
/// their saved `rstd`: dx (when `grads[0]`; plus `gh`, added in the same pass where the
/// 16-byte path applies, when given) and dw (when `grads[1]`).
fn backward(
    xc: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
    g: &Tensor,
    gh: Option<&Tensor>,
    grads: [bool; 2],
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let dtype = xc.dtype();
    let sfx = suffix(dtype, "rms_norm")?;
    let d = *xc.shape().last().unwrap_or(&0);
    let rows = xc.numel().checked_div(d).unwrap_or(0);
    let dev = device()?;
    let (xp, wp, gp, rp, d64) = (
        xc.cuda_ptr()?,
        w.cuda_ptr()?,
        g.cuda_ptr()?,
        rstd.cuda_ptr()?,
        d as i64,
    );
    let dx = if grads[0] {
        let dx = Tensor::empty_cuda(xc.shape(), dtype)?;
        let mut added = false;
        if rows > 0 {
            let dp = dx.cuda_ptr()?;
            let ghp = gh.map(|t| t.cuda_ptr()).transpose()?;
            let mut ptrs = vec![xp, wp, gp, dp];
            ptrs.extend(ghp);
            if let Some(pl) = RowVec::plan(d, dtype.size_in_bytes(), 8, &ptrs) {
                let (grid, block) = pl.dims(rows, "rms_norm_backward")?;
                let rows64 = rows as i64;
                // With gh: the kernel that adds it, one more argument after rstd.
                let mut args = vec![arg(&xp), arg(&wp), arg(&gp), arg(&rp)];
                args.extend(ghp.as_ref().map(arg));
                args.extend([arg(&dp), arg(&rows64), arg(&d64)]);
                let kernel = if ghp.is_some() {
                    "add_rms_norm_bwd_dx"
                } else {
                    "rms_norm_bwd_dx"
                };
                dev.launch(
                    "norm.cu",
                    &format!("{kernel}_v{}_{sfx}", pl.vpt),
                    grid,
                    block,
                    0,
                    &args,
                )?;
                added = ghp.is_some();
            } else {
                dev.launch(
                    "norm.cu",
                    &format!("rms_norm_bwd_dx_{sfx}"),
                    row_grid(rows)?,
                    (ROW_THREADS, 1, 1),
                    0,
                    &[arg(&xp), arg(&wp), arg(&gp), arg(&rp), arg(&dp), arg(&d64)],
                )?;
            }
        }
        Some(match gh {
            Some(gh) if !added => dx.add(gh)?,
            _ => dx,
        })
    } else {
        None
    };
    let dw = if grads[1] {
        if rows == 0 || d == 0 {
            Some(Tensor::zeros_on(&[d], dtype, Device::Cuda)?)
        } else {
            // 16-byte vectors (one per thread) when d and both pointers allow it.
            let per = 16 / dtype.size_in_bytes();
            let vec = d.is_multiple_of(per) && xp.is_multiple_of(16) && gp.is_multiple_of(16);
            let (kernel, cols) = if vec {
                (format!("rms_norm_dw_partial_vec_{sfx}"), d / per)
            } else {
                (format!("rms_norm_dw_partial_{sfx}"), d)
            };
            // partial[c, j] in f32 over chunks of rows, then the sum over the chunks.
            let col_blocks = cols.div_ceil(COL_THREADS);
            let (rows_per_chunk, chunks) = super::col_chunks(rows);
            let partial = Tensor::empty_cuda(&[chunks, d], DType::F32)?;
            let pp = partial.cuda_ptr()?;
            let (rows64, rpc64) = (rows as i64, rows_per_chunk as i64);
            dev.launch(
                "norm.cu",
                &kernel,
                (col_blocks as u32, chunks as u32, 1),
                (COL_THREADS as u32, 1, 1),
                0,
                &[
                    arg(&xp),
                    arg(&gp),
                    arg(&rp),
                    arg(&pp),
                    arg(&rows64),
                    arg(&d64),
                    arg(&rpc64),
                ],
            )?;
            let dw = Tensor::empty_cuda(&[d], dtype)?;
            super::col_partials_sum(
                "norm.cu",
                &format!("rms_norm_dw_sum_{sfx}"),
                pp,
                dw.cuda_ptr()?,
                chunks,
                d,
            )?;
            Some(dw)
        }
    } else {
        None
    };
    Ok((dx, dw))
}

/// `(h, rms_norm(h) · weight)` with h = x + b, in one pass when the rows take the 16-byte path
/// (`add_rms_norm_fwd_v*`: h is rounded to x's dtype and stored, and the norm reads the
/// rounded h, as the separate ops do); its backward adds h's own gradient into the norm's dx
/// in the same pass. None when the fused kernels do not apply (the caller composes the two
/// ops): shapes or dtypes that differ, a weight that is not [d] of x's dtype, misaligned rows.
pub fn add_rms_norm(
    x: &Tensor,
    b: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<Option<(Tensor, Tensor)>> {
    let dtype = x.dtype();
    let d = *x.shape().last().unwrap_or(&0);
    if ![b, weight]
        .iter()
        .all(|t| t.is_cuda() && t.dtype() == dtype)
        || !x.is_cuda()
        || b.shape() != x.shape()
        || weight.shape() != [d]
    {
        return Ok(None);
    }
    let sfx = suffix(dtype, "add_rms_norm")?;
    let (xc, bc, w) = (
        x.detach().contiguous()?,
        b.detach().contiguous()?,
        weight.detach().contiguous()?,
    );
    let rows = xc.numel().checked_div(d).unwrap_or(0);
    let (xp, bp, wp) = (xc.cuda_ptr()?, bc.cuda_ptr()?, w.cuda_ptr()?);
    // The outputs are fresh allocations (aligned): the inputs decide.
    let Some(pl) = RowVec::plan(d, dtype.size_in_bytes(), 8, &[xp, bp, wp]) else {
        return Ok(None);
    };
    if rows == 0 {
        return Ok(None);
    }
    let h = Tensor::empty_cuda(x.shape(), dtype)?;
    let y = Tensor::empty_cuda(x.shape(), dtype)?;
    let rstd = Tensor::empty_cuda(&[rows], DType::F32)?;
    let (hp, yp, rp) = (h.cuda_ptr()?, y.cuda_ptr()?, rstd.cuda_ptr()?);
    let (grid, block) = pl.dims(rows, "add_rms_norm")?;
    let (rows64, d64, eps32) = (rows as i64, d as i64, eps as f32);
    device()?.launch(
        "norm.cu",
        &format!("add_rms_norm_fwd_v{}_{sfx}", pl.vpt),
        grid,
        block,
        0,
        &[
            arg(&xp),
            arg(&bp),
            arg(&hp),
            arg(&wp),
            arg(&yp),
            arg(&rp),
            arg(&rows64),
            arg(&d64),
            arg(&eps32),
        ],
    )?;
    let hs = h.detach();
    let want = [
        x.requires_grad() || b.requires_grad(),
        weight.requires_grad(),
    ];
    let (xg, bg) = (x.requires_grad(), b.requires_grad());
    let outs = record_many("add_rms_norm", vec![h, y], &[x, b, weight], move |gs| {
        let gh = gs[0].as_ref().map(|g| upstream(g, dtype)).transpose()?;
        let (dh, dw) = match &gs[1] {
            Some(gy) => {
                let gy = upstream(gy, dtype)?;
                backward(&hs, &w, &rstd, &gy, gh.as_ref(), want)?
            }
            // Only h was used: its gradient passes to both inputs; w gets none.
            None => (gh, None),
        };
        Ok(vec![dh.clone().filter(|_| xg), dh.filter(|_| bg), dw])
    });
    let mut it = outs.into_iter();
    Ok(Some((it.next().expect("h"), it.next().expect("y"))))
}
