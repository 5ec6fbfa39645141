//! Rotary position embedding, rotate-half convention (Qwen2 / Llama):
//!   y = x·cos + rotate_half(x)·sin,  rotate_half([a, b]) = [−b, a]  (halves of the last dim)
//! x [..., D] with D even; cos, sin broadcastable to x (e.g. [B, 1, T, D] against
//! [B, H, T, D], or [T, 1, D] against [T, H, D]). No gradient flows to cos/sin.
//! Backward, h = D/2:  dx_j = g_j c_j + g_{j+h} s_{j+h},  dx_{j+h} = g_{j+h} c_{j+h} − g_j s_j.

use crate::autograd::record;
use crate::tensor::Tensor;
use crate::{float_dispatch, Error, Result};
use num_traits::Zero;

/// Applies the rotation (or its transpose when `inverse`) to rows of x.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor, inverse: bool) -> Result<Tensor> {
    let d = *x.shape().last().unwrap_or(&0);
    let h = d / 2;
    let x = x.contiguous()?;
    let cl = cos.layout().broadcast_as(x.shape())?;
    let sl = sin.layout().broadcast_as(x.shape())?;
    if d > 1 && (cl.strides.last() != Some(&1) || sl.strides.last() != Some(&1)) {
        return Err(Error::msg(
            "rope: cos/sin must be contiguous in the last dim",
        ));
    }
    let mut c_rows = Vec::new();
    cl.for_each_row(|s, _, _| c_rows.push(s));
    let mut s_rows = Vec::new();
    sl.for_each_row(|s, _, _| s_rows.push(s));
    float_dispatch!(x.dtype(), "rope", T => {
        let xv = x.to_vec::<T>()?;
        let mut y = vec![T::zero(); xv.len()];
        cos.read_strided::<T, _>(|cv, _| sin.read_strided::<T, _>(|sv, _| {
            for (r, (xr, yr)) in xv.chunks(d).zip(y.chunks_mut(d)).enumerate() {
                let (c, s) = (&cv[c_rows[r]..c_rows[r] + d], &sv[s_rows[r]..s_rows[r] + d]);
                for j in 0..h {
                    if inverse {
                        yr[j] = xr[j] * c[j] + xr[j + h] * s[j + h];
                        yr[j + h] = xr[j + h] * c[j + h] - xr[j] * s[j];
                    } else {
                        yr[j] = xr[j] * c[j] - xr[j + h] * s[j];
                        yr[j + h] = xr[j + h] * c[j + h] + xr[j] * s[j + h];
                    }
                }
            }
        }))??;
        Tensor::from_vec(y, x.shape())
    })
}

impl Tensor {
    pub fn rope(&self, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let d = *self.shape().last().unwrap_or(&0);
        if !d.is_multiple_of(2) {
            return Err(Error::shape(
                "rope",
                format!("last dim of {:?} must be even", self.shape()),
            ));
        }
        if cos.shape() != sin.shape() {
            return Err(Error::shape(
                "rope",
                format!("cos {:?} and sin {:?} differ", cos.shape(), sin.shape()),
            ));
        }
        if self.is_cuda() {
            // cos/sin may be cpu tables: they are copied to the device (no gradient flows to them).
            return crate::backend::cuda::ops::rope::rope(self, cos, sin);
        }
        let (cos, sin) = (cos.detach().contiguous()?, sin.detach().contiguous()?);
        let out = rotate(&self.detach(), &cos, &sin, false)?;
        Ok(record("rope", out, &[self], move |g| {
            Ok(vec![Some(rotate(g, &cos, &sin, true)?)])
        }))
    }
}
