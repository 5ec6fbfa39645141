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
use rayon::prelude::*;

/// `TESSERA_ADD_NORM=0`: `add_rms_norm` as the two ops on CUDA too, for measuring what the
/// fused kernels save.
static ADD_NORM: crate::backend::cuda::Switch =
    crate::backend::cuda::Switch::new("TESSERA_ADD_NORM");

impl Tensor {
    /// A residual add and the RMSNorm that follows it: `(h, h.rms_norm(weight, eps))` with
    /// h = self + delta. On CUDA one kernel reads both inputs and writes both outputs (and the
    /// backward adds h's gradient into the norm's in the same pass), where the two ops take
    /// two launches and read h again; elsewhere, and for rows the fused kernels do not take,
    /// it is the two ops. The values are the two ops' (h rounded to the dtype first).
    pub fn add_rms_norm(
        &self,
        delta: &Tensor,
        weight: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor)> {
        if self.is_cuda() && ADD_NORM.get() != Some(0) {
            if let Some(r) =
                crate::backend::cuda::ops::norm::add_rms_norm(self, delta, weight, eps)?
            {
                return Ok(r);
            }
        }
        let h = self.add(delta)?;
        let y = h.rms_norm(weight, eps)?;
        Ok((h, y))
    }

    /// `add_rms_norm` for a residual add that may not be there (the first block of a stack
    /// carries none): without `pending`, h is `self` and only the norm runs.
    pub fn add_opt_rms_norm(
        &self,
        pending: Option<&Tensor>,
        weight: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor)> {
        match pending {
            Some(d) => self.add_rms_norm(d, weight, eps),
            None => Ok((self.clone(), self.rms_norm(weight, eps)?)),
        }
    }

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
        if self.is_cuda() || weight.is_cuda() {
            return crate::backend::cuda::ops::norm::rms_norm(self, weight, eps);
        }
        let x = self.detach().contiguous()?;
        let w = weight.detach().contiguous()?;
        let (out, rstd) = float_dispatch!(x.dtype(), "rms_norm", T => {
            let rows = x.numel().checked_div(d).unwrap_or(0);
            let (y, rstd) = w.read::<T, _>(|wv| x.read::<T, _>(|xs| {
                let rstd: Vec<T> = xs.chunks(d.max(1)).map(|r| {
                    T::one() / (cpu::rows::dot(r, r) / T::c(d as f64) + T::c(eps)).sqrt()
                }).collect();
                let y = cpu::map_rows(xs, d, |i, r, o| {
                    cpu::write_row2(o, r, wv, |xv, wj| xv * rstd[i] * wj)
                });
                (y, rstd)
            }))??;
            (Tensor::from_vec(y, x.shape())?, Tensor::from_vec(rstd, &[rows])?)
        });
        let grads = [self.requires_grad(), weight.requires_grad()];
        Ok(record("rms_norm", out, &[self, weight], move |g| {
            let g = g.contiguous()?;
            float_dispatch!(x.dtype(), "rms_norm_backward", T => {
                let (dx, dw) = x.read::<T, _>(|xv| g.read::<T, _>(|gv| w.read::<T, _>(|wv| rstd.read::<T, _>(|rv| {
                    let gw_dot = |i: usize| {
                        let (xr, gr) = (&xv[i * d..(i + 1) * d], &gv[i * d..(i + 1) * d]);
                        (0..d).map(|j| gr[j] * wv[j] * xr[j]).sum::<T>() * rv[i]
                    };
                    let dx = cpu::map_rows2(xv, gv, d, |i, xr, gr, o| {
                        let (r, mean) = (rv[i], gw_dot(i) / T::c(d as f64));
                        let rows = (gr, wv, xr);
                        cpu::write_row3(o, rows, |g, w, x| r * (g * w - x * r * mean))
                    });
                    // dweight: per-chunk partial sums over rows, then a final sum.
                    let rows = xv.len().checked_div(d).unwrap_or(0);
                    let chunk = rows.div_ceil(cpu::threads().max(1) * 4).max(1);
                    let partial: Vec<Vec<T>> = (0..rows.div_ceil(chunk)).into_par_iter().map(|c| {
                        let mut acc = vec![T::zero(); d];
                        for i in c * chunk..((c + 1) * chunk).min(rows) {
                            for j in 0..d {
                                acc[j] += gv[i * d + j] * xv[i * d + j] * rv[i];
                            }
                        }
                        acc
                    }).collect();
                    let mut dw = vec![T::zero(); d];
                    for p in partial {
                        for j in 0..d {
                            dw[j] += p[j];
                        }
                    }
                    (dx, dw)
                }))))????;
                Ok(vec![
                    if grads[0] { Some(Tensor::from_vec(dx, x.shape())?) } else { None },
                    if grads[1] { Some(Tensor::from_vec(dw, &[d])?) } else { None },
                ])
            })
        }))
    }
}
