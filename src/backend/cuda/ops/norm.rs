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
use crate::autograd::record;
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
            if rows > 0 {
                let dp = dx.cuda_ptr()?;
                if let Some(pl) = RowVec::plan(d, dtype.size_in_bytes(), 8, &[xp, wp, gp, dp]) {
                    let (grid, block) = pl.dims(rows, "rms_norm_backward")?;
                    let rows64 = rows as i64;
                    dev.launch(
                        "norm.cu",
                        &format!("rms_norm_bwd_dx_v{}_{sfx}", pl.vpt),
                        grid,
                        block,
                        0,
                        &[
                            arg(&xp),
                            arg(&wp),
                            arg(&gp),
                            arg(&rp),
                            arg(&dp),
                            arg(&rows64),
                            arg(&d64),
                        ],
                    )?;
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
            Some(dx)
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
                let (rows_per_chunk, chunks) = super::col_chunks(rows, col_blocks);
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
        Ok(vec![dx, dw])
    }))
}
