//! Optimisers, gradient clipping and learning-rate schedules.
//!
//! All optimisers follow PyTorch's semantics (single-tensor reference path) and update
//! parameters in place through [`Tensor::write`], so any view sharing a parameter's buffer
//! sees the new values. The learning rate is not part of an optimiser's configuration: the
//! caller passes it to every `step(lr)`, normally from an [`LrSchedule`]:
//!
//! ```ignore
//! let mut opt = AdamW::new(params.clone(), AdamWConfig::default())?;
//! let sched = LrSchedule::WarmupCosine { peak_lr: 1e-4, min_lr: 0.0, warmup_steps: 100, total_steps: 1000 };
//! for step in 0..1000 {
//!     loss(&params)?.backward()?;
//!     clip_grad_norm(&params, 1.0)?;
//!     opt.step(sched.lr_at(step))?;
//!     opt.zero_grad();
//! }
//! ```
//!
//! Parameters are f32 or f64 contiguous leaf tensors (`requires_grad_()`); a parameter's
//! optimiser state (moments, momentum buffer) has the parameter's dtype and device. Parameters
//! whose `grad()` is `None` at a step are skipped, as torch does.
//!
//! CUDA parameters (f32 only: master weights) are updated by fused kernels
//! (`backend::cuda::ops::optim`) with the same arithmetic; their state lives on the device,
//! `state()` snapshots it to the CPU and `load_state()` moves it back.

pub mod adamw;
pub mod clip;
pub mod schedule;
pub mod sgd;

pub use adamw::{AdamW, AdamWConfig, AdamWParamState, AdamWState};
pub use clip::clip_grad_norm;
pub use schedule::LrSchedule;
pub use sgd::{Sgd, SgdConfig, SgdState};

use crate::{DType, Error, Result, Tensor};
use std::collections::HashSet;

/// Parameters sharing optimiser hyper-parameters (torch's "param group"); today only the
/// weight decay is per group (e.g. 0 for biases and norms, 0.1 for matrices).
#[derive(Debug, Clone)]
pub struct ParamGroup {
    pub params: Vec<Tensor>,
    pub weight_decay: f64,
}

impl ParamGroup {
    pub fn new(params: Vec<Tensor>, weight_decay: f64) -> Self {
        ParamGroup {
            params,
            weight_decay,
        }
    }
}

/// Checks that every parameter is a contiguous f32/f64 tensor appearing once, and every
/// weight decay is finite and non-negative.
pub(crate) fn validate_groups(op: &'static str, groups: &[ParamGroup]) -> Result<()> {
    let mut seen = HashSet::new();
    for (gi, g) in groups.iter().enumerate() {
        if !(g.weight_decay.is_finite() && g.weight_decay >= 0.0) {
            return Err(Error::msg(format!(
                "{op}: param group {gi} has invalid weight decay {}",
                g.weight_decay
            )));
        }
        for (pi, p) in g.params.iter().enumerate() {
            if !matches!(p.dtype(), DType::F32 | DType::F64) {
                return Err(Error::DType {
                    op,
                    dtype: p.dtype(),
                    hint: format!(
                        " (param {pi} of group {gi}, shape {:?}: parameters must be f32 or f64)",
                        p.shape()
                    ),
                });
            }
            if !p.is_contiguous() {
                return Err(Error::msg(format!(
                    "{op}: param {pi} of group {gi} (shape {:?}) is not contiguous; \
                     optimisers update parameters in place",
                    p.shape()
                )));
            }
            if !seen.insert(p.id()) {
                return Err(Error::msg(format!(
                    "{op}: param {pi} of group {gi} (shape {:?}) appears more than once",
                    p.shape()
                )));
            }
        }
    }
    Ok(())
}

/// A contiguous CPU copy with its own buffer (checkpoint snapshots must not alias live state;
/// state kept on CUDA is moved to the CPU).
pub(crate) fn deep_copy(t: &Tensor) -> Result<Tensor> {
    crate::any_dispatch!(t.dtype(), T => Tensor::from_vec(t.to_vec::<T>()?, t.shape()))
}

/// A copy of a loaded state tensor on `param`'s device (its own buffer).
pub(crate) fn state_copy_for(param: &Tensor, t: &Tensor) -> Result<Tensor> {
    let c = deep_copy(t)?;
    if param.is_cuda() {
        crate::no_grad(|| c.to_cuda())
    } else {
        Ok(c)
    }
}

/// Checks that a state tensor loaded for parameter `index` matches it in shape and dtype.
pub(crate) fn check_state_tensor(
    op: &'static str,
    what: &str,
    index: usize,
    param: &Tensor,
    t: &Tensor,
) -> Result<()> {
    if t.shape() != param.shape() || t.dtype() != param.dtype() {
        return Err(Error::msg(format!(
            "{op}: {what} for parameter {index} is {:?} {} but the parameter is {:?} {}",
            t.shape(),
            t.dtype(),
            param.shape(),
            param.dtype()
        )));
    }
    Ok(())
}

/// The gradient of `p` as a contiguous tensor of `p`'s dtype and shape, or None if it has
/// none. The returned tensor never shares `p`'s buffer (so it can be read while `p` is
/// written).
pub(crate) fn grad_for_update(
    op: &'static str,
    index: usize,
    p: &Tensor,
) -> Result<Option<Tensor>> {
    let Some(g) = p.grad() else {
        return Ok(None);
    };
    unshared_grad(op, index, "gradient", p, &g, true).map(Some)
}

/// `g`, a gradient (`what`) for parameter `index`, checked against `p`'s shape (and dtype, when
/// `same_dtype`) and device, as a contiguous tensor that never shares `p`'s buffer.
pub(crate) fn unshared_grad(
    op: &'static str,
    index: usize,
    what: &str,
    p: &Tensor,
    g: &Tensor,
    same_dtype: bool,
) -> Result<Tensor> {
    if g.shape() != p.shape() || (same_dtype && g.dtype() != p.dtype()) {
        return Err(Error::msg(format!(
            "{op}: {what} of parameter {index} is {:?} {} but the parameter is {:?} {}",
            g.shape(),
            g.dtype(),
            p.shape(),
            p.dtype()
        )));
    }
    if g.device() != p.device() {
        return Err(Error::msg(format!(
            "{op}: {what} of parameter {index} is on {:?} but the parameter is on {:?}",
            g.device(),
            p.device()
        )));
    }
    let g = g.contiguous()?;
    Ok(if !g.same_storage(p) {
        g
    } else if g.is_cuda() {
        crate::backend::cuda::ops::optim::copy(&g)?
    } else {
        deep_copy(&g)?
    })
}

/// Element count above which a per-tensor update is split across threads.
pub(crate) const PAR_THRESHOLD: usize = 1 << 15;
/// Chunk length of the parallel split.
pub(crate) const PAR_CHUNK: usize = 1 << 13;
