//! Batched matrix products through the `gemm` crate (strided operands, so transposed views
//! cost no copy), and `linear` with a fused bias.

use crate::autograd::record;
use crate::backend::cpu::{self, MatRef};
use crate::tensor::{broadcast_shapes, Layout, Tensor};
use crate::{float_dispatch, Error, Result};
use rayon::prelude::*;

struct SendPtr<T>(*mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

/// The dims of `a [..., M, K] @ b [..., K, N]`: (M, K, N, broadcast batch), or the error
/// naming what does not fit (shared by the CPU and CUDA paths).
pub(crate) fn matmul_dims(a: &Tensor, b: &Tensor) -> Result<(usize, usize, usize, Vec<usize>)> {
    if a.rank() < 2 || b.rank() < 2 {
        return Err(Error::shape(
            "matmul",
            format!(
                "operands need at least 2 dims, got {:?} and {:?}",
                a.shape(),
                b.shape()
            ),
        ));
    }
    if a.dtype() != b.dtype() {
        return Err(Error::msg(format!(
            "matmul: dtype mismatch {} vs {}",
            a.dtype(),
            b.dtype()
        )));
    }
    let (ra, rb) = (a.rank(), b.rank());
    let (m, k) = (a.shape()[ra - 2], a.shape()[ra - 1]);
    let (k2, n) = (b.shape()[rb - 2], b.shape()[rb - 1]);
    if k != k2 {
        return Err(Error::shape(
            "matmul",
            format!("inner dims differ: {:?} @ {:?}", a.shape(), b.shape()),
        ));
    }
    let batch = broadcast_shapes("matmul", &a.shape()[..ra - 2], &b.shape()[..rb - 2])?;
    Ok((m, k, n, batch))
}

/// a [..., M, K] @ b [..., K, N] -> [batch..., M, N], batch dims broadcast. No graph.
pub(crate) fn matmul_raw(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (m, k, n, batch) = matmul_dims(a, b)?;
    let nb: usize = batch.iter().product();
    let mut out_shape = batch.clone();
    out_shape.extend([m, n]);
    let mut full_a = batch.clone();
    full_a.extend([m, k]);
    let mut full_b = batch.clone();
    full_b.extend([k, n]);
    let la = a.layout().broadcast_as(&full_a)?;
    let lb = b.layout().broadcast_as(&full_b)?;
    // Storage offset of each batch's matrix.
    let batch_offsets = |l: &Layout| -> Vec<usize> {
        let r = l.rank();
        Layout {
            shape: l.shape[..r - 2].to_vec(),
            strides: l.strides[..r - 2].to_vec(),
            offset: l.offset,
        }
        .offsets()
        .collect()
    };
    let (oa, ob) = (batch_offsets(&la), batch_offsets(&lb));
    let r = full_a.len();
    let (ars, acs, brs, bcs) = (
        la.strides[r - 2],
        la.strides[r - 1],
        lb.strides[r - 2],
        lb.strides[r - 1],
    );
    let len = nb
        .checked_mul(m)
        .and_then(|x| x.checked_mul(n))
        .ok_or_else(|| Error::shape("matmul", format!("output {out_shape:?} is too large")))?;
    float_dispatch!(a.dtype(), "matmul", T => {
        // The products store every element (accumulate = false): no zero fill unless k = 0.
        let mut out: Vec<T> = if k == 0 {
            vec![<T as num_traits::Zero>::zero(); len]
        } else {
            Vec::with_capacity(len)
        };
        if k > 0 && m * n > 0 {
            a.read_strided::<T, _>(|xa, _| b.read_strided::<T, _>(|xb, _| {
                let dst = SendPtr(out.as_mut_ptr());
                let run = |i: usize, parallel: bool| unsafe {
                    cpu::gemm(
                        m, n, k,
                        dst.get().add(i * m * n),
                        false,
                        MatRef { ptr: xa.as_ptr().add(oa[i]), rs: ars as isize, cs: acs as isize },
                        MatRef { ptr: xb.as_ptr().add(ob[i]), rs: brs as isize, cs: bcs as isize },
                        parallel,
                    )
                };
                if nb >= cpu::threads() && nb > 1 {
                    (0..nb).into_par_iter().for_each(|i| run(i, false));
                } else {
                    (0..nb).for_each(|i| run(i, true));
                }
            }))??;
            // SAFETY: the `nb` products above stored all m × n elements of each matrix.
            unsafe { out.set_len(len) };
        }
        Tensor::from_vec(out, &out_shape)
    })
}

impl Tensor {
    /// Batched matrix product: self [..., M, K] @ rhs [..., K, N] -> [..., M, N]; batch dims
    /// broadcast; either operand may be a transposed view (no copy).
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        if self.is_cuda() || rhs.is_cuda() {
            return crate::backend::cuda::ops::matmul::matmul(self, rhs);
        }
        let out = matmul_raw(self, rhs)?;
        let (a, b) = (self.detach(), rhs.detach());
        let grads = [self.requires_grad(), rhs.requires_grad()];
        Ok(record("matmul", out, &[self, rhs], move |g| {
            let ga = if grads[0] {
                Some(matmul_raw(g, &b.t()?)?.sum_to_shape(a.shape())?)
            } else {
                None
            };
            let gb = if !grads[1] {
                None
            } else if b.rank() == 2 && a.rank() > 2 {
                // Fold the batch into rows: dB = A2^T @ G2 without a per-batch buffer.
                let k = a.shape()[a.rank() - 1];
                let n = b.shape()[1];
                let a2 = a.reshape(&[usize::MAX, k])?;
                let g2 = g.reshape(&[usize::MAX, n])?;
                Some(matmul_raw(&a2.t()?, &g2)?)
            } else {
                Some(matmul_raw(&a.t()?, g)?.sum_to_shape(b.shape())?)
            };
            Ok(vec![ga, gb])
        }))
    }

    /// `x [..., in] @ weight[out, in]^T + bias[out] -> [..., out]` (PyTorch's nn.Linear).
    pub fn linear(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let din = *self.shape().last().unwrap_or(&0);
        if weight.rank() != 2 || weight.shape()[1] != din {
            return Err(Error::shape(
                "linear",
                format!(
                    "input {:?} does not fit weight {:?} ([out, in])",
                    self.shape(),
                    weight.shape()
                ),
            ));
        }
        let dout = weight.shape()[0];
        if let Some(b) = bias {
            if b.shape() != [dout] {
                return Err(Error::shape(
                    "linear",
                    format!("bias {:?} != [{dout}]", b.shape()),
                ));
            }
        }
        if self.is_cuda() || weight.is_cuda() || bias.is_some_and(|b| b.is_cuda()) {
            return crate::backend::cuda::ops::matmul::linear(self, weight, bias);
        }
        let x2 = self.detach().reshape(&[usize::MAX, din])?;
        let w = weight.detach();
        let mut y = matmul_raw(&x2, &w.t()?)?;
        if let Some(b) = bias {
            y = float_dispatch!(y.dtype(), "linear", T => {
                let bv = b.to_vec::<T>()?;
                let mut v = y.to_vec::<T>()?;
                cpu::for_rows_mut(&mut v, dout, |_, row| {
                    for (e, &bb) in row.iter_mut().zip(&bv) {
                        *e += bb;
                    }
                });
                Tensor::from_vec(v, y.shape())?
            });
        }
        let mut out_shape = self.shape().to_vec();
        *out_shape.last_mut().expect("rank >= 1") = dout;
        let out = y.reshape(&out_shape)?;
        let in_shape = self.shape().to_vec();
        let grads = [
            self.requires_grad(),
            weight.requires_grad(),
            bias.is_some_and(|b| b.requires_grad()),
        ];
        let mut inputs = vec![self, weight];
        if let Some(b) = bias {
            inputs.push(b);
        }
        let has_bias = bias.is_some();
        Ok(record("linear", out, &inputs, move |g| {
            let g2 = g.reshape(&[usize::MAX, dout])?;
            let gx = if grads[0] {
                Some(matmul_raw(&g2, &w)?.reshape(&in_shape)?)
            } else {
                None
            };
            let gw = if grads[1] {
                Some(matmul_raw(&g2.t()?, &x2)?)
            } else {
                None
            };
            let mut res = vec![gx, gw];
            if has_bias {
                res.push(if grads[2] {
                    Some(g2.sum_dims(&[0], false)?)
                } else {
                    None
                });
            }
            Ok(res)
        }))
    }
}
