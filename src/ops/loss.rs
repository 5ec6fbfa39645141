//! Fused losses from logits, never holding the full softmax.
//!
//! cross_entropy: logits [..., V], targets (i64) [...] -> scalar mean over the tokens whose
//! target != ignore_index (HF / PyTorch semantics; 0 when no token counts).
//!   forward  ℓ_r = lse(x_r) − x_r[t_r];   backward dx_r = g/n · (softmax(x_r) − onehot(t_r))
//! log_prob_of: logits [..., V], ids [...] -> log softmax(x)[id] of shape [...] (the token
//! log-probabilities of policy-gradient losses).
//!   backward dx_r = g_r · (onehot(id_r) − softmax(x_r))

use crate::autograd::record;
use crate::backend::cpu;
use crate::tensor::{Float, Tensor};
use crate::{float_dispatch, DType, Error, Result};
use num_traits::Zero;
use rayon::prelude::*;

fn row_lse<T: Float>(row: &[T]) -> T {
    cpu::rows::logsumexp(row)
}

/// V of `logits` [..., V] that fit `targets` [...], or an error naming both shapes (shared by
/// the CPU and CUDA paths).
pub(crate) fn vocab_of(op: &'static str, logits: &Tensor, targets: &Tensor) -> Result<usize> {
    let v = *logits.shape().last().unwrap_or(&0);
    if logits.rank() == 0 || logits.shape()[..logits.rank() - 1] != *targets.shape() {
        return Err(Error::shape(
            op,
            format!(
                "logits {:?} do not fit targets {:?} (want [..., V] and [...])",
                logits.shape(),
                targets.shape()
            ),
        ));
    }
    Ok(v)
}

/// Rows of the logits, and each row's target id (None = ignored).
fn rows_and_targets(
    op: &'static str,
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: Option<i64>,
) -> Result<(Tensor, usize, Vec<Option<usize>>)> {
    let v = vocab_of(op, logits, targets)?;
    let ids: Vec<i64> = match targets.dtype() {
        crate::DType::I64 => targets.to_vec::<i64>()?,
        crate::DType::U32 => targets
            .to_vec::<u32>()?
            .into_iter()
            .map(i64::from)
            .collect(),
        d => {
            return Err(Error::DType {
                op,
                dtype: d,
                hint: " (targets must be i64 or u32)".into(),
            })
        }
    };
    let t = ids
        .into_iter()
        .map(|id| {
            if Some(id) == ignore_index {
                Ok(None)
            } else if id < 0 || id as usize >= v {
                Err(Error::shape(
                    op,
                    format!("target id {id} outside the vocabulary 0..{v}"),
                ))
            } else {
                Ok(Some(id as usize))
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((logits.detach().contiguous()?, v, t))
}

impl Tensor {
    /// Mean cross-entropy of `targets` under `self` (logits); see the module doc.
    pub fn cross_entropy(&self, targets: &Tensor, ignore_index: i64) -> Result<Tensor> {
        self.cross_entropy_to(targets, ignore_index, false)
    }

    /// Mean cross-entropy as an f32 scalar whatever the logits' float dtype: the value of
    /// `self.to_dtype(F32)?.cross_entropy(targets, ignore_index)` (exact: a bf16 -> f32 cast
    /// loses nothing), as a model's loss is taken. On CUDA bf16 logits are not cast: the
    /// kernels compute in f32 from them and write their bf16 gradient directly, which saves
    /// the f32 copies of [tokens, vocab] logits and gradient (and their memory).
    pub fn cross_entropy_f32(&self, targets: &Tensor, ignore_index: i64) -> Result<Tensor> {
        if self.is_cuda() && self.dtype() == DType::BF16 {
            return self.cross_entropy_to(targets, ignore_index, true);
        }
        self.to_dtype(DType::F32)?
            .cross_entropy(targets, ignore_index)
    }

    /// `cross_entropy`, on CUDA with an f32 result when `f32_out`.
    fn cross_entropy_to(
        &self,
        targets: &Tensor,
        ignore_index: i64,
        f32_out: bool,
    ) -> Result<Tensor> {
        // CUDA logits with CUDA targets: validated on the device without a host round trip
        // (an id outside the vocabulary gives NaN there instead of an error).
        if self.is_cuda() && targets.is_cuda() {
            return crate::backend::cuda::ops::loss::cross_entropy_targets(
                self,
                targets,
                ignore_index,
                f32_out,
            );
        }
        let (x, v, t) = rows_and_targets("cross_entropy", self, targets, Some(ignore_index))?;
        if x.is_cuda() {
            return crate::backend::cuda::ops::loss::cross_entropy(self, x, v, &t, f32_out);
        }
        let n = t.iter().filter(|t| t.is_some()).count();
        let (loss, lse) = float_dispatch!(x.dtype(), "cross_entropy", T => {
            let lse: Vec<T> = x.read::<T, _>(|xs| {
                if xs.len() >= cpu::PAR_MIN {
                    xs.par_chunks(v).map(row_lse).collect()
                } else {
                    xs.chunks(v).map(row_lse).collect()
                }
            })?;
            let total: f64 = x.read::<T, _>(|xs| {
                t.iter().enumerate().filter_map(|(r, ti)| ti.map(|c| crate::WithDType::to_f64(lse[r] - xs[r * v + c]))).sum()
            })?;
            let mean = if n == 0 { 0.0 } else { total / n as f64 };
            (Tensor::scalar(mean, x.dtype())?, Tensor::from_vec(lse, &[t.len()])?)
        });
        Ok(record("cross_entropy", loss, &[self], move |g| {
            let g = g.to_scalar()? / n.max(1) as f64;
            float_dispatch!(x.dtype(), "cross_entropy_backward", T => {
                let lse = lse.to_vec::<T>()?;
                let gt = T::c(g);
                let dx = x.read::<T, _>(|xs| cpu::map_rows(xs, v, |r, row, o| match t[r] {
                    None => cpu::write_row(o, row, |_| T::zero()),
                    Some(c) => {
                        let l = lse[r];
                        let o = cpu::write_row(o, row, |e| (e - l).exp_fast() * gt);
                        o[c] -= gt;
                        o
                    }
                }))?;
                Ok(vec![Some(Tensor::from_vec(dx, x.shape())?)])
            })
        }))
    }

    /// log softmax(self)[ids] along the last dim; see the module doc.
    pub fn log_prob_of(&self, ids: &Tensor) -> Result<Tensor> {
        if self.is_cuda() && ids.is_cuda() {
            return crate::backend::cuda::ops::loss::log_prob_of_targets(self, ids);
        }
        let (x, v, t) = rows_and_targets("log_prob_of", self, ids, None)?;
        let t: Vec<usize> = t.into_iter().map(|c| c.expect("no ignore index")).collect();
        if x.is_cuda() {
            return crate::backend::cuda::ops::loss::log_prob_of(self, x, v, &t, ids.shape());
        }
        let (out, lse) = float_dispatch!(x.dtype(), "log_prob_of", T => {
            let (lp, lse): (Vec<T>, Vec<T>) = x.read::<T, _>(|xs| {
                xs.chunks(v).zip(&t).map(|(row, &c)| { let l = row_lse(row); (row[c] - l, l) }).unzip()
            })?;
            (Tensor::from_vec(lp, ids.shape())?, Tensor::from_vec(lse, &[t.len()])?)
        });
        Ok(record("log_prob_of", out, &[self], move |g| {
            float_dispatch!(x.dtype(), "log_prob_of_backward", T => {
                let gv = g.contiguous()?.to_vec::<T>()?;
                let lv = lse.to_vec::<T>()?;
                let dx = x.read::<T, _>(|xs| cpu::map_rows(xs, v, |r, row, o| {
                    let (l, gr) = (lv[r], gv[r]);
                    let o = cpu::write_row(o, row, |e| -(e - l).exp_fast() * gr);
                    o[t[r]] += gv[r];
                    o
                }))?;
                Ok(vec![Some(Tensor::from_vec(dx, x.shape())?)])
            })
        }))
    }
}
