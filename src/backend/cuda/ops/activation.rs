//! SwiGLU on CUDA (kernels/activation.cu): fused forward silu(gate)·up and fused backward (both
//! gradients in one pass), with 16-byte vector loads/stores when the pointers are aligned. The embedding lookup needs no kernel of its own: `Tensor::embedding`
//! is `index_select` on the table, whose cuda path (ops/index.rs) accepts ids on either device
//! and scatter-adds the gradient rows deterministically.

use super::index::{on_cuda, upstream};
use super::{grid_for, THREADS};
use crate::autograd::record;
use crate::backend::cuda::kernels::suffix;
use crate::backend::cuda::{arg, device};
use crate::{DType, Error, Result, Tensor};

/// Kernel name and grid-stride item count for `n` elements: the 16-byte vector kernel (one
/// item = 16 / sizeof(dtype) elements, the n % VEC tail done inside it) when every pointer is
/// 16-byte aligned, else the scalar one (e.g. a contiguous view at an odd element offset).
fn plan(dir: &str, sfx: &str, ptrs: &[u64], n: usize, dtype: DType) -> (String, usize) {
    if ptrs.iter().all(|p| p.is_multiple_of(16)) {
        let vec = 16 / dtype.size_in_bytes();
        (format!("swiglu_{dir}_vec_{sfx}"), n.div_ceil(vec))
    } else {
        (format!("swiglu_{dir}_{sfx}"), n)
    }
}

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
        let (kernel, items) = plan("fwd", sfx, &[ap, bp, op], n, dtype);
        device()?.launch(
            "activation.cu",
            &kernel,
            (grid_for(items), 1, 1),
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
            let (kernel, items) = plan("bwd", sfx, &[ap, bp, gp, dap, dbp], n, dtype);
            device()?.launch(
                "activation.cu",
                &kernel,
                (grid_for(items), 1, 1),
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
