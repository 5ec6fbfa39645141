//! One sample at a time: log π(y|x), its gradient over the selected parameters flattened to
//! one f64 vector, and the logit-space factor ‖A(x)‖² of the LBK estimate.
//!
//! A sample runs as a batch of one (no padding), in the model's own dtype: with an f64 model
//! every quantity here is f64 end to end, which the precision tests rely on
//! (`rl::data::policy_logprobs` casts the logits to f32 and would not do).

use super::select::SelectedParams;
use crate::qwen2_5_vl::{Batch, QwenVl};
use crate::rl::data::Encoded;
use crate::{Error, Result, Tensor};

/// What a per-sample gradient is the gradient of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    /// log π(y|x) = Σ_t log π(y_t | x, y_<t) over the completion tokens.
    LogProb,
    /// The SFT loss: mean token cross-entropy of the completion, −log π(y|x) / C.
    SftLoss,
}

impl std::str::FromStr for Objective {
    type Err = Error;
    fn from_str(s: &str) -> Result<Objective> {
        match s {
            "logprob" => Ok(Objective::LogProb),
            "sft" => Ok(Objective::SftLoss),
            _ => Err(Error::msg(format!(
                "unknown objective {s:?} (expected logprob or sft)"
            ))),
        }
    }
}

/// Forward-only facts about one sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleStats {
    /// log π(y|x): the sum of the completion tokens' log-probabilities.
    pub logprob: f64,
    /// Completion tokens C.
    pub tokens: usize,
    /// ‖A(x)‖² with A = ∂ log π(y|x) / ∂z, z the logits `[C, V]` that predict the completion:
    /// Σ_t ‖onehot(y_t) − softmax(z_t)‖² = Σ_t (1 − 2 p_t(y_t) + Σ_k p_t(k)²).
    pub logit_grad_norm_sq: f64,
}

/// A flattened per-sample gradient and the sample's forward facts.
pub struct SampleGrad {
    /// The gradient over the selected parameters, concatenated in their order.
    pub grad: Vec<f64>,
    pub stats: SampleStats,
}

/// The sample as a batch of one: `input_ids` I64 [1, T], no padding, no labels.
pub fn single_batch(e: &Encoded) -> Result<Batch> {
    let t = e.input_ids.len();
    let ids: Vec<i64> = e.input_ids.iter().map(|&i| i as i64).collect();
    Ok(Batch {
        input_ids: Some(Tensor::from_vec(ids, &[1, t])?),
        attention_mask: None,
        pixel_values: e.pixel_values.clone(),
        image_grid_thw: e.image_grid_thw.clone(),
        labels: None,
    })
}

/// The logits that predict the completion, `[C, V]` in the model's dtype (in the graph when
/// gradients are on), and the completion tokens `[C]` I64 on the same device.
fn completion_logits(model: &QwenVl, e: &Encoded) -> Result<(Tensor, Tensor)> {
    let (p, t) = (e.prompt_len, e.input_ids.len());
    if p == 0 {
        return Err(Error::msg(
            "the prompt is empty (nothing predicts the first completion token)",
        ));
    }
    if p >= t {
        return Err(Error::msg(format!(
            "no completion tokens (prompt_len {p}, {t} tokens in all)"
        )));
    }
    let c = t - p;
    // Position j predicts token j + 1: columns P-1 .. T-2 predict the completion.
    let logits = model.logits_at(&single_batch(e)?, p - 1, c)?;
    let v = logits.dim(2)?;
    let logits = logits.reshape(&[c, v])?;
    let ids: Vec<i64> = e.completion().iter().map(|&i| i as i64).collect();
    let targets = Tensor::from_vec(ids, &[c])?.to_device(logits.device())?;
    Ok((logits, targets))
}

/// ‖onehot(y) − softmax(z)‖² summed over rows; `logits` [C, V].
fn logit_grad_norm_sq(logits: &Tensor, targets: &[u32]) -> Result<f64> {
    let v = logits.dim(1)?;
    let z = logits.to_f64s()?;
    let mut total = 0.0;
    for (row, &y) in z.chunks(v).zip(targets) {
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = row.iter().map(|&x| (x - m).exp()).collect();
        let s: f64 = e.iter().sum();
        let sum_sq: f64 = e.iter().map(|x| (x / s) * (x / s)).sum();
        total += 1.0 - 2.0 * e[y as usize] / s + sum_sq;
    }
    Ok(total)
}

/// log π(y|x), C and ‖A(x)‖² of one sample, without gradients.
pub fn sample_stats(model: &QwenVl, e: &Encoded) -> Result<SampleStats> {
    crate::no_grad(|| {
        let (logits, targets) = completion_logits(model, e)?;
        let logprob = logits.log_prob_of(&targets)?.sum_all()?.to_scalar()?;
        Ok(SampleStats {
            logprob,
            tokens: targets.numel(),
            logit_grad_norm_sq: logit_grad_norm_sq(&logits, e.completion())?,
        })
    })
}

/// The gradient of `objective` on one sample over the selected parameters, flattened to f64
/// (parameters the sample does not reach, e.g. the vision tower for a text-only sample,
/// contribute zeros).
pub fn sample_gradient(
    model: &QwenVl,
    e: &Encoded,
    selected: &SelectedParams,
    objective: Objective,
) -> Result<SampleGrad> {
    let (logits, targets) = completion_logits(model, e)?;
    let c = targets.numel();
    let logprob = logits.log_prob_of(&targets)?.sum_all()?;
    let stats = SampleStats {
        logprob: logprob.to_scalar()?,
        tokens: c,
        logit_grad_norm_sq: crate::no_grad(|| logit_grad_norm_sq(&logits, e.completion()))?,
    };
    let output = match objective {
        Objective::LogProb => logprob,
        Objective::SftLoss => logprob.mul_scalar(-1.0 / c as f64)?,
    };
    let wrt: Vec<&Tensor> = selected.tensors.iter().collect();
    let grads = crate::grad(&output, None, &wrt)?;
    let mut flat = Vec::with_capacity(selected.numel);
    for (t, g) in selected.tensors.iter().zip(grads) {
        match g {
            Some(g) => flat.extend(g.to_f64s()?),
            None => flat.extend(std::iter::repeat_n(0.0, t.numel())),
        }
    }
    Ok(SampleGrad { grad: flat, stats })
}
