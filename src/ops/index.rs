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
        let idx = std::sync::Arc::new(idx);
        let (idx2, shape2) = (idx.clone(), in_shape.clone());
        Ok(crate::autograd::record_into(
            "index_select",
            out,
            self,
            move |g| {
                let dense = index_select_grad(g, &idx, (outer, size, inner), &in_shape)?;
                Ok(vec![Some(dense)])
            },
            move |g, total| {
                // Into the input's gradient so far (a tied lm_head's): its rows in place when
                // that gradient is this pass's own, else the dense gradient added.
                if total.can_write_in_place(&shape2, g.dtype(), crate::Device::Cpu) {
                    #[cfg(test)]
                    tests::IN_PLACE.with(|n| n.set(n.get() + 1));
                    let g = g.contiguous()?;
                    float_dispatch!(g.dtype(), "index_select_backward", T => {
                        g.read::<T, _>(|gv| {
                            total.write::<T, _>(|tv| {
                                add_selected_rows(gv, tv, &idx2, (outer, size, inner))
                            })
                        })??
                    });
                    return Ok(total);
                }
                total.add(&index_select_grad(g, &idx2, (outer, size, inner), &shape2)?)
            },
        ))
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

/// index_select's gradient: the rows of `g` summed back into the rows they were read from, in
/// a zeroed input-shaped tensor (on the CPU).
fn index_select_grad(
    g: &Tensor,
    idx: &[usize],
    (outer, size, inner): (usize, usize, usize),
    in_shape: &[usize],
) -> Result<Tensor> {
    Ok(float_dispatch!(g.dtype(), "index_select_backward", T => {
        let mut dx = vec![<T as num_traits::Zero>::zero(); outer * size * inner];
        g.contiguous()?.read::<T, _>(|gv| add_selected_rows(gv, &mut dx, idx, (outer, size, inner)))?;
        Tensor::from_vec(dx, in_shape)?
    }))
}

/// dx[o, idx[k], :] += Σ g[o, k, :] over each row's selections: each selected row's sum formed
/// on its own, in the order of k, from zero, and then added to dx once, so that adding into a
/// zeroed dx (`index_select_grad`) or into a gradient accumulated so far (`record_into`) give
/// the bits of that sum added to what dx held.
fn add_selected_rows<T: crate::Float>(
    g: &[T],
    dx: &mut [T],
    idx: &[usize],
    (outer, size, inner): (usize, usize, usize),
) {
    // The selections of each row, in order (rows by index).
    let mut order: Vec<usize> = (0..idx.len()).collect();
    order.sort_by_key(|&k| idx[k]);
    let mut acc = vec![<T as num_traits::Zero>::zero(); inner];
    for o in 0..outer {
        let mut p = 0;
        while p < order.len() {
            let row = idx[order[p]];
            acc.iter_mut()
                .for_each(|a| *a = <T as num_traits::Zero>::zero());
            while p < order.len() && idx[order[p]] == row {
                let src = (o * idx.len() + order[p]) * inner;
                for (a, &v) in acc.iter_mut().zip(&g[src..src + inner]) {
                    *a += v;
                }
                p += 1;
            }
            let dst = (o * size + row) * inner;
            for (d, &a) in dx[dst..dst + inner].iter_mut().zip(&acc) {
                *d += a;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{DType, Rng, Tensor};
    thread_local! {
        /// Times the CPU index_select gradient was added into an accumulated gradient in place,
        /// on this thread (the backward runs on the thread that calls it; tests run in parallel).
        pub(super) static IN_PLACE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    fn in_place() -> usize {
        IN_PLACE.with(|n| n.get())
    }

    fn randn(shape: &[usize], rng: &mut Rng) -> Tensor {
        Tensor::randn(shape, 1.0, DType::F32, rng).unwrap()
    }

    /// A tied embedding: the table W read by index_select (ids with repeats) and used as the
    /// output projection. Its gradient, accumulated in place into the projection's, has the bits
    /// of the two gradients computed apart (untied leaves) and added.
    #[test]
    fn index_select_into_a_tied_gradient_matches_the_dense_sum() {
        let mut rng = Rng::new(7);
        let (v, c, t) = (50, 8, 12);
        let w0 = randn(&[v, c], &mut rng);
        let up = randn(&[t, c], &mut rng);
        let down = randn(&[t, v], &mut rng);
        let ids =
            Tensor::from_vec((0..t as i64).map(|i| (i * 7) % 9).collect::<Vec<_>>(), &[t]).unwrap();
        // As in the model: the lookup first, the head's product on what came of it, so the
        // head's backward (and its gradient for W) comes before the lookup's.
        let loss = |emb: &Tensor, head: &Tensor| -> Tensor {
            let hidden = emb.index_select(&ids, 0).unwrap().mul(&up).unwrap();
            hidden
                .linear(head, None)
                .unwrap()
                .mul(&down)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let w = w0.requires_grad_();
        let before = in_place();
        loss(&w, &w).backward().unwrap();
        assert!(
            in_place() > before,
            "the embedding's gradient did not go into the head's in place"
        );
        let (we, wh) = (w0.requires_grad_(), w0.requires_grad_());
        loss(&we, &wh).backward().unwrap();
        let expect = wh.grad().unwrap().add(&we.grad().unwrap()).unwrap();
        assert_eq!(
            w.grad().unwrap().to_f64s().unwrap(),
            expect.to_f64s().unwrap()
        );
        // The table an op's output (a cast of the masters, say): the gradient so far sits in
        // that node's slot, not on a leaf.
        let w = w0.requires_grad_();
        let before = in_place();
        let table = w.mul_scalar(0.5).unwrap();
        loss(&table, &table).backward().unwrap();
        assert!(in_place() > before, "not in place through a node");
        let (we, wh) = (w0.requires_grad_(), w0.requires_grad_());
        loss(&we.mul_scalar(0.5).unwrap(), &wh.mul_scalar(0.5).unwrap())
            .backward()
            .unwrap();
        let expect = wh.grad().unwrap().add(&we.grad().unwrap()).unwrap();
        let got = w.grad().unwrap().to_f64s().unwrap();
        for (a, b) in got.iter().zip(expect.to_f64s().unwrap()) {
            // (a + b)·0.5 against a·0.5 + b·0.5: equal up to rounding.
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
        }
    }

    /// When the gradient so far is shared (an add passes one gradient to both its inputs), it is
    /// not written in place: the other input's gradient stays its own.
    #[test]
    fn index_select_into_a_shared_gradient_leaves_it_alone() {
        let mut rng = Rng::new(8);
        let (v, c) = (6, 4);
        let w = randn(&[v, c], &mut rng).requires_grad_();
        let z = randn(&[v, c], &mut rng).requires_grad_();
        let ids = Tensor::from_vec(vec![1i64, 3, 3], &[3]).unwrap();
        let up = randn(&[3, c], &mut rng);
        // s = Σ (W + (Z + a)), a = Σ W[ids] · up: the outer add's backward gives W and Z + a
        // one gradient tensor, which reaches Z's leaf unchanged; the lookup's backward, upstream
        // of both, comes last and finds W's gradient shared with Z's.
        let a = w
            .index_select(&ids, 0)
            .unwrap()
            .mul(&up)
            .unwrap()
            .sum_all()
            .unwrap();
        let s = w.add(&z.add(&a).unwrap()).unwrap().sum_all().unwrap();
        let before = in_place();
        s.backward().unwrap();
        assert_eq!(in_place(), before, "a shared gradient written in place");
        assert_eq!(z.grad().unwrap().to_f64s().unwrap(), vec![1.0; v * c]);
        let gw = w.grad().unwrap().to_f64s().unwrap();
        let upv = up.to_f64s().unwrap();
        let n = (v * c) as f64;
        for r in 0..v {
            for j in 0..c {
                let picked: f64 = match r {
                    1 => upv[j],
                    3 => upv[c + j] + upv[2 * c + j],
                    _ => 0.0,
                };
                let want = 1.0 + n * picked;
                assert!(
                    (gw[r * c + j] - want).abs() < 1e-4 * want.abs().max(1.0),
                    "row {r}"
                );
            }
        }
    }
}
