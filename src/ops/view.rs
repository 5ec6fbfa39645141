//! Views and shape ops: reshape, permute/transpose, narrow, broadcast, squeeze/unsqueeze,
//! contiguous. Views share the buffer; each records a backward that maps the gradient back
//! to the input's shape.

use crate::autograd::record;
use crate::backend::cpu;
use crate::tensor::{contiguous_strides, Layout, Tensor};
use crate::{any_dispatch, DType, Error, Result, WithDType};

fn copy_contiguous<T: WithDType>(t: &Tensor) -> Result<Tensor> {
    let v = t.read_strided::<T, _>(cpu::gather_strided)?;
    Tensor::from_vec(v, t.shape())
}

impl Tensor {
    /// A contiguous tensor with the same values (self when already contiguous).
    pub fn contiguous(&self) -> Result<Tensor> {
        if self.is_contiguous() {
            return Ok(self.clone());
        }
        let out = if self.is_cuda() {
            crate::backend::cuda::ops::contiguous(self)?
        } else {
            any_dispatch!(self.dtype(), T => copy_contiguous::<T>(self)?)
        };
        Ok(record("contiguous", out, &[self], |g| {
            Ok(vec![Some(g.clone())])
        }))
    }

    /// Same elements, new shape. `shape` may contain one `usize::MAX` meaning "the rest".
    /// Copies only when the layout is not contiguous.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let mut shape = shape.to_vec();
        if let Some(i) = shape.iter().position(|&d| d == usize::MAX) {
            let known: usize = shape.iter().filter(|&&d| d != usize::MAX).product();
            if known == 0 || !self.numel().is_multiple_of(known) {
                return Err(Error::shape(
                    "reshape",
                    format!("cannot infer a dim reshaping {:?}", self.shape()),
                ));
            }
            shape[i] = self.numel() / known;
        }
        if shape.iter().product::<usize>() != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!("cannot reshape {:?} into {shape:?}", self.shape()),
            ));
        }
        if shape == self.shape() {
            return Ok(self.clone());
        }
        let src = self.contiguous()?;
        let layout = Layout {
            strides: contiguous_strides(&shape),
            shape: shape.clone(),
            offset: src.layout().offset,
        };
        let in_shape = self.shape().to_vec();
        let out = src.view_with(layout);
        Ok(record("reshape", out, &[&src], move |g| {
            Ok(vec![Some(g.reshape(&in_shape)?)])
        }))
    }

    /// Collapses everything into one dimension.
    pub fn flatten_all(&self) -> Result<Tensor> {
        self.reshape(&[self.numel()])
    }

    /// Reorders dimensions: output dim i is input dim `dims[i]`.
    pub fn permute(&self, dims: &[usize]) -> Result<Tensor> {
        let r = self.rank();
        let mut seen = vec![false; r];
        if dims.len() != r
            || dims
                .iter()
                .any(|&d| d >= r || std::mem::replace(&mut seen[d], true))
        {
            return Err(Error::shape(
                "permute",
                format!(
                    "{dims:?} is not a permutation of the dims of {:?}",
                    self.shape()
                ),
            ));
        }
        let l = self.layout();
        let layout = Layout {
            shape: dims.iter().map(|&d| l.shape[d]).collect(),
            strides: dims.iter().map(|&d| l.strides[d]).collect(),
            offset: l.offset,
        };
        let mut inverse = vec![0; r];
        for (i, &d) in dims.iter().enumerate() {
            inverse[d] = i;
        }
        let out = self.view_with(layout);
        Ok(record("permute", out, &[self], move |g| {
            Ok(vec![Some(g.permute(&inverse)?)])
        }))
    }

    /// Swaps two dims (negative counts from the end).
    pub fn transpose(&self, d0: isize, d1: isize) -> Result<Tensor> {
        let (a, b) = (
            self.normalize_dim(d0, "transpose")?,
            self.normalize_dim(d1, "transpose")?,
        );
        let mut dims: Vec<usize> = (0..self.rank()).collect();
        dims.swap(a, b);
        self.permute(&dims)
    }

    /// Transpose of the last two dims.
    pub fn t(&self) -> Result<Tensor> {
        self.transpose(-2, -1)
    }

    /// Elements `start..start+len` along `dim` (a view).
    pub fn narrow(&self, dim: isize, start: usize, len: usize) -> Result<Tensor> {
        let d = self.normalize_dim(dim, "narrow")?;
        let size = self.shape()[d];
        if start + len > size {
            return Err(Error::shape(
                "narrow",
                format!(
                    "{start}..{} out of range 0..{size} on dim {d} of {:?}",
                    start + len,
                    self.shape()
                ),
            ));
        }
        let mut layout = self.layout().clone();
        layout.offset += start * layout.strides[d];
        layout.shape[d] = len;
        let out = self.view_with(layout);
        Ok(record("narrow", out, &[self], move |g| {
            // The gradient zero-padded back to the input's extent along `d`.
            Ok(vec![Some(g.zero_pad(
                d as isize,
                start,
                size - start - len,
            )?)])
        }))
    }

    /// Splits `dim` into pieces of the given sizes (views). One node for all the pieces: the
    /// backward concatenates their gradients (zeros for a piece without one) into one new
    /// tensor, where a narrow per piece would zero-pad each gradient to the whole and add.
    pub fn split(&self, sizes: &[usize], dim: isize) -> Result<Vec<Tensor>> {
        let d = self.normalize_dim(dim, "split")?;
        if sizes.iter().sum::<usize>() != self.shape()[d] {
            return Err(Error::shape(
                "split",
                format!(
                    "sizes {sizes:?} do not add up to dim {d} of {:?}",
                    self.shape()
                ),
            ));
        }
        let mut start = 0;
        let parts = crate::autograd::no_grad(|| {
            sizes
                .iter()
                .map(|&s| {
                    let t = self.narrow(d as isize, start, s);
                    start += s;
                    t
                })
                .collect::<Result<Vec<_>>>()
        })?;
        let shapes: Vec<Vec<usize>> = parts.iter().map(|t| t.shape().to_vec()).collect();
        let (dtype, device) = (self.dtype(), self.device());
        Ok(crate::autograd::record_many(
            "split",
            parts,
            &[self],
            move |gs| {
                // Zeros in the dtype of the gradients that came (cat wants one dtype).
                let dtype = gs.iter().flatten().next().map_or(dtype, |g| g.dtype());
                let full: Vec<Tensor> = gs
                    .iter()
                    .zip(&shapes)
                    .map(|(g, shape)| match g {
                        Some(g) => Ok(g.clone()),
                        None => Tensor::zeros_on(shape, dtype, device),
                    })
                    .collect::<Result<_>>()?;
                Ok(vec![Some(Tensor::cat(
                    &full.iter().collect::<Vec<_>>(),
                    d as isize,
                )?)])
            },
        ))
    }

    /// Numpy-style broadcast to `shape` (a view with zero strides).
    pub fn broadcast_as(&self, shape: &[usize]) -> Result<Tensor> {
        if shape == self.shape() {
            return Ok(self.clone());
        }
        let layout = self.layout().broadcast_as(shape)?;
        let in_shape = self.shape().to_vec();
        let out = self.view_with(layout);
        Ok(record("broadcast", out, &[self], move |g| {
            Ok(vec![Some(g.sum_to_shape(&in_shape)?)])
        }))
    }

    /// Alias of `broadcast_as`.
    pub fn expand(&self, shape: &[usize]) -> Result<Tensor> {
        self.broadcast_as(shape)
    }

    /// Removes a size-1 dim.
    pub fn squeeze(&self, dim: isize) -> Result<Tensor> {
        let d = self.normalize_dim(dim, "squeeze")?;
        if self.shape()[d] != 1 {
            return Err(Error::shape(
                "squeeze",
                format!("dim {d} of {:?} is not 1", self.shape()),
            ));
        }
        let mut l = self.layout().clone();
        l.shape.remove(d);
        l.strides.remove(d);
        self.shape_view("squeeze", l)
    }

    /// Inserts a size-1 dim at `dim` (0..=rank; negative counts from the end).
    pub fn unsqueeze(&self, dim: isize) -> Result<Tensor> {
        let r = self.rank() as isize;
        let d = if dim < 0 { dim + r + 1 } else { dim };
        if d < 0 || d > r {
            return Err(Error::shape(
                "unsqueeze",
                format!("dim {dim} out of range for {:?}", self.shape()),
            ));
        }
        let d = d as usize;
        let mut l = self.layout().clone();
        let stride = if d < l.rank() {
            l.strides[d] * l.shape[d]
        } else {
            1
        };
        l.shape.insert(d, 1);
        l.strides.insert(d, stride);
        self.shape_view("unsqueeze", l)
    }

    fn shape_view(&self, name: &'static str, layout: Layout) -> Result<Tensor> {
        let in_shape = self.shape().to_vec();
        let out = self.view_with(layout);
        Ok(record(name, out, &[self], move |g| {
            Ok(vec![Some(g.reshape(&in_shape)?)])
        }))
    }

    /// Sums a broadcast gradient back down to `shape` (the inverse of `broadcast_as`).
    pub fn sum_to_shape(&self, shape: &[usize]) -> Result<Tensor> {
        if self.shape() == shape {
            return Ok(self.clone());
        }
        let extra = self.rank().checked_sub(shape.len()).ok_or_else(|| {
            Error::shape(
                "sum_to_shape",
                format!("{:?} has fewer dims than {shape:?}", self.shape()),
            )
        })?;
        let mut dims: Vec<usize> = (0..extra).collect();
        for (i, &s) in shape.iter().enumerate() {
            if s == 1 && self.shape()[extra + i] != 1 {
                dims.push(extra + i);
            }
        }
        let summed = if dims.is_empty() {
            self.clone()
        } else {
            self.sum_dims(&dims, true)?
        };
        summed.reshape(shape)
    }

    /// Cast to another dtype (gradient cast back for float inputs).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        // Through f64: exact for every dtype here except i64 beyond 2^53 (ids never are).
        let out = match (self.dtype(), dtype) {
            (DType::F32, DType::BF16) | (DType::BF16, DType::F32) if self.is_cuda() => {
                crate::backend::cuda::ops::cast(self, dtype)?
            }
            _ if self.is_cuda() => crate::no_grad(|| self.to_cpu()?.to_dtype(dtype)?.to_cuda())?,
            (DType::F32, DType::BF16) => Tensor::from_vec(
                self.to_vec::<f32>()?
                    .into_iter()
                    .map(half::bf16::from_f32)
                    .collect::<Vec<_>>(),
                self.shape(),
            )?,
            (DType::F32, DType::F16) => Tensor::from_vec(
                self.to_vec::<f32>()?
                    .into_iter()
                    .map(half::f16::from_f32)
                    .collect::<Vec<_>>(),
                self.shape(),
            )?,
            _ => Tensor::from_f64s(&self.to_f64s()?, self.shape(), dtype)?,
        };
        let from = self.dtype();
        if !(from.is_float() && dtype.is_float()) {
            return Ok(out);
        }
        Ok(record("to_dtype", out, &[self], move |g| {
            Ok(vec![Some(g.to_dtype(from)?)])
        }))
    }

    /// `self.to_dtype(copy.dtype())` from a `copy` that already holds exactly those values
    /// (an optimiser's mixed-precision compute copy, `AdamW::compute_params`): no kernel, the
    /// result shares the copy's storage, and the gradient flows back to `self` as through
    /// `to_dtype`.
    pub fn cast_from_copy(&self, copy: &Tensor) -> Result<Tensor> {
        if copy.shape() != self.shape() || copy.device() != self.device() {
            return Err(Error::shape(
                "cast_from_copy",
                format!(
                    "copy {:?} on {} for a tensor {:?} on {}",
                    copy.shape(),
                    copy.device(),
                    self.shape(),
                    self.device()
                ),
            ));
        }
        let from = self.dtype();
        let out = copy.detach();
        if !(from.is_float() && copy.dtype().is_float()) {
            return Ok(out);
        }
        Ok(record("to_dtype", out, &[self], move |g| {
            Ok(vec![Some(g.to_dtype(from)?)])
        }))
    }
}
