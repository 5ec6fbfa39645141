//! SwiGLU on CUDA (kernels/activation.cu): fused forward silu(gate)·up and fused backward (both
//! gradients in one pass). The embedding lookup needs no kernel of its own: `Tensor::embedding`
//! is `index_select` on the table, whose cuda path (ops/index.rs) accepts ids on either device
//! and scatter-adds the gradient rows deterministically.

use super::index::{on_cuda, upstream};
use super::{grid_for, THREADS};
use crate::autograd::record;
use crate::backend::cuda::kernels::suffix;
use crate::backend::cuda::{arg, device};
use crate::{Error, Result, Tensor};

/// `gate.swiglu(up)` for cuda tensors of one shape (validated by the caller).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    on_cuda("swiglu", &[gate, up])?;
    let dtype = gate.dtype();
    if up.dtype() != dtype {
        return Err(Error::msg(format!(
            "swiglu: gate is {dtype} but up is {}",
            up.dtype()
        )));
    }
    let sfx = suffix(dtype, "swiglu")?;
    let (a, b) = (gate.detach().contiguous()?, up.detach().contiguous()?);
    let out = Tensor::empty_cuda(gate.shape(), dtype)?;
    let n = out.numel();
    if n > 0 {
        let (ap, bp, op, n64) = (a.cuda_ptr()?, b.cuda_ptr()?, out.cuda_ptr()?, n as i64);
        device()?.launch(
            "activation.cu",
            &format!("swiglu_fwd_{sfx}"),
            (grid_for(n), 1, 1),
            (THREADS as u32, 1, 1),
            0,
            &[arg(&ap), arg(&bp), arg(&op), arg(&n64)],
        )?;
    }
    Ok(record("swiglu", out, &[gate, up], move |g| {
        let g = upstream(g, dtype)?;
        let da = Tensor::empty_cuda(a.shape(), dtype)?;
        let db = Tensor::empty_cuda(a.shape(), dtype)?;
        if n > 0 {
            let (ap, bp, gp) = (a.cuda_ptr()?, b.cuda_ptr()?, g.cuda_ptr()?);
            let (dap, dbp, n64) = (da.cuda_ptr()?, db.cuda_ptr()?, n as i64);
            device()?.launch(
                "activation.cu",
                &format!("swiglu_bwd_{sfx}"),
                (grid_for(n), 1, 1),
                (THREADS as u32, 1, 1),
                0,
                &[
                    arg(&ap),
                    arg(&bp),
                    arg(&gp),
                    arg(&dap),
                    arg(&dbp),
                    arg(&n64),
                ],
            )?;
        }
        Ok(vec![Some(da), Some(db)])
    }))
}
