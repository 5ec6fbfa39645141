//! Fused RMSNorm: y = x / sqrt(mean(x²) + eps) * weight, over the last dim.
//!
//! x [..., D], weight [D] -> y [..., D]. Backward, with r = rsqrt(mean(x²)+eps), x̂ = x·r:
//!   dweight = Σ_rows g·x̂
//!   dx      = r · (g·w − x̂ · mean(g·w·x̂))

use crate::autograd::record;
use crate::backend::cpu;
use crate::tensor::Float;
use crate::tensor::Tensor;
use crate::{float_dispatch, Error, Result};
use num_traits::{One, Zero};

impl Tensor {
    pub fn rms_norm(&self, weight: &Tensor, eps: f64) -> Result<Tensor> {
        let d = *self.shape().last().unwrap_or(&0);
        if weight.shape() != [d] {
            return Err(Error::shape(
                "rms_norm",
                format!(
                    "weight {:?} does not match input {:?}",
                    weight.shape(),
                    self.shape()
                ),
            ));
        }
        let x = self.detach().contiguous()?;
        let w = weight.detach().contiguous()?;
        let (out, rstd) = float_dispatch!(x.dtype(), "rms_norm", T => {
            let wv = w.to_vec::<T>()?;
            let mut y = x.to_vec::<T>()?;
            let rows = if d == 0 { 0 } else { y.len() / d };
            let mut rstd = vec![T::zero(); rows];
            let rp = crate::backend::cpu::SyncPtr::new(rstd.as_mut_ptr());
            cpu::for_rows_mut(&mut y, d, |i, row| {
                let ms = row.iter().map(|&v| v * v).sum::<T>() / T::c(d as f64);
                let r = T::one() / (ms + T::c(eps)).sqrt();
                unsafe { *rp.get().add(i) = r };
                for (e, &wj) in row.iter_mut().zip(&wv) {
                    *e = *e * r * wj;
                }
            });
            (Tensor::from_vec(y, x.shape())?, Tensor::from_vec(rstd, &[rows])?)
        });
        let grads = [self.requires_grad(), weight.requires_grad()];
        Ok(record("rms_norm", out, &[self, weight], move |g| {
            let g = g.contiguous()?;
            float_dispatch!(x.dtype(), "rms_norm_backward", T => {
                let (xv, gv, wv, rv) = (x.to_vec::<T>()?, g.to_vec::<T>()?, w.to_vec::<T>()?, rstd.to_vec::<T>()?);
                let mut dx = vec![T::zero(); xv.len()];
                let mut dw = vec![T::zero(); d];
                for (i, ((xr, gr), dxr)) in xv.chunks(d).zip(gv.chunks(d)).zip(dx.chunks_mut(d)).enumerate() {
                    let r = rv[i];
                    let mut dot = T::zero();
                    for j in 0..d {
                        let xh = xr[j] * r;
                        dw[j] += gr[j] * xh;
                        dot += gr[j] * wv[j] * xh;
                    }
                    let mean = dot / T::c(d as f64);
                    for j in 0..d {
                        dxr[j] = r * (gr[j] * wv[j] - xr[j] * r * mean);
                    }
                }
                Ok(vec![
                    if grads[0] { Some(Tensor::from_vec(dx, x.shape())?) } else { None },
                    if grads[1] { Some(Tensor::from_vec(dw, &[d])?) } else { None },
                ])
            })
        }))
    }
}
