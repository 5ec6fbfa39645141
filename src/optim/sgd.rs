//! Stochastic gradient descent with momentum, exactly as `torch.optim.SGD`.
//!
//! For a parameter `p` with gradient `g`, learning rate `lr`, its group's weight decay `wd`
//! (coupled: added to the gradient), momentum `mu` and dampening `tau`:
//!
//! ```text
//! d   = g + wd * p
//! if mu != 0:
//!     buf = d                                   first update of this parameter
//!     buf = mu * buf + (1 - tau) * d            later updates
//!     d   = d + mu * buf    (nesterov)    or    d = buf
//! p  <- p - lr * d
//! ```
//!
//! Scalars are rounded once to the parameter dtype and the element-wise operations run in
//! the parameter dtype in torch's order. The momentum buffer has the parameter's dtype.

use super::{
    check_state_tensor, deep_copy, grad_for_update, state_copy_for, validate_groups, ParamGroup,
    PAR_CHUNK, PAR_THRESHOLD,
};
use crate::{float_dispatch, no_grad, Error, Float, Result, Tensor};
use rayon::prelude::*;

/// Hyper-parameters shared by all groups (the weight decay here is the one [`Sgd::new`]
/// gives its single group). Defaults: momentum 0.9, no dampening, no Nesterov, no decay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            momentum: 0.9,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        }
    }
}

/// Checkpointable state: the momentum buffer of every parameter in construction order
/// (`None` before its first update, or always when momentum is 0).
#[derive(Debug, Clone, Default)]
pub struct SgdState {
    /// Number of `step` calls made.
    pub steps: u64,
    pub momentum_buffers: Vec<Option<Tensor>>,
}

pub struct Sgd {
    groups: Vec<ParamGroup>,
    config: SgdConfig,
    steps: u64,
    buffers: Vec<Option<Tensor>>,
}

struct Coefs<T> {
    weight_decay: Option<T>,
    momentum: T,
    one_minus_dampening: T,
    neg_lr: T,
    nesterov: bool,
}

/// `d = g + wd*p`, the update direction before momentum.
#[inline]
fn direction<T: Float>(p: T, g: T, k: &Coefs<T>) -> T {
    match k.weight_decay {
        Some(wd) => g + wd * p,
        None => g,
    }
}

/// One pass over `(p, buf, g)`; `first` when the buffer is being initialised.
fn sgd_momentum_serial<T: Float>(p: &mut [T], buf: &mut [T], g: &[T], first: bool, k: &Coefs<T>) {
    let n = p.len();
    let (buf, g) = (&mut buf[..n], &g[..n]);
    for i in 0..n {
        let d = direction(p[i], g[i], k);
        let b = if first {
            d
        } else {
            buf[i] * k.momentum + k.one_minus_dampening * d
        };
        buf[i] = b;
        let d = if k.nesterov { d + k.momentum * b } else { b };
        p[i] += k.neg_lr * d;
    }
}

fn sgd_plain_serial<T: Float>(p: &mut [T], g: &[T], k: &Coefs<T>) {
    for (pi, &gi) in p.iter_mut().zip(g) {
        let d = direction(*pi, gi, k);
        *pi += k.neg_lr * d;
    }
}

fn sgd_momentum_kernel<T: Float>(p: &mut [T], buf: &mut [T], g: &[T], first: bool, k: &Coefs<T>) {
    if p.len() < PAR_THRESHOLD {
        sgd_momentum_serial(p, buf, g, first, k);
        return;
    }
    p.par_chunks_mut(PAR_CHUNK)
        .zip(buf.par_chunks_mut(PAR_CHUNK))
        .zip(g.par_chunks(PAR_CHUNK))
        .for_each(|((p, b), g)| sgd_momentum_serial(p, b, g, first, k));
}

fn sgd_plain_kernel<T: Float>(p: &mut [T], g: &[T], k: &Coefs<T>) {
    if p.len() < PAR_THRESHOLD {
        sgd_plain_serial(p, g, k);
        return;
    }
    p.par_chunks_mut(PAR_CHUNK)
        .zip(g.par_chunks(PAR_CHUNK))
        .for_each(|(p, g)| sgd_plain_serial(p, g, k));
}

impl Sgd {
    /// One group holding `params`, decayed with `config.weight_decay`.
    pub fn new(params: Vec<Tensor>, config: SgdConfig) -> Result<Sgd> {
        let wd = config.weight_decay;
        Self::with_groups(vec![ParamGroup::new(params, wd)], config)
    }

    /// Several groups, each with its own weight decay (`config.weight_decay` is unused).
    pub fn with_groups(groups: Vec<ParamGroup>, config: SgdConfig) -> Result<Sgd> {
        if !(config.momentum.is_finite() && config.momentum >= 0.0) {
            return Err(Error::msg(format!(
                "Sgd: invalid momentum {}",
                config.momentum
            )));
        }
        if !config.dampening.is_finite() {
            return Err(Error::msg(format!(
                "Sgd: invalid dampening {}",
                config.dampening
            )));
        }
        if config.nesterov && (config.momentum <= 0.0 || config.dampening != 0.0) {
            return Err(Error::msg(
                "Sgd: Nesterov momentum requires a momentum > 0 and zero dampening",
            ));
        }
        validate_groups("Sgd", &groups)?;
        let n = groups.iter().map(|g| g.params.len()).sum();
        Ok(Sgd {
            groups,
            config,
            steps: 0,
            buffers: vec![None; n],
        })
    }

    pub fn config(&self) -> &SgdConfig {
        &self.config
    }

    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// All parameters in construction order (the order of [`SgdState::momentum_buffers`]).
    pub fn params(&self) -> impl Iterator<Item = &Tensor> {
        self.groups.iter().flat_map(|g| g.params.iter())
    }

    /// Number of `step` calls made (restored by `load_state`).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Clears every parameter's gradient.
    pub fn zero_grad(&self) {
        for p in self.params() {
            p.zero_grad();
        }
    }

    /// One update of every parameter that has a gradient, with learning rate `lr`.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::msg(format!("Sgd::step: invalid learning rate {lr}")));
        }
        let config = self.config;
        no_grad(|| {
            let mut index = 0;
            for group in &self.groups {
                for p in &group.params {
                    let slot = &mut self.buffers[index];
                    update_param(p, index, slot, lr, group.weight_decay, &config)?;
                    index += 1;
                }
            }
            Ok::<(), Error>(())
        })?;
        self.steps += 1;
        Ok(())
    }

    /// A snapshot of the state (tensors are copies: later steps do not change it).
    pub fn state(&self) -> Result<SgdState> {
        let momentum_buffers = self
            .buffers
            .iter()
            .map(|b| b.as_ref().map(deep_copy).transpose())
            .collect::<Result<Vec<_>>>()?;
        Ok(SgdState {
            steps: self.steps,
            momentum_buffers,
        })
    }

    /// Replaces the state with a copy of `state` (one entry per parameter, each buffer
    /// matching its parameter's shape and dtype). Nothing changes on error.
    pub fn load_state(&mut self, state: &SgdState) -> Result<()> {
        let params: Vec<&Tensor> = self.params().collect();
        if state.momentum_buffers.len() != params.len() {
            return Err(Error::msg(format!(
                "Sgd::load_state: state has {} parameters but the optimiser has {}",
                state.momentum_buffers.len(),
                params.len()
            )));
        }
        let mut loaded = Vec::with_capacity(params.len());
        for (i, (b, p)) in state.momentum_buffers.iter().zip(params).enumerate() {
            loaded.push(match b {
                None => None,
                Some(b) => {
                    check_state_tensor("Sgd::load_state", "momentum buffer", i, p, b)?;
                    Some(state_copy_for(p, b)?)
                }
            });
        }
        self.buffers = loaded;
        self.steps = state.steps;
        Ok(())
    }
}

fn update_param(
    p: &Tensor,
    index: usize,
    slot: &mut Option<Tensor>,
    lr: f64,
    weight_decay: f64,
    config: &SgdConfig,
) -> Result<()> {
    let Some(g) = grad_for_update("Sgd::step", index, p)? else {
        return Ok(());
    };
    if p.is_cuda() {
        // f32 master weights: the same scalars rounded to f32, one fused kernel.
        let k = crate::backend::cuda::ops::optim::SgdCoefs {
            weight_decay: (weight_decay != 0.0).then_some(weight_decay as f32),
            momentum: config.momentum as f32,
            one_minus_dampening: (1.0 - config.dampening) as f32,
            neg_lr: (-lr) as f32,
            nesterov: config.nesterov,
        };
        if config.momentum == 0.0 {
            return crate::backend::cuda::ops::optim::sgd_step(p, &g, None, false, &k);
        }
        let first = slot.is_none();
        if first {
            *slot = Some(Tensor::zeros_on(p.shape(), p.dtype(), p.device())?);
        }
        let buf = slot.as_ref().expect("buffer initialised above");
        return crate::backend::cuda::ops::optim::sgd_step(p, &g, Some(buf), first, &k);
    }
    float_dispatch!(p.dtype(), "Sgd::step", T => {
        let k = Coefs::<T> {
            weight_decay: (weight_decay != 0.0).then(|| T::c(weight_decay)),
            momentum: T::c(config.momentum),
            one_minus_dampening: T::c(1.0 - config.dampening),
            neg_lr: T::c(-lr),
            nesterov: config.nesterov,
        };
        if config.momentum == 0.0 {
            p.write::<T, _>(|ps| g.read::<T, _>(|gs| sgd_plain_kernel(ps, gs, &k)))??;
        } else {
            let first = slot.is_none();
            if first {
                *slot = Some(p.zeros_like()?);
            }
            let buf = slot.as_ref().expect("buffer initialised above");
            p.write::<T, _>(|ps| -> Result<()> {
                buf.write::<T, _>(|bs| -> Result<()> {
                    g.read::<T, _>(|gs| sgd_momentum_kernel(ps, bs, gs, first, &k))
                })?
            })??;
        }
    });
    Ok(())
}
