//! Learning-rate schedules with the semantics of Hugging Face transformers'
//! `get_constant_schedule_with_warmup`, `get_cosine_schedule_with_warmup` (and its
//! `..._with_min_lr` variant) and `get_linear_schedule_with_warmup`.
//!
//! `lr_at(s)` is the learning rate of the optimiser step taken after `s` earlier steps
//! (s = 0 for the first step), i.e. the lr in effect after `s` calls of torch's
//! `scheduler.step()`. With `w` warmup steps and `n` total steps, the multiplier of the
//! peak lr is
//!
//! ```text
//! s < w:        s / max(1, w)                              (so the first step has lr 0 when w > 0)
//! cosine:       r + (1 - r) * 0.5 * (1 + cos(pi * q))      q = (s - w) / max(1, n - w),  r = min_lr / peak_lr
//! linear:       max(0, (n - s) / max(1, n - w))
//! constant:     1
//! ```
//!
//! One deliberate difference: past `n` transformers' cosine rises again (cos keeps turning);
//! here `q` is clamped to 1, so the lr stays at `min_lr` after the last planned step.

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LrSchedule {
    /// The same lr at every step.
    Constant { lr: f64 },
    /// Linear warmup from 0 to `lr`, then constant.
    WarmupConstant { lr: f64, warmup_steps: u64 },
    /// Linear warmup from 0 to `peak_lr`, then half a cosine from `peak_lr` down to `min_lr`
    /// at `total_steps` (and `min_lr` afterwards).
    WarmupCosine {
        peak_lr: f64,
        min_lr: f64,
        warmup_steps: u64,
        total_steps: u64,
    },
    /// Linear warmup from 0 to `peak_lr`, then linear decay to 0 at `total_steps` (and 0
    /// afterwards).
    WarmupLinear {
        peak_lr: f64,
        warmup_steps: u64,
        total_steps: u64,
    },
}

fn warmup_factor(step: u64, warmup: u64) -> f64 {
    step as f64 / warmup.max(1) as f64
}

impl LrSchedule {
    /// The learning rate for the step taken after `step` earlier steps.
    pub fn lr_at(&self, step: u64) -> f64 {
        match *self {
            LrSchedule::Constant { lr } => lr,
            LrSchedule::WarmupConstant { lr, warmup_steps } => {
                if step < warmup_steps {
                    lr * warmup_factor(step, warmup_steps)
                } else {
                    lr
                }
            }
            LrSchedule::WarmupCosine {
                peak_lr,
                min_lr,
                warmup_steps,
                total_steps,
            } => {
                if step < warmup_steps {
                    return peak_lr * warmup_factor(step, warmup_steps);
                }
                if peak_lr == 0.0 {
                    return 0.0;
                }
                let progress = (step - warmup_steps) as f64
                    / total_steps.saturating_sub(warmup_steps).max(1) as f64;
                let progress = progress.min(1.0);
                let rate = min_lr / peak_lr;
                let factor = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                peak_lr * (factor * (1.0 - rate) + rate).max(0.0)
            }
            LrSchedule::WarmupLinear {
                peak_lr,
                warmup_steps,
                total_steps,
            } => {
                if step < warmup_steps {
                    return peak_lr * warmup_factor(step, warmup_steps);
                }
                let remaining = total_steps as f64 - step as f64;
                let span = total_steps.saturating_sub(warmup_steps).max(1) as f64;
                peak_lr * (remaining / span).max(0.0)
            }
        }
    }

    /// The largest lr of the schedule.
    pub fn peak_lr(&self) -> f64 {
        match *self {
            LrSchedule::Constant { lr } | LrSchedule::WarmupConstant { lr, .. } => lr,
            LrSchedule::WarmupCosine { peak_lr, .. } | LrSchedule::WarmupLinear { peak_lr, .. } => {
                peak_lr
            }
        }
    }

    /// Checks that the lrs are finite and non-negative, `min_lr <= peak_lr` and
    /// `warmup_steps <= total_steps`.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::msg(format!("lr schedule {self:?}: {msg}")));
        let ok_lr = |v: f64| v.is_finite() && v >= 0.0;
        if !ok_lr(self.peak_lr()) {
            return bad("the lr must be finite and non-negative".into());
        }
        match *self {
            LrSchedule::WarmupCosine {
                peak_lr,
                min_lr,
                warmup_steps,
                total_steps,
            } => {
                if !ok_lr(min_lr) || min_lr > peak_lr {
                    return bad("min_lr must lie in [0, peak_lr]".into());
                }
                if warmup_steps > total_steps {
                    return bad("warmup_steps exceeds total_steps".into());
                }
            }
            LrSchedule::WarmupLinear {
                warmup_steps,
                total_steps,
                ..
            } => {
                if warmup_steps > total_steps {
                    return bad("warmup_steps exceeds total_steps".into());
                }
            }
            LrSchedule::Constant { .. } | LrSchedule::WarmupConstant { .. } => {}
        }
        Ok(())
    }
}
