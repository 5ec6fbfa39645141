//! The GRPO loss family (TRL `GRPOTrainer._compute_loss`) and group-relative advantages,
//! built on tessera's tensor ops so that d loss / d logps comes from autograd.
//!
//! Per token, with `A` the sequence's advantage:
//!
//! ```text
//! ratio  = exp(logp - old_logp)
//! loss_t = -min(ratio·A, clamp(ratio, 1 - ε_low, 1 + ε_high)·A) + β·KL_t
//! KL_t   = exp(ref - logp) - (ref - logp) - 1          (k3 estimator; only when β > 0)
//! ```
//!
//! and `loss_type` picks the normalisation over the masked tokens (see [`LossType`]).
//! The reference tests are `tests/policy_loss.rs` against PyTorch autograd fixtures written
//! by `tools/parity/make_policy_loss_fixtures.py`.

use crate::{Error, Result, Tensor};
use std::str::FromStr;

/// How the masked per-token losses are reduced to a scalar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossType {
    /// Mean over sequences of (sum of the sequence's masked token losses / its token count,
    /// clamped to at least 1 as TRL does).
    Grpo,
    /// Sum of all masked token losses / number of masked tokens in the (local) batch
    /// (clamped to at least 1).
    Bnpo,
    /// Sum of all masked token losses / (B · max_completion_len) (Dr. GRPO).
    DrGrpo,
    /// DAPO: token-level normalisation over the *whole accumulated* batch. At the level of
    /// one call (one batch, no gradient accumulation) that is the same as [`LossType::Bnpo`]:
    /// sum of masked token losses / number of masked tokens. A trainer that accumulates
    /// gradients over several micro-batches must rescale by its global token count.
    Dapo,
}

impl FromStr for LossType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "grpo" => Ok(LossType::Grpo),
            "bnpo" => Ok(LossType::Bnpo),
            "dr_grpo" => Ok(LossType::DrGrpo),
            "dapo" => Ok(LossType::Dapo),
            _ => Err(Error::msg(format!(
                "unknown loss type '{s}': want grpo, bnpo, dr_grpo or dapo"
            ))),
        }
    }
}

/// Hyper-parameters of [`policy_loss`].
#[derive(Clone, Debug)]
pub struct PolicyLossConfig {
    pub loss_type: LossType,
    /// KL coefficient β; 0 disables the KL term (and the reference log-probs are not needed).
    pub beta: f64,
    /// ε_low: the ratio is clipped below at 1 - epsilon.
    pub epsilon: f64,
    /// ε_high: the ratio is clipped above at 1 + epsilon_high; `None` = `epsilon`.
    pub epsilon_high: Option<f64>,
    /// Dr. GRPO's normaliser; `None` = T (the completion dimension of the inputs).
    pub max_completion_len: Option<usize>,
}

impl Default for PolicyLossConfig {
    fn default() -> Self {
        PolicyLossConfig {
            loss_type: LossType::Grpo,
            beta: 0.0,
            epsilon: 0.2,
            epsilon_high: None,
            max_completion_len: None,
        }
    }
}

/// The tensors of one loss evaluation. Float tensors of any float dtype (all the same);
/// the loss is computed in the dtype of `logps`.
pub struct PolicyLossInputs<'a> {
    /// log π(token) under the current policy, [B, T]; the tensor the gradient is taken for.
    pub logps: &'a Tensor,
    /// log π_old(token) from the rollout policy, [B, T] (treated as a constant).
    pub old_logps: &'a Tensor,
    /// log π_ref(token) of the reference model, [B, T]; needed only when β > 0.
    pub ref_logps: Option<&'a Tensor>,
    /// One advantage per sequence, [B].
    pub advantages: &'a Tensor,
    /// 1 for a completion token, 0 for padding, [B, T].
    pub mask: &'a Tensor,
}

fn check_shape(name: &str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.shape() != want {
        return Err(Error::msg(format!(
            "policy loss: tensor '{name}' must have shape {want:?}, found {:?}",
            t.shape()
        )));
    }
    if !t.dtype().is_float() {
        return Err(Error::msg(format!(
            "policy loss: tensor '{name}' must be a float tensor, found {}",
            t.dtype()
        )));
    }
    Ok(())
}

/// The scalar GRPO-family loss (see the module doc); differentiable with respect to
/// `inputs.logps` (and to the other inputs too, if they require grad — `old_logps` is
/// detached, as in TRL, where it carries no gradient).
pub fn policy_loss(inputs: &PolicyLossInputs, cfg: &PolicyLossConfig) -> Result<Tensor> {
    let logps = inputs.logps;
    if logps.rank() != 2 {
        return Err(Error::msg(format!(
            "policy loss: tensor 'logps' must be [B, T], found {:?}",
            logps.shape()
        )));
    }
    let (b, t) = (logps.dim(0)?, logps.dim(1)?);
    check_shape("logps", logps, &[b, t])?;
    check_shape("old_logps", inputs.old_logps, &[b, t])?;
    check_shape("advantages", inputs.advantages, &[b])?;
    check_shape("mask", inputs.mask, &[b, t])?;
    let eps_low = cfg.epsilon;
    let eps_high = cfg.epsilon_high.unwrap_or(cfg.epsilon);
    if eps_low.is_nan() || eps_high.is_nan() || eps_low < 0.0 || eps_high < 0.0 {
        return Err(Error::msg(format!(
            "policy loss: epsilon {eps_low} and epsilon_high {eps_high} must be >= 0"
        )));
    }
    if cfg.beta.is_nan() || cfg.beta < 0.0 {
        return Err(Error::msg(format!(
            "policy loss: beta {} must be >= 0",
            cfg.beta
        )));
    }
    let dtype = logps.dtype();
    let old = inputs.old_logps.detach().to_dtype(dtype)?;
    let adv = inputs.advantages.to_dtype(dtype)?.unsqueeze(1)?; // [B, 1]
    let mask = inputs.mask.to_dtype(dtype)?;

    // Clipped surrogate: -min(ratio·A, clamp(ratio)·A). `min` as a select on the values;
    // where the two agree (ratio inside the clip range) both branches have the same
    // gradient, ratio·A·dlogp, so the choice at ties does not matter.
    let ratio = logps.sub(&old)?.exp()?;
    let unclipped = ratio.mul(&adv)?;
    let clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)?.mul(&adv)?;
    let (u, c) = (unclipped.detach().to_f64s()?, clipped.detach().to_f64s()?);
    let take_unclipped: Vec<u32> = u.iter().zip(&c).map(|(x, y)| (x <= y) as u32).collect();
    let cond = Tensor::from_vec(take_unclipped, &[b, t])?;
    let mut per_token = Tensor::where_cond(&cond, &unclipped, &clipped)?.neg()?;

    if cfg.beta > 0.0 {
        let reference = inputs.ref_logps.ok_or_else(|| {
            Error::msg(format!(
                "policy loss: tensor 'ref_logps' is needed for the KL term (beta {} > 0)",
                cfg.beta
            ))
        })?;
        check_shape("ref_logps", reference, &[b, t])?;
        let diff = reference.to_dtype(dtype)?.sub(logps)?;
        let kl = diff.exp()?.sub(&diff)?.add_scalar(-1.0)?;
        per_token = per_token.add(&kl.mul_scalar(cfg.beta)?)?;
    }

    let masked = per_token.mul(&mask)?;
    match cfg.loss_type {
        LossType::Grpo => {
            let per_seq = masked
                .sum(-1, false)?
                .div(&mask.sum(-1, false)?.clamp(1.0, f64::INFINITY)?)?;
            per_seq.mean_all()
        }
        LossType::Bnpo | LossType::Dapo => masked
            .sum_all()?
            .div(&mask.sum_all()?.clamp(1.0, f64::INFINITY)?),
        LossType::DrGrpo => {
            let len = cfg.max_completion_len.unwrap_or(t);
            if len == 0 || b == 0 {
                return Err(Error::msg(
                    "policy loss: dr_grpo needs B > 0 and max_completion_len > 0",
                ));
            }
            masked.sum_all()?.mul_scalar(1.0 / (b * len) as f64)
        }
    }
}

/// The loss and d loss / d logps (same shape and dtype as `logps`), by autograd.
pub fn policy_loss_and_grad(
    inputs: &PolicyLossInputs,
    cfg: &PolicyLossConfig,
) -> Result<(Tensor, Tensor)> {
    let x = inputs.logps.detach().requires_grad_();
    let local = PolicyLossInputs {
        logps: &x,
        old_logps: inputs.old_logps,
        ref_logps: inputs.ref_logps,
        advantages: inputs.advantages,
        mask: inputs.mask,
    };
    let loss = policy_loss(&local, cfg)?;
    let g = match crate::grad(&loss, None, &[&x])?.pop().flatten() {
        Some(g) => g,
        None => x.zeros_like()?,
    };
    Ok((loss.detach(), g))
}

/// How [`group_advantages`] scales the centred rewards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleRewards {
    /// Divide by the group's std + 1e-4.
    Group,
    /// Divide by the whole batch's std + 1e-4.
    Batch,
    /// Do not divide (Dr. GRPO).
    None,
}

impl FromStr for ScaleRewards {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "group" => Ok(ScaleRewards::Group),
            "batch" => Ok(ScaleRewards::Batch),
            "none" => Ok(ScaleRewards::None),
            _ => Err(Error::msg(format!(
                "unknown scale_rewards '{s}': want group, batch or none"
            ))),
        }
    }
}

/// Unbiased (n - 1) standard deviation, as `torch.std`.
fn std_unbiased(xs: &[f64]) -> f64 {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    (xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0)).sqrt()
}

/// Group-relative advantages: `rewards` [B] holds B / G consecutive groups of G completions;
/// A_i = (r_i - mean of its group) / (std + 1e-4), with std the group's (`Group`) or the whole
/// batch's (`Batch`) unbiased standard deviation (as `torch.std`), and no division for
/// `None`. Computed in f64; returned in the dtype of `rewards`, with no gradient.
pub fn group_advantages(
    rewards: &Tensor,
    group_size: usize,
    scale: ScaleRewards,
) -> Result<Tensor> {
    if rewards.rank() != 1 || !rewards.dtype().is_float() {
        return Err(Error::msg(format!(
            "group_advantages: tensor 'rewards' must be a float [B], found {} {:?}",
            rewards.dtype(),
            rewards.shape()
        )));
    }
    let r = rewards.detach().to_f64s()?;
    if group_size == 0 || r.len() % group_size != 0 {
        return Err(Error::msg(format!(
            "group_advantages: {} rewards do not split into groups of {group_size}",
            r.len()
        )));
    }
    let needs_two = match scale {
        ScaleRewards::Group => group_size,
        ScaleRewards::Batch => r.len(),
        ScaleRewards::None => 2,
    };
    if needs_two < 2 {
        return Err(Error::msg(format!(
            "group_advantages: the unbiased std of {scale:?} scaling needs at least 2 rewards \
             per {}",
            if scale == ScaleRewards::Group {
                "group"
            } else {
                "batch"
            }
        )));
    }
    let batch_std = if scale == ScaleRewards::Batch {
        std_unbiased(&r)
    } else {
        1.0
    };
    let mut out = Vec::with_capacity(r.len());
    for g in r.chunks(group_size) {
        let mean = g.iter().sum::<f64>() / group_size as f64;
        let denom = match scale {
            ScaleRewards::Group => std_unbiased(g) + 1e-4,
            ScaleRewards::Batch => batch_std + 1e-4,
            ScaleRewards::None => 1.0,
        };
        out.extend(g.iter().map(|x| (x - mean) / denom));
    }
    Tensor::from_f64s(&out, &[r.len()], rewards.dtype())
}
