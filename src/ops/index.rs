//! Indexing and assembly: cat, stack, index_select, gather, where_cond, masked_fill,
//! masked_scatter. Shapes in each doc comment.

use crate::autograd::record;
use crate::tensor::Tensor;
use crate::{any_dispatch, float_dispatch, Error, Result};

/// (outer, size along dim, inner) of `shape` around `dim`.
fn split_at(shape: &[usize], dim: usize) -> (usize, usize, usize) {
    (
        shape[..dim].iter().product(),
        shape[dim],
        shape[dim + 1..].iter().product(),
    )
}

impl Tensor {
    /// Concatenates along `dim`; every input has the same shape except on `dim`.
    pub fn cat(tensors: &[&Tensor], dim: isize) -> Result<Tensor> {
        let first = tensors
            .first()
            .ok_or_else(|| Error::msg("cat: no tensors given"))?;
        let d = first.normalize_dim(dim, "cat")?;
        let mut shape = first.shape().to_vec();
        shape[d] = 0;
        for t in tensors {
            let ok = t.rank() == first.rank()
                && t.dtype() == first.dtype()
                && (0..t.rank()).all(|i| i == d || t.shape()[i] == first.shape()[i]);
            if !ok {
                return Err(Error::shape(
                    "cat",
                    format!(
                        "{:?} {} does not match {:?} {} outside dim {d}",
                        t.shape(),
                        t.dtype(),
                        first.shape(),
                        first.dtype()
                    ),
                ));
            }
            shape[d] += t.shape()[d];
        }
        let (outer, _, inner) = split_at(&shape, d);
        let out = if tensors.iter().any(|t| t.is_cuda()) {
            // Errors when some inputs are on the cpu.
            crate::backend::cuda::ops::index::cat(tensors, d, &shape)?
        } else {
            any_dispatch!(first.dtype(), T => {
                let parts: Vec<Vec<T>> = tensors.iter().map(|t| t.to_vec::<T>()).collect::<Result<_>>()?;
                let mut out: Vec<T> = Vec::with_capacity(shape.iter().product());
                for o in 0..outer {
                    for (t, p) in tensors.iter().zip(&parts) {
                        let row = t.shape()[d] * inner;
                        out.extend_from_slice(&p[o * row..(o + 1) * row]);
                    }
                }
                Tensor::from_vec(out, &shape)?
            })
        };
        let sizes: Vec<usize> = tensors.iter().map(|t| t.shape()[d]).collect();
        Ok(record("cat", out, tensors, move |g| {
            Ok(g.split(&sizes, d as isize)?.into_iter().map(Some).collect())
        }))
    }

    /// Zero-pads along `dim`: `before` zeros, this tensor, then `after` zeros. The same values
    /// (and bits) as `cat` with zero tensors, without building and reading them: one zeroed
    /// output and one copy. Narrow's backward.
    pub fn zero_pad(&self, dim: isize, before: usize, after: usize) -> Result<Tensor> {
        let d = self.normalize_dim(dim, "zero_pad")?;
        let len = self.shape()[d];
        let mut shape = self.shape().to_vec();
        shape[d] = before + len + after;
        let out = if self.is_cuda() {
            crate::backend::cuda::ops::index::zero_pad(self, d, before, &shape)?
        } else {
            let (outer, size, inner) = split_at(&shape, d);
            any_dispatch!(self.dtype(), T => {
                let src = self.to_vec::<T>()?;
                let mut out = vec![<T as crate::tensor::WithDType>::from_f64(0.0); outer * size * inner];
                let row = len * inner;
                for o in 0..outer {
                    let at = o * size * inner + before * inner;
                    out[at..at + row].copy_from_slice(&src[o * row..(o + 1) * row]);
                }
                Tensor::from_vec(out, &shape)?
            })
        };
        Ok(record("zero_pad", out, &[self], move |g| {
            Ok(vec![Some(g.narrow(d as isize, before, len)?)])
        }))
    }

    /// Stacks same-shape tensors along a new dim.
    pub fn stack(tensors: &[&Tensor], dim: isize) -> Result<Tensor> {
        let u: Vec<Tensor> = tensors
            .iter()
            .map(|t| t.unsqueeze(dim))
            .collect::<Result<_>>()?;
        Tensor::cat(&u.iter().collect::<Vec<_>>(), dim)
    }

    /// Picks entries along `dim` by `indices` (i64/u32 [n]): the output has size n on `dim`.
    pub fn index_select(&self, indices: &Tensor, dim: isize) -> Result<Tensor> {
        let d = self.normalize_dim(dim, "index_select")?;
        if indices.rank() != 1 {
            return Err(Error::shape(
                "index_select",
                format!("indices must be 1-d, got {:?}", indices.shape()),
            ));
        }
        let idx = indices.to_indices("index_select")?;
        let (outer, size, inner) = split_at(self.shape(), d);
        if let Some(&bad) = idx.iter().find(|&&i| i >= size) {
            return Err(Error::shape(
                "index_select",
                format!("index {bad} out of range for dim {d} of {:?}", self.shape()),
            ));
        }
        if self.is_cuda() {
            // `indices` may be on either device (read on the host above).
            return crate::backend::cuda::ops::index::index_select(self, idx, d);
        }
        let mut shape = self.shape().to_vec();
        shape[d] = idx.len();
        let out = any_dispatch!(self.dtype(), T => {
            let x = self.to_vec::<T>()?;
            let mut out: Vec<T> = Vec::with_capacity(outer * idx.len() * inner);
            for o in 0..outer {
                for &i in &idx {
                    let s = (o * size + i) * inner;
                    out.extend_from_slice(&x[s..s + inner]);
                }
            }
            Tensor::from_vec(out, &shape)?
        });
        let in_shape = self.shape().to_vec();
        Ok(record("index_select", out, &[self], move |g| {
            // scatter-add the gradient rows back to the rows they were read from
            let gi = float_dispatch!(g.dtype(), "index_select_backward", T => {
                let gv = g.to_vec::<T>()?;
                let mut dx = vec![<T as num_traits::Zero>::zero(); outer * size * inner];
                for o in 0..outer {
                    for (k, &i) in idx.iter().enumerate() {
                        let src = (o * idx.len() + k) * inner;
                        let dst = (o * size + i) * inner;
                        for j in 0..inner {
                            dx[dst + j] += gv[src + j];
                        }
                    }
                }
                Tensor::from_vec(dx, &in_shape)?
            });
            Ok(vec![Some(gi)])
        }))
    }

    /// torch.gather: `index` (i64/u32) has this tensor's rank and, off `dim`, no larger
    /// sizes; out[..., j, ...] = self[..., index[..., j, ...], ...] along `dim`.
    pub fn gather(&self, index: &Tensor, dim: isize) -> Result<Tensor> {
        let d = self.normalize_dim(dim, "gather")?;
        if index.rank() != self.rank()
            || (0..self.rank()).any(|i| i != d && index.shape()[i] > self.shape()[i])
        {
            return Err(Error::shape(
                "gather",
                format!(
                    "index {:?} does not fit input {:?} on dim {d}",
                    index.shape(),
                    self.shape()
                ),
            ));
        }
        let idx = index.to_indices("gather")?;
        let size = self.shape()[d];
        if let Some(&bad) = idx.iter().find(|&&i| i >= size) {
            return Err(Error::shape(
                "gather",
                format!("index {bad} out of range 0..{size}"),
            ));
        }
        // Source offset of each output element (contiguous strides of the input).
        let xs = crate::tensor::contiguous_strides(self.shape());
        let ishape = index.shape().to_vec();
        let mut src = Vec::with_capacity(idx.len());
        let mut pos = vec![0usize; ishape.len()];
        for &i in &idx {
            let mut off = 0;
            for a in 0..ishape.len() {
                off += if a == d { i } else { pos[a] } * xs[a];
            }
            src.push(off);
            for a in (0..ishape.len()).rev() {
                pos[a] += 1;
                if pos[a] < ishape[a] {
                    break;
                }
                pos[a] = 0;
            }
        }
        if self.is_cuda() {
            return crate::backend::cuda::ops::index::gather(self, src, &ishape);
        }
        let out = any_dispatch!(self.dtype(), T => {
            let x = self.to_vec::<T>()?;
            Tensor::from_vec(src.iter().map(|&o| x[o]).collect::<Vec<T>>(), &ishape)?
        });
        let in_shape = self.shape().to_vec();
        Ok(record("gather", out, &[self], move |g| {
            let gi = float_dispatch!(g.dtype(), "gather_backward", T => {
                let gv = g.to_vec::<T>()?;
                let mut dx = vec![<T as num_traits::Zero>::zero(); in_shape.iter().product()];
                for (k, &o) in src.iter().enumerate() {
                    dx[o] += gv[k];
                }
                Tensor::from_vec(dx, &in_shape)?
            });
            Ok(vec![Some(gi)])
        }))
    }

    /// `cond ? a : b` elementwise; all three broadcast together. `cond`: any dtype, nonzero
    /// = true.
    pub fn where_cond(cond: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let shape = crate::tensor::broadcast_shapes("where", a.shape(), b.shape())?;
        let shape = crate::tensor::broadcast_shapes("where", &shape, cond.shape())?;
        if a.is_cuda() || b.is_cuda() {
            // `cond` may be on either device; a and b must both be on cuda.
            return crate::backend::cuda::ops::index::where_cond(cond, a, b, &shape);
        }
        let mask = cond.broadcast_as(&shape)?.to_mask()?;
        let out = float_dispatch!(a.dtype(), "where", T => {
            let av = a.detach().broadcast_as(&shape)?.to_vec::<T>()?;
            let bv = b.detach().broadcast_as(&shape)?.to_vec::<T>()?;
            let v: Vec<T> = mask.iter().zip(av.iter().zip(&bv)).map(|(&m, (&x, &y))| if m { x } else { y }).collect();
            Tensor::from_vec(v, &shape)?
        });
        let (sa, sb) = (a.shape().to_vec(), b.shape().to_vec());
        let mask_t =
            Tensor::from_vec(mask.iter().map(|&m| m as u32).collect::<Vec<u32>>(), &shape)?;
        Ok(record("where", out, &[a, b], move |g| {
            let zero = Tensor::zeros(&[], g.dtype())?;
            let ga = Tensor::where_cond(&mask_t, g, &zero)?.sum_to_shape(&sa)?;
            let gb = Tensor::where_cond(&mask_t, &zero, g)?.sum_to_shape(&sb)?;
            Ok(vec![Some(ga), Some(gb)])
        }))
    }

    /// `value` where `mask` (broadcast to this shape) is nonzero.
    pub fn masked_fill(&self, mask: &Tensor, value: f64) -> Result<Tensor> {
        if self.is_cuda() {
            // `mask` may be on either device.
            return crate::backend::cuda::ops::index::masked_fill(self, mask, value);
        }
        let v = Tensor::scalar(value, self.dtype())?;
        let m = mask.broadcast_as(self.shape())?;
        Tensor::where_cond(&m, &v, self)
    }

    /// Fills the positions where `mask` (broadcastable to this shape, nonzero = true) is set
    /// with consecutive elements of `source` in row-major order (HF `masked_scatter`, used to
    /// put image features into the token embeddings). `source` must have at least as many
    /// elements as the mask has set positions.
    pub fn masked_scatter(&self, mask: &Tensor, source: &Tensor) -> Result<Tensor> {
        if self.is_cuda() || source.is_cuda() {
            // `mask` may be on either device; self and source must both be on cuda.
            return crate::backend::cuda::ops::index::masked_scatter(self, mask, source);
        }
        let mask = mask.broadcast_as(self.shape())?.to_mask()?;
        let count = mask.iter().filter(|&&m| m).count();
        if source.numel() < count {
            return Err(Error::shape(
                "masked_scatter",
                format!(
                    "mask selects {count} elements but source {:?} has only {}",
                    source.shape(),
                    source.numel()
                ),
            ));
        }
        let out = float_dispatch!(self.dtype(), "masked_scatter", T => {
            let mut x = self.to_vec::<T>()?;
            let s = source.to_vec::<T>()?;
            let mut k = 0;
            for (e, &m) in x.iter_mut().zip(&mask) {
                if m {
                    *e = s[k];
                    k += 1;
                }
            }
            Tensor::from_vec(x, self.shape())?
        });
        let (src_shape, src_n) = (source.shape().to_vec(), source.numel());
        Ok(record("masked_scatter", out, &[self, source], move |g| {
            let (gx, gs) = float_dispatch!(g.dtype(), "masked_scatter_backward", T => {
                let gv = g.to_vec::<T>()?;
                let zero = <T as num_traits::Zero>::zero();
                let mut gs = vec![zero; src_n];
                let mut k = 0;
                let gx: Vec<T> = gv.iter().zip(&mask).map(|(&v, &m)| {
                    if m {
                        gs[k] = v;
                        k += 1;
                        zero
                    } else {
                        v
                    }
                }).collect();
                (Tensor::from_vec(gx, g.shape())?, Tensor::from_vec(gs, &src_shape)?)
            });
            Ok(vec![Some(gx), Some(gs)])
        }))
    }
}
