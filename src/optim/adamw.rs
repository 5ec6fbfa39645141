//! AdamW (Loshchilov & Hutter), exactly as `torch.optim.AdamW`.
//!
//! For a parameter `p` with gradient `g` at its `t`-th update (t counts the steps at which
//! this parameter had a gradient, starting at 1), learning rate `lr` and its group's weight
//! decay `wd`:
//!
//! ```text
//! p      <- p * (1 - lr * wd)                      decoupled weight decay, before Adam
//! m      <- m + (1 - beta1) * (g - m)              torch's lerp_, = beta1*m + (1-beta1)*g
//! v      <- v * beta2 + (1 - beta2) * g * g
//! bc1     = 1 - beta1^t,   bc2 = 1 - beta2^t       (f64)
//! denom   = sqrt(v) / sqrt(bc2) + eps              eps outside the bias-corrected sqrt
//! p      <- p - (lr / bc1) * m / denom
//! ```
//!
//! Scalars (`1 - lr*wd`, `lr/bc1`, `sqrt(bc2)`, ...) are computed in f64 and rounded once to
//! the parameter dtype, and the element-wise operations run in the parameter dtype in
//! torch's order, so an f32 run tracks torch's f32 run to a few ulps. `m` and `v` start at
//! zero and have the parameter's dtype. Each tensor is updated in one fused pass over
//! `(p, m, v, g)`.

use super::{
    check_state_tensor, deep_copy, grad_for_update, state_copy_for, unshared_grad, validate_groups,
    ParamGroup, PAR_CHUNK, PAR_THRESHOLD,
};
use crate::{float_dispatch, no_grad, DType, Error, Float, Result, Tensor};
use rayon::prelude::*;

/// Hyper-parameters shared by all groups (the weight decay here is the one [`AdamW::new`]
/// gives its single group). Defaults are torch's: betas (0.9, 0.999), eps 1e-8,
/// weight decay 0.01.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// The state of one parameter: its update count and both moments (parameter dtype/shape).
#[derive(Debug, Clone)]
pub struct AdamWParamState {
    pub step: u64,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

/// Checkpointable optimiser state. `params[i]` belongs to the i-th parameter in
/// construction order (groups in order, then parameters within a group); `None` for a
/// parameter that has not been updated yet.
#[derive(Debug, Clone, Default)]
pub struct AdamWState {
    /// Number of `step` calls made.
    pub steps: u64,
    pub params: Vec<Option<AdamWParamState>>,
}

pub struct AdamW {
    groups: Vec<ParamGroup>,
    config: AdamWConfig,
    steps: u64,
    /// One entry per parameter, in construction order.
    state: Vec<Option<AdamWParamState>>,
    /// Compute copies of the parameters (`compute_params`, `compute_leaves`), leaves of their
    /// own: rewritten by each step (for CUDA f32 → bf16 in the update's fused kernel); empty
    /// until asked for.
    copies: Vec<Option<Tensor>>,
    /// CUDA parameters updated in one multi-tensor launch (`set_multi_tensor`).
    multi_tensor: bool,
}

/// Per-tensor scalars of one update, rounded to the parameter dtype.
struct Coefs<T> {
    decay: Option<T>,
    one_minus_beta1: T,
    beta2: T,
    one_minus_beta2: T,
    bc2_sqrt: T,
    eps: T,
    neg_step_size: T,
}

#[inline]
fn adamw_serial<T: Float>(p: &mut [T], m: &mut [T], v: &mut [T], g: &[T], k: &Coefs<T>) {
    let n = p.len();
    let (m, v, g) = (&mut m[..n], &mut v[..n], &g[..n]);
    for i in 0..n {
        let gi = g[i];
        let mut pi = p[i];
        if let Some(d) = k.decay {
            pi *= d;
        }
        let mi = m[i] + k.one_minus_beta1 * (gi - m[i]);
        let vi = v[i] * k.beta2 + k.one_minus_beta2 * gi * gi;
        let denom = vi.sqrt() / k.bc2_sqrt + k.eps;
        m[i] = mi;
        v[i] = vi;
        p[i] = pi + k.neg_step_size * mi / denom;
    }
}

fn adamw_kernel<T: Float>(p: &mut [T], m: &mut [T], v: &mut [T], g: &[T], k: &Coefs<T>) {
    if p.len() < PAR_THRESHOLD {
        adamw_serial(p, m, v, g, k);
        return;
    }
    p.par_chunks_mut(PAR_CHUNK)
        .zip(m.par_chunks_mut(PAR_CHUNK))
        .zip(v.par_chunks_mut(PAR_CHUNK))
        .zip(g.par_chunks(PAR_CHUNK))
        .for_each(|(((p, m), v), g)| adamw_serial(p, m, v, g, k));
}

impl AdamW {
    /// One group holding `params`, decayed with `config.weight_decay`.
    pub fn new(params: Vec<Tensor>, config: AdamWConfig) -> Result<AdamW> {
        let wd = config.weight_decay;
        Self::with_groups(vec![ParamGroup::new(params, wd)], config)
    }

    /// Several groups, each with its own weight decay (`config.weight_decay` is unused).
    pub fn with_groups(groups: Vec<ParamGroup>, config: AdamWConfig) -> Result<AdamW> {
        let (b1, b2) = config.betas;
        if !((0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2)) {
            return Err(Error::msg(format!(
                "AdamW: betas must lie in [0, 1), got ({b1}, {b2})"
            )));
        }
        if !(config.eps.is_finite() && config.eps >= 0.0) {
            return Err(Error::msg(format!("AdamW: invalid eps {}", config.eps)));
        }
        validate_groups("AdamW", &groups)?;
        let n = groups.iter().map(|g| g.params.len()).sum();
        Ok(AdamW {
            groups,
            config,
            steps: 0,
            state: vec![None; n],
            copies: Vec::new(),
            multi_tensor: !std::env::var("TESSERA_ADAMW_MULTI").is_ok_and(|v| v == "0"),
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// All parameters in construction order (the order of [`AdamWState::params`]).
    pub fn params(&self) -> impl Iterator<Item = &Tensor> {
        self.groups.iter().flat_map(|g| g.params.iter())
    }

    /// Number of `step` calls made (restored by `load_state`).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Clears every parameter's gradient (and its compute copy's, see `compute_leaves`).
    pub fn zero_grad(&self) {
        for p in self.params() {
            p.zero_grad();
        }
        for c in self.copies.iter().flatten() {
            c.zero_grad();
        }
    }

    /// The parameters (construction order) as differentiable casts to `dtype` for mixed
    /// precision: gradients flow back to the f32 masters as through `to_dtype`. For a CUDA f32
    /// parameter cast to bf16 the cast is a copy this optimiser keeps and rewrites in the same
    /// pass as each update (one fused kernel), so a step's forward needs no cast kernels; the
    /// copies are made (cast) on the first call. They stay exact while only `step` changes the
    /// parameters: after writing parameters any other way, call `drop_compute_copies`.
    pub fn compute_params(&mut self, dtype: DType) -> Result<Vec<Tensor>> {
        let params: Vec<Tensor> = self.params().cloned().collect();
        let mut out = Vec::with_capacity(params.len());
        for (i, p) in params.iter().enumerate() {
            let fused = p.is_cuda() && p.dtype() == DType::F32 && dtype == DType::BF16;
            out.push(if fused {
                p.cast_from_copy(&self.copy_of(i, p, dtype)?)?
            } else {
                p.to_dtype(dtype)?
            });
        }
        Ok(out)
    }

    /// The compute copies themselves (construction order), cast to `dtype`, as leaves: a
    /// backward leaves each parameter's gradient on its copy, in `dtype`, and `step` updates
    /// the master from it (and `zero_grad` clears it). The graph has no cast nodes and no cast
    /// kernels run in either direction: for a bf16 copy of a CUDA f32 master the fused update
    /// reads the bf16 gradient as it converts it, 2 bytes a parameter instead of a cast
    /// kernel's 6 and 4 more in the update.
    ///
    /// The update is exactly that of `compute_params`: there the backward sums a copy's
    /// gradient contributions in `dtype` in the same order and casts the sum to the master's
    /// dtype, which the conversion here repeats. Gradients kept on the copies across several
    /// backward passes (accumulation without `zero_grad`) add up in `dtype`, not in the
    /// master's; clip them (`clip_grad_norm`) on the returned tensors. A parameter whose
    /// master also has a gradient is updated with the sum of both. The same leaves are
    /// returned until the copies are dropped (`drop_compute_copies`, `load_state`) or `dtype`
    /// changes.
    pub fn compute_leaves(&mut self, dtype: DType) -> Result<Vec<Tensor>> {
        if !dtype.is_float() {
            return Err(Error::DType {
                op: "AdamW::compute_leaves",
                dtype,
                hint: " (compute copies must be a float dtype)".into(),
            });
        }
        let params: Vec<Tensor> = self.params().cloned().collect();
        params
            .iter()
            .enumerate()
            .map(|(i, p)| self.copy_of(i, p, dtype))
            .collect()
    }

    /// The compute copy of parameter `i` in `dtype` (a leaf that wants gradients), cast from
    /// the master when there is none in that dtype yet.
    fn copy_of(&mut self, i: usize, p: &Tensor, dtype: DType) -> Result<Tensor> {
        let n = self.state.len();
        self.copies.resize(n, None);
        let slot = &mut self.copies[i];
        if let Some(c) = slot {
            if c.dtype() == dtype {
                return Ok(c.clone());
            }
        }
        let c = no_grad(|| p.detach().to_dtype(dtype))?
            .contiguous()?
            .requires_grad_();
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Whether `step` updates the CUDA parameters in one multi-tensor launch
    /// (`backend::cuda::ops::optim::adamw_multi`: the same results bit for bit, one launch
    /// instead of one per parameter). On by default since run 11 validated it on an H200;
    /// `TESSERA_ADAMW_MULTI=0` turns it off for every optimiser.
    pub fn set_multi_tensor(&mut self, on: bool) {
        self.multi_tensor = on;
    }

    /// Forgets the compute copies (`compute_params` casts afresh on its next call).
    pub fn drop_compute_copies(&mut self) {
        self.copies.clear();
    }

    /// One update of every parameter that has a gradient, with learning rate `lr`.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        let _part = crate::autograd::part("optimizer");
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::msg(format!(
                "AdamW::step: invalid learning rate {lr}"
            )));
        }
        let config = self.config;
        let mut multi = self.multi_tensor.then(Vec::new);
        // The parameters queued on `multi`, in its order.
        let mut queued = Vec::new();
        no_grad(|| {
            let mut index = 0;
            for group in &self.groups {
                for p in &group.params {
                    let slot = &mut self.state[index];
                    let copy = self.copies.get(index).and_then(|c| c.as_ref());
                    let u = (lr, group.weight_decay);
                    let before = multi.as_ref().map_or(0, Vec::len);
                    update_param(p, index, slot, copy, u, &config, multi.as_mut())?;
                    if multi.as_ref().map_or(0, Vec::len) > before {
                        queued.push((index, p.clone()));
                    }
                    index += 1;
                }
            }
            let Some(updates) = multi.filter(|u| !u.is_empty()) else {
                return Ok(());
            };
            crate::backend::cuda::ops::optim::adamw_multi(&updates)?;
            // Counted only now: a failed launch leaves every step count (bias correction) as
            // it was, as the per-tensor path does.
            for (index, p) in &queued {
                let st = self.state[*index].as_mut().expect("queued with its state");
                st.step += 1;
                // A copy the kernel does not write (not bf16): cast from the updated master.
                let copy = self.copies.get(*index).and_then(|c| c.as_ref());
                if copy.is_some_and(|c| c.dtype() != DType::BF16) {
                    refresh_copy(p, copy)?;
                }
            }
            Ok::<(), Error>(())
        })?;
        self.steps += 1;
        Ok(())
    }

    /// The live state without a copy: the step count, then each parameter's state in
    /// construction order (what `state` copies). For writing a checkpoint tensor by tensor:
    /// `state` of a large model on a GPU copies every moment to the host at once.
    pub fn state_ref(&self) -> (u64, &[Option<AdamWParamState>]) {
        (self.steps, &self.state)
    }

    /// A snapshot of the state (tensors are copies: later steps do not change it).
    pub fn state(&self) -> Result<AdamWState> {
        let params = self
            .state
            .iter()
            .map(|s| {
                s.as_ref()
                    .map(|s| {
                        Ok(AdamWParamState {
                            step: s.step,
                            exp_avg: deep_copy(&s.exp_avg)?,
                            exp_avg_sq: deep_copy(&s.exp_avg_sq)?,
                        })
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamWState {
            steps: self.steps,
            params,
        })
    }

    /// Replaces the state with a copy of `state`, which must list one entry per parameter,
    /// each moment matching its parameter's shape and dtype. Nothing changes on error.
    pub fn load_state(&mut self, state: &AdamWState) -> Result<()> {
        let params: Vec<&Tensor> = self.params().collect();
        if state.params.len() != params.len() {
            return Err(Error::msg(format!(
                "AdamW::load_state: state has {} parameters but the optimiser has {}",
                state.params.len(),
                params.len()
            )));
        }
        let mut loaded = Vec::with_capacity(params.len());
        for (i, (s, p)) in state.params.iter().zip(params).enumerate() {
            loaded.push(match s {
                None => None,
                Some(s) => {
                    check_state_tensor("AdamW::load_state", "exp_avg", i, p, &s.exp_avg)?;
                    check_state_tensor("AdamW::load_state", "exp_avg_sq", i, p, &s.exp_avg_sq)?;
                    Some(AdamWParamState {
                        step: s.step,
                        exp_avg: state_copy_for(p, &s.exp_avg)?,
                        exp_avg_sq: state_copy_for(p, &s.exp_avg_sq)?,
                    })
                }
            });
        }
        self.state = loaded;
        self.steps = state.steps;
        // A resume usually rewrites the parameters too: cast the compute copies afresh.
        self.copies.clear();
        Ok(())
    }
}

/// Updates parameter `index` with learning rate and weight decay `(lr, weight_decay)`; a CUDA
/// parameter's update is queued on `multi` instead of launched when that is given.
fn update_param(
    p: &Tensor,
    index: usize,
    slot: &mut Option<AdamWParamState>,
    copy: Option<&Tensor>,
    (lr, weight_decay): (f64, f64),
    config: &AdamWConfig,
    multi: Option<&mut Vec<crate::backend::cuda::ops::optim::AdamWUpdate>>,
) -> Result<()> {
    let Some(g) = gradient(index, p, copy)? else {
        return Ok(());
    };
    if slot.is_none() {
        *slot = Some(AdamWParamState {
            step: 0,
            exp_avg: Tensor::zeros_on(p.shape(), p.dtype(), p.device())?,
            exp_avg_sq: Tensor::zeros_on(p.shape(), p.dtype(), p.device())?,
        });
    }
    let st = slot.as_mut().expect("state initialised above");
    let t = st.step + 1;
    let (b1, b2) = config.betas;
    let bc1 = 1.0 - b1.powf(t as f64);
    let bc2 = 1.0 - b2.powf(t as f64);
    if p.is_cuda() {
        // f32 master weights: the same scalars rounded to f32, one fused kernel.
        let k = crate::backend::cuda::ops::optim::AdamWCoefs {
            decay: (weight_decay != 0.0).then_some((1.0 - lr * weight_decay) as f32),
            one_minus_beta1: (1.0 - b1) as f32,
            beta2: b2 as f32,
            one_minus_beta2: (1.0 - b2) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: config.eps as f32,
            neg_step_size: (-(lr / bc1)) as f32,
        };
        // A bf16 compute copy is written by the same kernel; any other is cast below.
        let fused = copy.filter(|c| c.dtype() == DType::BF16);
        if let Some(multi) = multi {
            // Launched with the others by `step`, which then counts the step and casts any
            // other copy.
            multi.push(crate::backend::cuda::ops::optim::AdamWUpdate {
                p: p.clone(),
                g,
                m: st.exp_avg.clone(),
                v: st.exp_avg_sq.clone(),
                copy: fused.cloned(),
                k,
            });
            return Ok(());
        }
        crate::backend::cuda::ops::optim::adamw_step(
            p,
            &g,
            &st.exp_avg,
            &st.exp_avg_sq,
            &k,
            fused,
        )?;
        st.step = t;
        if fused.is_none() {
            refresh_copy(p, copy)?;
        }
        return Ok(());
    }
    float_dispatch!(p.dtype(), "AdamW::step", T => {
        let k = Coefs::<T> {
            decay: (weight_decay != 0.0).then(|| T::c(1.0 - lr * weight_decay)),
            one_minus_beta1: T::c(1.0 - b1),
            beta2: T::c(b2),
            one_minus_beta2: T::c(1.0 - b2),
            bc2_sqrt: T::c(bc2.sqrt()),
            eps: T::c(config.eps),
            neg_step_size: T::c(-(lr / bc1)),
        };
        p.write::<T, _>(|ps| -> Result<()> {
            st.exp_avg.write::<T, _>(|ms| -> Result<()> {
                st.exp_avg_sq.write::<T, _>(|vs| -> Result<()> {
                    g.read::<T, _>(|gs| adamw_kernel(ps, ms, vs, gs, &k))
                })?
            })?
        })??;
    });
    st.step = t;
    refresh_copy(p, copy)
}

/// The gradient that updates parameter `index`: its master's (`p.grad()`), its compute copy's
/// (`AdamW::compute_leaves`), or the sum of both in `p`'s dtype; contiguous, of `p`'s shape,
/// never sharing `p`'s buffer; None if neither has one. Its dtype is `p`'s, except that a CUDA
/// f32 master whose only gradient is its bf16 copy's gets that gradient as it is (the fused
/// update converts it as it reads, exactly as the cast would).
fn gradient(index: usize, p: &Tensor, copy: Option<&Tensor>) -> Result<Option<Tensor>> {
    let master = grad_for_update("AdamW::step", index, p)?;
    let Some(cg) = copy.and_then(|c| c.grad()) else {
        return Ok(master);
    };
    let cg = unshared_grad(
        "AdamW::step",
        index,
        "its compute copy's gradient",
        p,
        &cg,
        false,
    )?;
    let direct = p.is_cuda() && p.dtype() == DType::F32 && cg.dtype() == DType::BF16;
    if direct && master.is_none() {
        return Ok(Some(cg));
    }
    let cg = cg.to_dtype(p.dtype())?;
    Ok(Some(match master {
        None => cg,
        Some(m) => m.add(&cg)?,
    }))
}

/// Rewrites `copy` (a compute copy) as the cast of the updated master `p`; nothing when there
/// is none or it shares `p`'s buffer (a copy in the master's own dtype).
fn refresh_copy(p: &Tensor, copy: Option<&Tensor>) -> Result<()> {
    match copy {
        Some(c) if !c.same_storage(p) => c.assign(&p.detach().to_dtype(c.dtype())?),
        _ => Ok(()),
    }
}
