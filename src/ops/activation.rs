//! Fused gated activation of Qwen2's MLP: swiglu(gate, up) = silu(gate) · up.
//! gate, up [..., I] (same shape) -> [..., I]. Backward, s = sigmoid(gate):
//!   dup = g · gate·s,   dgate = g · up · s·(1 + gate·(1 − s))

use super::elementwise::map2;
use crate::autograd::record;
use crate::backend::cpu;
use crate::tensor::Float;
use crate::tensor::Tensor;
use crate::{float_dispatch, Error, Result};
use num_traits::One;

impl Tensor {
    pub fn swiglu(&self, up: &Tensor) -> Result<Tensor> {
        if self.shape() != up.shape() {
            return Err(Error::shape(
                "swiglu",
                format!("gate {:?} and up {:?} differ", self.shape(), up.shape()),
            ));
        }
        if self.is_cuda() || up.is_cuda() {
            return crate::backend::cuda::ops::activation::swiglu(self, up);
        }
        let (gate, upd) = (self.detach(), up.detach());
        let out = map2!(gate.clone(), upd.clone(), "swiglu", |a, b: T| a
            / (T::one() + (-a).exp_fast())
            * b);
        Ok(record("swiglu", out, &[self, up], move |g| {
            let (gate, up, g) = (gate.contiguous()?, upd.contiguous()?, g.contiguous()?);
            let (dg, du) = float_dispatch!(g.dtype(), "swiglu_backward", T => {
                let (dg, du) = gate.read::<T, _>(|a| up.read::<T, _>(|b| g.read::<T, _>(|gv| {
                    cpu::map3_to2(a, b, gv, |x, y, gi| {
                        let s = T::one() / (T::one() + (-x).exp_fast());
                        (gi * y * s * (T::one() + x * (T::one() - s)), gi * x * s)
                    })
                })))???;
                (Tensor::from_vec(dg, g.shape())?, Tensor::from_vec(du, g.shape())?)
            });
            Ok(vec![Some(dg), Some(du)])
        }))
    }

    /// Token embedding: ids (i64/u32) [...] into table [V, D] -> [..., D]. Backward is a
    /// scatter-add of the output gradient rows into the table's gradient.
    pub fn embedding(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
        if table.rank() != 2 {
            return Err(Error::shape(
                "embedding",
                format!("table must be [V, D], got {:?}", table.shape()),
            ));
        }
        let v = table.shape()[0];
        let flat = ids.flatten_all()?;
        if let Some(bad) = flat.to_indices("embedding")?.into_iter().find(|&i| i >= v) {
            return Err(Error::shape(
                "embedding",
                format!("token id {bad} >= vocabulary size {v}"),
            ));
        }
        let mut shape = ids.shape().to_vec();
        shape.push(table.shape()[1]);
        table.index_select(&flat, 0)?.reshape(&shape)
    }
}
