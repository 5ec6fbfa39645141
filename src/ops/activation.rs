//! Fused gated activation of Qwen2's MLP: swiglu(gate, up) = silu(gate) · up.
//! gate, up [..., I] (same shape) -> [..., I]. Backward, s = sigmoid(gate):
//!   dup = g · gate·s,   dgate = g · up · s·(1 + gate·(1 − s))

use super::elementwise::map2;
use crate::autograd::record;
use crate::backend::cpu;
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
        let (gate, upd) = (self.detach(), up.detach());
        let out = map2!(gate.clone(), upd.clone(), "swiglu", |a, b: T| a
            / (T::one() + (-a).exp())
            * b);
        Ok(record("swiglu", out, &[self, up], move |g| {
            let (gate, up, g) = (gate.contiguous()?, upd.contiguous()?, g.contiguous()?);
            let (dg, du) = float_dispatch!(g.dtype(), "swiglu_backward", T => {
                let (a, b, gv) = (gate.to_vec::<T>()?, up.to_vec::<T>()?, g.to_vec::<T>()?);
                let mut dg = vec![T::one(); a.len()];
                let mut du = vec![T::one(); a.len()];
                let (pg, pu) = (cpu::SyncPtr::new(dg.as_mut_ptr()), cpu::SyncPtr::new(du.as_mut_ptr()));
                let n = a.len();
                let work = |i: usize| {
                    let s = T::one() / (T::one() + (-a[i]).exp());
                    unsafe {
                        *pu.get().add(i) = gv[i] * a[i] * s;
                        *pg.get().add(i) = gv[i] * b[i] * s * (T::one() + a[i] * (T::one() - s));
                    }
                };
                if n >= cpu::PAR_MIN {
                    use rayon::prelude::*;
                    (0..n).into_par_iter().for_each(work);
                } else {
                    (0..n).for_each(work);
                }
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
