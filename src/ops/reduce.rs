//! Reductions over dims: sum, mean, max, logsumexp; and softmax / log_softmax along a dim.
//! Output shape: the input's with reduced dims removed (or kept as 1 with `keepdim`).
//! CUDA tensors go to src/backend/cuda/ops/reduce.rs (mean composes sum and affine).

use super::elementwise::map1;
use crate::autograd::record;
use crate::backend::cpu;
use crate::backend::cuda::ops::reduce as cuda_reduce;
use crate::tensor::{Float, Tensor};
use crate::{float_dispatch, Error, Result};
use num_traits::{One, Zero};

/// The input permuted so the reduced dims are last and made contiguous; returns it with the
/// kept-dims shape (keepdim layout) and the length of each reduced row.
fn rows_last(x: &Tensor, dims: &[usize], op: &'static str) -> Result<(Tensor, Vec<usize>, usize)> {
    let r = x.rank();
    for &d in dims {
        if d >= r {
            return Err(Error::shape(
                op,
                format!("dim {d} out of range for {:?}", x.shape()),
            ));
        }
    }
    let kept: Vec<usize> = (0..r).filter(|d| !dims.contains(d)).collect();
    let mut perm = kept.clone();
    perm.extend(dims.iter().copied());
    let xp = if perm.iter().enumerate().all(|(i, &p)| i == p) {
        x.clone()
    } else {
        x.detach().permute(&perm)?
    }
    .contiguous()?;
    let keep_shape: Vec<usize> = (0..r)
        .map(|d| if dims.contains(&d) { 1 } else { x.shape()[d] })
        .collect();
    let n: usize = dims.iter().map(|&d| x.shape()[d]).product();
    Ok((xp.detach(), keep_shape, n))
}

/// The reduced shape: `keep_shape` (reduced dims as 1) itself with `keepdim`, else without the
/// reduced dims. Shared by the CPU and CUDA reductions.
pub(crate) fn out_shape(keep_shape: &[usize], dims: &[usize], keepdim: bool) -> Vec<usize> {
    if keepdim {
        return keep_shape.to_vec();
    }
    keep_shape
        .iter()
        .enumerate()
        .filter(|(d, _)| !dims.contains(d))
        .map(|(_, &s)| s)
        .collect()
}

/// Row-wise reduction of a contiguous tensor into one value per row, shaped `$shape`.
macro_rules! reduce_rows {
    ($x:expr, $n:expr, $shape:expr, $name:expr, |$row:ident : $T:ident| $f:expr) => {{
        let n = $n;
        float_dispatch!($x.dtype(), $name, $T => {
            let v = $x.read::<$T, _>(|s| {
                if n == 0 {
                    return vec![<$T as num_traits::Zero>::zero(); s.len()];
                }
                let f = |$row: &[$T]| -> $T { $f };
                if s.len() >= cpu::PAR_MIN {
                    use rayon::prelude::*;
                    s.par_chunks(n).map(f).collect::<Vec<$T>>()
                } else {
                    s.chunks(n).map(f).collect::<Vec<$T>>()
                }
            })?;
            Tensor::from_vec(v, $shape)?
        })
    }};
}

fn row_max<T: Float>(row: &[T]) -> T {
    cpu::rows::max(row)
}

fn row_logsumexp<T: Float>(row: &[T]) -> T {
    cpu::rows::logsumexp(row)
}

impl Tensor {
    /// Sum over `dims`.
    pub fn sum_dims(&self, dims: &[usize], keepdim: bool) -> Result<Tensor> {
        if self.is_cuda() {
            return cuda_reduce::sum_dims(self, dims, keepdim);
        }
        let (xp, keep_shape, n) = rows_last(self, dims, "sum")?;
        let shape = out_shape(&keep_shape, dims, keepdim);
        let out = reduce_rows!(xp, n, &shape, "sum", |row: T| row
            .iter()
            .copied()
            .sum::<T>());
        let in_shape = self.shape().to_vec();
        Ok(record("sum", out, &[self], move |g| {
            Ok(vec![Some(
                g.reshape(&keep_shape)?
                    .broadcast_as(&in_shape)?
                    .contiguous()?,
            )])
        }))
    }

    /// Sum over one dim (negative counts from the end).
    pub fn sum(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        let d = self.normalize_dim(dim, "sum")?;
        self.sum_dims(&[d], keepdim)
    }

    /// Sum of all elements (a scalar of shape []).
    pub fn sum_all(&self) -> Result<Tensor> {
        let dims: Vec<usize> = (0..self.rank()).collect();
        self.sum_dims(&dims, false)
    }

    pub fn mean_dims(&self, dims: &[usize], keepdim: bool) -> Result<Tensor> {
        let n: usize = dims
            .iter()
            .map(|&d| self.shape().get(d).copied().unwrap_or(1))
            .product();
        self.sum_dims(dims, keepdim)?
            .mul_scalar(1.0 / n.max(1) as f64)
    }

    pub fn mean(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        let d = self.normalize_dim(dim, "mean")?;
        self.mean_dims(&[d], keepdim)
    }

    pub fn mean_all(&self) -> Result<Tensor> {
        let dims: Vec<usize> = (0..self.rank()).collect();
        self.mean_dims(&dims, false)
    }

    /// Maximum over one dim. The gradient goes to the first maximal element.
    pub fn max(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        let d = self.normalize_dim(dim, "max")?;
        if self.is_cuda() {
            return cuda_reduce::max(self, d, keepdim);
        }
        let (xp, keep_shape, n) = rows_last(self, &[d], "max")?;
        if n == 0 {
            return Err(Error::shape(
                "max",
                format!("empty dim {d} of {:?}", self.shape()),
            ));
        }
        let shape = out_shape(&keep_shape, &[d], keepdim);
        let out = reduce_rows!(xp, n, &shape, "max", |row: T| row_max(row));
        let x = self.clone();
        Ok(record("max", out, &[self], move |g| {
            // one-hot of the first argmax along d, times g
            let (xp, _, n) = rows_last(&x, &[d], "max")?;
            let g = g.reshape(&keep_shape)?.contiguous()?;
            let grad = float_dispatch!(x.dtype(), "max_backward", T => {
                let gv = g.to_vec::<T>()?;
                let m = xp.read::<T, _>(|s| {
                    let mut m = vec![T::zero(); s.len()];
                    for (r, row) in s.chunks(n).enumerate() {
                        let best = row.iter().enumerate().fold(0, |b, (i, &v)| if v > row[b] { i } else { b });
                        m[r * n + best] = gv[r];
                    }
                    m
                })?;
                unpermute_rows(m, x.shape(), &[d])?
            });
            Ok(vec![Some(grad)])
        }))
    }

    /// log Σ exp over one dim, stable.
    pub fn logsumexp(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        let d = self.normalize_dim(dim, "logsumexp")?;
        if self.is_cuda() {
            return cuda_reduce::logsumexp(self, d, keepdim);
        }
        let (xp, keep_shape, n) = rows_last(self, &[d], "logsumexp")?;
        let shape = out_shape(&keep_shape, &[d], keepdim);
        let out = reduce_rows!(xp, n, &shape, "logsumexp", |row: T| row_logsumexp(row));
        let (x, lse) = (self.clone(), out.clone());
        Ok(record("logsumexp", out, &[self], move |g| {
            // d lse / dx = softmax(x)
            let lse = lse.reshape(&keep_shape)?;
            let p = x.sub(&lse)?.exp()?;
            Ok(vec![Some(p.mul(&g.reshape(&keep_shape)?)?)])
        }))
    }

    /// Softmax along `dim`.
    pub fn softmax(&self, dim: isize) -> Result<Tensor> {
        let d = self.normalize_dim(dim, "softmax")?;
        if self.is_cuda() {
            return cuda_reduce::softmax(self, d);
        }
        let out = along_last(self, d, |x| {
            let x = x.contiguous()?;
            let n = *x.shape().last().unwrap_or(&1);
            float_dispatch!(x.dtype(), "softmax", T => {
                let v = x.read::<T, _>(|xs| cpu::map_rows(xs, n, |_, r, o| {
                    let m = row_max(r);
                    let (o, s) = cpu::write_row_sum(o, r, |xv| (xv - m).exp_fast());
                    let inv = T::one() / s;
                    o.iter_mut().for_each(|e| *e *= inv);
                    o
                }))?;
                Tensor::from_vec(v, x.shape())
            })
        })?;
        let y = out.clone();
        Ok(record("softmax", out, &[self], move |g| {
            // dx = y · (g − Σ g·y)
            if d + 1 != y.rank() {
                let gy = g.mul(&y)?;
                let s = gy.sum(d as isize, true)?;
                return Ok(vec![Some(gy.sub(&y.mul(&s)?)?)]);
            }
            let (g, n) = (g.contiguous()?, *y.shape().last().unwrap_or(&1));
            float_dispatch!(y.dtype(), "softmax_backward", T => {
                let v = y.read::<T, _>(|ys| g.read::<T, _>(|gs| cpu::map_rows2(ys, gs, n, |_, yr, gr, o| {
                    let dot = cpu::rows::dot(gr, yr);
                    cpu::write_row2(o, yr, gr, |yv, gv| yv * (gv - dot))
                })))??;
                Ok(vec![Some(Tensor::from_vec(v, y.shape())?)])
            })
        }))
    }

    /// log-softmax along `dim`.
    pub fn log_softmax(&self, dim: isize) -> Result<Tensor> {
        let d = self.normalize_dim(dim, "log_softmax")?;
        if self.is_cuda() {
            return cuda_reduce::log_softmax(self, d);
        }
        let out = along_last(self, d, |x| {
            let x = x.contiguous()?;
            let n = *x.shape().last().unwrap_or(&1);
            float_dispatch!(x.dtype(), "log_softmax", T => {
                let v = x.read::<T, _>(|xs| cpu::map_rows(xs, n, |_, r, o| {
                    let l = row_logsumexp(r);
                    cpu::write_row(o, r, |xv| xv - l)
                }))?;
                Tensor::from_vec(v, x.shape())
            })
        })?;
        let y = out.clone();
        Ok(record("log_softmax", out, &[self], move |g| {
            // dx = g − softmax · Σ g
            if d + 1 != y.rank() {
                let s = g.sum(d as isize, true)?;
                let p = map1!(y, "log_softmax_backward", |v: T| v.exp_fast());
                return Ok(vec![Some(g.sub(&p.mul(&s)?)?)]);
            }
            let (g, n) = (g.contiguous()?, *y.shape().last().unwrap_or(&1));
            float_dispatch!(y.dtype(), "log_softmax_backward", T => {
                let v = y.read::<T, _>(|ys| g.read::<T, _>(|gs| cpu::map_rows2(ys, gs, n, |_, yr, gr, o| {
                    let s = cpu::rows::sum(gr);
                    cpu::write_row2(o, yr, gr, |yv, gv| gv - yv.exp_fast() * s)
                })))??;
                Ok(vec![Some(Tensor::from_vec(v, y.shape())?)])
            })
        }))
    }
}

/// Applies a last-dim kernel to `dim` by transposing there and back (no graph recorded).
fn along_last(x: &Tensor, dim: usize, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let x = x.detach();
    let last = x.rank() - 1;
    if dim == last {
        return f(&x);
    }
    let xt = x.transpose(dim as isize, last as isize)?;
    f(&xt)?.transpose(dim as isize, last as isize)?.contiguous()
}

/// Inverse of `rows_last`: a flat buffer in (kept dims, reduced dims) order back to `shape`.
fn unpermute_rows<T: crate::WithDType>(
    v: Vec<T>,
    shape: &[usize],
    dims: &[usize],
) -> Result<Tensor> {
    let r = shape.len();
    let mut perm: Vec<usize> = (0..r).filter(|d| !dims.contains(d)).collect();
    perm.extend(dims.iter().copied());
    let pshape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let mut inverse = vec![0; r];
    for (i, &p) in perm.iter().enumerate() {
        inverse[p] = i;
    }
    Tensor::from_vec(v, &pshape)?
        .permute(&inverse)?
        .contiguous()
}
