//! Rotary position embedding on CUDA (kernels/rope.cu), rotate-half convention; the backward is
//! the inverse rotation (the CPU op's `rotate(.., inverse = true)`).
//!
//! x is read in place through its strides when its last dim is contiguous (e.g. the
//! `[B, T, H, D] -> [B, H, T, D]` transposed q/k of the model, or a `narrow` of a fused qkv);
//! cos/sin are read through their broadcast view (e.g. `[B, 1, T, D]` against `[B, H, T, D]`,
//! `[S, 1, D]` against `[S, H, D]`). cos/sin carry no gradient: when they are cpu tensors (the
//! text model builds its tables on the host) they are copied to the device, and when their
//! dtype differs from x's they are cast, once per call.
//!
//! When h = d / 2 is a multiple of 16 / sizeof(dtype) (D % 16 == 0 for bf16, D % 8 == 0 for
//! f32), the x/cos/sin/y pointers are 16-byte aligned and every row stride is a multiple of the
//! vector width, the `rope_vec_*` kernel moves 16-byte chunks (8 bf16 / 4 f32); otherwise the
//! general one-thread-per-pair `rope_*` kernel runs (e.g. an odd head dim or a misaligned view).

use super::index::on_cuda;
use super::{grid_for, Strides, THREADS};
use crate::autograd::record;
use crate::backend::cuda::kernels::suffix;
use crate::backend::cuda::{arg, device};
use crate::{DType, Error, Result, Tensor};

/// cos or sin as a contiguous cuda tensor of `dtype` (no autograd).
fn table(t: &Tensor, dtype: DType) -> Result<Tensor> {
    let t = t.detach();
    let t = if t.is_cuda() { t } else { t.to_cuda()? };
    let t = if t.dtype() == dtype {
        t
    } else {
        super::cast(&t, dtype)?
    };
    if t.is_contiguous() {
        Ok(t)
    } else {
        super::contiguous(&t)
    }
}

/// Shape and strides of the leading dims (all but the last) of a view: the row offsets.
fn row_strides(t: &Tensor, op: &'static str) -> Result<Strides> {
    let l = t.layout();
    let r = l.shape.len().saturating_sub(1);
    Strides::new(&l.shape[..r], &l.strides[..r], op)
}

/// The rotation (or its inverse) of the rows of `x` (cuda, any strides) by cos/sin (cuda,
/// contiguous, of x's dtype, broadcastable to x). Contiguous result, no autograd.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor, inverse: bool) -> Result<Tensor> {
    let dtype = cos.dtype();
    let sfx = suffix(dtype, "rope")?;
    let x = if x.is_cuda() {
        x.detach()
    } else {
        x.to_cuda()?
    };
    let x = if x.dtype() == dtype {
        x
    } else {
        super::cast(&x, dtype)?
    };
    let d = *x.shape().last().unwrap_or(&0);
    let x = if d > 1 && x.layout().strides.last() != Some(&1) {
        super::contiguous(&x)?
    } else {
        x
    };
    let cb = cos.broadcast_as(x.shape())?;
    let sb = sin.broadcast_as(x.shape())?;
    if d > 1 && (cb.layout().strides.last() != Some(&1) || sb.layout().strides.last() != Some(&1)) {
        return Err(Error::msg(
            "rope: cos/sin must be contiguous in the last dim",
        ));
    }
    let y = Tensor::empty_cuda(x.shape(), dtype)?;
    let h = d / 2;
    let rows = x.numel().checked_div(d).unwrap_or(0);
    let n = rows * h;
    if n == 0 {
        return Ok(y);
    }
    let (xs, cs, ss) = (
        row_strides(&x, "rope")?,
        row_strides(&cb, "rope")?,
        row_strides(&sb, "rope")?,
    );
    let (xp, cp, sp, yp) = (x.cuda_ptr()?, cb.cuda_ptr()?, sb.cuda_ptr()?, y.cuda_ptr()?);
    let (rows64, h64, inv) = (rows as i64, h as i64, inverse as i64);
    // 16-byte vector path: VEC elements per chunk; h, every row stride and every pointer
    // aligned to it (then each chunk at j and j + h of every row is 16-byte aligned).
    let vec = 16 / dtype.size_in_bytes();
    let strides_ok = |s: &Strides| {
        s.stride[..s.rank as usize]
            .iter()
            .all(|&st| st % vec as i64 == 0)
    };
    let fast = h.is_multiple_of(vec)
        && [xp, cp, sp, yp].iter().all(|p| p.is_multiple_of(16))
        && [&xs, &cs, &ss].into_iter().all(strides_ok);
    let (kernel, items) = if fast {
        (format!("rope_vec_{sfx}"), n / vec)
    } else {
        (format!("rope_{sfx}"), n)
    };
    device()?.launch(
        "rope.cu",
        &kernel,
        (grid_for(items), 1, 1),
        (THREADS as u32, 1, 1),
        0,
        &[
            arg(&xp),
            arg(&xs),
            arg(&cp),
            arg(&cs),
            arg(&sp),
            arg(&ss),
            arg(&yp),
            arg(&rows64),
            arg(&h64),
            arg(&inv),
        ],
    )?;
    Ok(y)
}

/// `x.rope(cos, sin)` for a cuda x (shapes validated by the caller: last dim even, cos and
/// sin of one shape).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    on_cuda("rope", &[x])?;
    let dtype = x.dtype();
    suffix(dtype, "rope")?;
    let (cos, sin) = (table(cos, dtype)?, table(sin, dtype)?);
    let out = rotate(x, &cos, &sin, false)?;
    Ok(record("rope", out, &[x], move |g| {
        Ok(vec![Some(rotate(g, &cos, &sin, true)?)])
    }))
}
